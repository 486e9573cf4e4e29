//! Per-rule counters and learn mode's records: what an agent used, for `agentwatch learn`.

/// Longest DNS name kept for learn mode (a name is at most 253 characters).
pub const LEARN_NAME_MAX: usize = 255;

/// Key of `RULE_HITS`: calls agent `agent` made that rule `rule` admitted (the rule's id, from
/// its text, as in [`crate::PortRange::rule`] and [`crate::DnsRange::rule`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleHitKey {
    pub agent: u32,
    pub _pad: u32,
    pub rule: u64,
}

/// How often, and when last, a learn-mode agent used one destination (`LEARN_DESTS`, keyed by
/// [`crate::DestKey`]) or exec'd one path (`LEARN_EXECS`, keyed by [`crate::ExecKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Calls (or execs) recorded.
    pub count: u64,
    /// Of those, the calls the allow-list would have denied (or the execs the exec allow-list
    /// killed).
    pub refused: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last one.
    pub last_ns: u64,
}

/// Key of `LEARN_NAMES`: a name the DNS forwarder answered for a learn-mode agent with this
/// address (family and address as in [`crate::DnsKey`]); `name` is the name's hash, so one
/// address can carry several names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnNameKey {
    pub agent: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
    pub name: u64,
}

/// Value of `LEARN_NAMES`: the name as asked (canonical, lower case, no trailing dot),
/// NUL-padded, and when it was last answered (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnName {
    pub last_ns: u64,
    pub name: [u8; LEARN_NAME_MAX + 1],
}

impl Default for LearnName {
    fn default() -> Self {
        Self {
            last_ns: 0,
            name: [0; LEARN_NAME_MAX + 1],
        }
    }
}

/// One agent's share of the learn maps (`LEARN_QUOTA`, by agent id): the daemon writes
/// `limit` (`daemon.learn_quota`; 0: no quota); the kernel keeps `dests` and `execs`, the
/// records the agent holds in `LEARN_DESTS` and `LEARN_EXECS`, and records nothing more once
/// one reaches the limit (counted in `learn_lost`), so one agent filling its share never costs
/// another agent its records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnQuota {
    pub limit: u64,
    pub dests: u64,
    pub execs: u64,
}

/// Capacity of `LEARN_DESTS` and of `LEARN_EXECS` (allocated per entry, so it costs nothing
/// until used). The config refuses learn-mode agents whose quotas add up to more.
pub const LEARN_CAPACITY: u32 = 1 << 20;

/// `daemon.learn_quota` when the config does not say.
pub const DEFAULT_LEARN_QUOTA: u64 = 16_384;

const _: () = assert!(core::mem::size_of::<LearnQuota>() == 24);
const _: () = assert!(core::mem::size_of::<RuleHitKey>() == 16);
const _: () = assert!(core::mem::size_of::<Seen>() == 24);
const _: () = assert!(core::mem::size_of::<LearnNameKey>() == 32);
const _: () = assert!(core::mem::size_of::<LearnName>() == 264);
