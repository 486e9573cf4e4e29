//! Egress allow-list: rule keys and values, counters and denied-call events.

/// Protocol indices used in counters and events.
pub const PROTO_TCP: u8 = 0;
pub const PROTO_UDP: u8 = 1;
/// Any other inet protocol that reaches the hooks (e.g. ICMP ping sockets).
pub const PROTO_OTHER: u8 = 2;
pub const NUM_PROTOS: usize = 3;

/// Protocol bits in [`PortRange::protos`].
pub const PROTO_BIT_TCP: u8 = 1 << PROTO_TCP;
pub const PROTO_BIT_UDP: u8 = 1 << PROTO_UDP;
pub const PROTO_BIT_OTHER: u8 = 1 << PROTO_OTHER;
/// `any` in a rule: TCP, UDP and every other protocol.
pub const PROTO_BITS_ANY: u8 = PROTO_BIT_TCP | PROTO_BIT_UDP | PROTO_BIT_OTHER;

/// Verdict indices used in counters.
pub const VERDICT_ALLOWED: u8 = 0;
pub const VERDICT_DENIED: u8 = 1;
/// Refused by an in-kernel rate cap.
pub const VERDICT_CAPPED: u8 = 2;
/// Learn mode: the allow-list would have denied the call; it went through, counted and audited.
pub const VERDICT_WOULD_DENY: u8 = 3;
pub const NUM_VERDICTS: usize = 4;

/// Which hook saw the call.
pub const HOOK_CONNECT: u8 = 0;
pub const HOOK_SENDMSG: u8 = 1;
/// The byte counter on the agent's packets (cgroup_skb egress) refused a packet that carries a
/// routing header (IPv6) or IP options (IPv4): they send it elsewhere than the address the
/// connect/sendmsg hooks judged. Its destination is the packet's, i.e. the real next hop.
pub const HOOK_ROUTE: u8 = 2;

/// Most port ranges one destination prefix can carry. The userspace compiler folds the ranges of
/// every shorter prefix that covers a prefix into it (so one longest-prefix lookup answers), and
/// rejects a policy that needs more than this for one prefix.
pub const MAX_PORT_RANGES: usize = 16;

/// Entries each rule trie (IPv4, IPv6) holds, across all agents and both rule generations. A
/// reload writes every changed agent's next generation beside its live one, so a config may use
/// at most half ([`MAX_CONFIG_RULE_ENTRIES`]). The tries allocate per entry
/// (BPF_F_NO_PREALLOC), so the bound costs nothing until used.
pub const RULE_TRIE_CAPACITY: u32 = 1 << 21;

/// Most compiled entries (one per distinct destination prefix of an agent) of one family that
/// a config may have across all its agents: half the trie, so that any reload (every agent
/// changed at once included) fits beside the policy in force.
pub const MAX_CONFIG_RULE_ENTRIES: usize = (RULE_TRIE_CAPACITY / 2) as usize;

/// Key of the IPv4 rule trie: an agent's rule generation ([`crate::rule_scope`]) followed by the
/// address in network byte order. The LPM prefix length is 32 (scope) + the CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV4 {
    pub scope: u32,
    pub addr: [u8; 4],
}

/// Key of the IPv6 rule trie; see [`RuleKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV6 {
    pub scope: u32,
    pub addr: [u8; 16],
}

/// Bits of the LPM prefix taken by [`RuleKeyV4::scope`].
pub const SCOPE_BITS: u32 = 32;

/// Inclusive port range with the protocols it admits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    /// `PROTO_BIT_*` set.
    pub protos: u8,
    pub _pad: [u8; 3],
    /// Identity of the config rule this range came from (from its text): the kernel counts
    /// the calls it admits under this id (`RULE_HITS`).
    pub rule: u64,
}

/// Value of a rule trie entry: everything allowed towards the destinations under its prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Valid entries in `ranges`, `<= MAX_PORT_RANGES`.
    pub count: u32,
    pub _pad: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

impl RuleValue {
    /// The rule that admits `port` for protocol index `proto`, if any: the first range that
    /// matches. The compiler orders ranges most specific first (longest prefix, then fewest
    /// ports, then fewest protocols), so that rule is the one a call is counted under.
    #[inline(always)]
    pub fn admitting_rule(&self, proto: u8, port: u16) -> Option<u64> {
        let bit = 1u8 << (proto & 7);
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if i as u32 >= self.count {
                break;
            }
            let r = &self.ranges[i];
            if r.protos & bit != 0 && r.lo <= port && port <= r.hi {
                return Some(r.rule);
            }
            i += 1;
        }
        None
    }

    /// Does this value admit `port` for protocol index `proto`?
    #[inline(always)]
    pub fn admits(&self, proto: u8, port: u16) -> bool {
        self.admitting_rule(proto, port).is_some()
    }
}

/// Per-agent counters, one copy per CPU; userspace sums them. Fields grew at the end, in place
/// of `_reserved` (the tamper counters took its last two), so pinned maps of an older daemon
/// stayed readable. (The `would_deny` verdict
/// widened `egress`, and the per-rule and learn-mode counters widened it again: pins made before
/// have another size and are refused as incompatible; `agentwatch run --cleanup` removes them.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Egress attempts, indexed by [`egress_slot`] (protocol x verdict).
    pub egress: [u64; NUM_PROTOS * NUM_VERDICTS],
    /// Calls seen by the connect hooks (any verdict).
    pub connects: u64,
    /// Calls seen by the sendmsg hooks (any verdict).
    pub sends: u64,
    /// System calls (only for agents with syscall monitoring).
    pub syscalls: u64,
    /// Execs allowed / killed by the exec allow-list.
    pub execs: u64,
    pub execs_denied: u64,
    /// Tasks created (fork, clone, threads included).
    pub forks: u64,
    /// socket(AF_INET/AF_INET6, SOCK_RAW) refused by the sock_create hook.
    pub raw_sockets_denied: u64,
    /// Processes killed for creating a packet socket.
    pub packet_sockets_killed: u64,
    /// Moves of the agent's processes out of its cgroup subtree (or into another agent).
    pub cgroup_escapes: u64,
    /// Distinct destinations, counted once per 1-second epoch each (see `DestKey`); userspace
    /// turns the running total into distinct destinations per window.
    pub destinations: u64,
    /// Denied/capped egress events not written to the ring buffer: the agent was over its
    /// event rate ([`crate::AgentLimits::events`]).
    pub egress_suppressed: u64,
    /// Socket-denied events not written for the same reason.
    pub sockets_suppressed: u64,
    /// This agent's events the ring buffer had no room for (also in the global `EVENTS_LOST`).
    pub events_lost: u64,
    /// Exec events (allowed or killed) not written for the same reason as `egress_suppressed`:
    /// an exec loop must not flood the trail either.
    pub execs_suppressed: u64,
    /// Escape events not written for the same reason (only those whose process the kernel
    /// killed itself; one the daemon must kill is always reported).
    pub escapes_suppressed: u64,
    /// Outbound bytes (IP packets as they leave the agent's sockets, headers included).
    pub egress_bytes: u64,
    /// Outbound bytes dropped by the agent's byte cap.
    pub egress_bytes_dropped: u64,
    /// Admitted calls whose rule could not be counted (`RULE_HITS` full).
    pub rule_hits_lost: u64,
    /// Destinations and execs of a learn-mode agent the kernel had no room to record
    /// (`LEARN_DESTS` / `LEARN_EXECS` full): `agentwatch learn` says its proposal is partial.
    pub learn_lost: u64,
    /// File opens outside the agent's `[agents.files]` list: refused with EACCES (BPF LSM)
    /// or, where the kernel has no BPF LSM, seen by the open tracepoints and judged by the
    /// daemon (which counts what it found outside in its own counter).
    pub files_denied: u64,
    /// File events not written (over the agent's event rate): refused opens whose line is
    /// missing, or, without BPF LSM, opens the daemon could not judge.
    pub files_suppressed: u64,
    /// Packet sockets refused with EPERM (`lsm/socket_create`, where the kernel has BPF LSM;
    /// elsewhere the process is killed: `packet_sockets_killed`).
    pub packet_sockets_denied: u64,
    /// `bpf()` calls and signals to the daemon refused by the tamper guard (BPF LSM).
    pub tamper_refused: u64,
    /// Tamper refusals not written one by one (over the agent's event rate).
    pub tamper_suppressed: u64,
    /// IP packets of sockets opened before the agent's egress was revoked (kill switch,
    /// tripped breaker, lease end), dropped as they left: a deny holds for open sockets too.
    pub packets_revoked: u64,
    /// Packets refused because they carry an IPv6 routing header or IPv4 options
    /// ([`HOOK_ROUTE`]).
    pub route_options_refused: u64,
}

impl AgentCounters {
    /// Egress attempts with `verdict` (`VERDICT_*`), all protocols together.
    pub fn verdict_total(&self, verdict: u8) -> u64 {
        let mut sum = 0;
        let mut proto = 0;
        while proto < NUM_PROTOS as u8 {
            sum += self.egress[egress_slot(proto, verdict)];
            proto += 1;
        }
        sum
    }

    /// Events counted instead of written one by one (over the agent's event rate), all kinds.
    pub const fn suppressed(&self) -> u64 {
        self.egress_suppressed
            + self.sockets_suppressed
            + self.execs_suppressed
            + self.escapes_suppressed
            + self.files_suppressed
            + self.tamper_suppressed
    }
}

/// Index into [`AgentCounters::egress`].
#[inline(always)]
pub const fn egress_slot(proto: u8, verdict: u8) -> usize {
    (proto as usize % NUM_PROTOS) * NUM_VERDICTS + (verdict as usize % NUM_VERDICTS)
}

/// A denied (or capped) egress attempt, as written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressEvent {
    /// `EVENT_EGRESS_DENIED` or `EVENT_EGRESS_CAPPED`.
    pub kind: u32,
    /// Agent id, or [`crate::UNKNOWN_AGENT`].
    pub agent: u32,
    /// Thread id (kernel pid) of the caller.
    pub pid: u32,
    /// Process id (kernel tgid) of the caller.
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the call.
    pub ts_ns: u64,
    pub comm: [u8; 16],
    /// Destination address; an IPv4 address (also one mapped in IPv6) fills the first 4 bytes.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// 4 or 6: how the destination was judged (a v4-mapped v6 address is judged as 4).
    pub family: u8,
    /// `PROTO_*` index.
    pub proto: u8,
    /// `HOOK_*`.
    pub hook: u8,
    pub _pad: [u8; 3],
}

/// One destination of one agent, as the egress hooks judged it: the destination fields of
/// [`EgressEvent`]. Key of `DEST_SEEN` (distinct destinations per second) and `SUPPRESSED`
/// (suppressed events per destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub agent: u32,
    /// Host byte order.
    pub port: u16,
    /// 4 or 6, as in [`EgressEvent::family`].
    pub family: u8,
    /// `PROTO_*` index.
    pub proto: u8,
    /// As in [`EgressEvent::addr`]: an IPv4 address fills the first 4 bytes, the rest is zero.
    pub addr: [u8; 16],
}

/// Key of `SUPPRESSED`: the same fields as [`DestKey`].
pub type SuppressedKey = DestKey;

const _: () = assert!(core::mem::size_of::<RuleKeyV4>() == 8);
const _: () = assert!(core::mem::size_of::<RuleKeyV6>() == 20);
const _: () = assert!(core::mem::size_of::<PortRange>() == 16);
const _: () = assert!(core::mem::size_of::<RuleValue>() == 8 + 16 * MAX_PORT_RANGES);
const _: () = assert!(core::mem::size_of::<AgentCounters>() == 38 * 8);
const _: () = assert!(core::mem::size_of::<EgressEvent>() == 64);
const _: () = assert!(core::mem::offset_of!(EgressEvent, addr) == 40);
const _: () = assert!(core::mem::offset_of!(EgressEvent, port) == 56);
const _: () = assert!(core::mem::size_of::<DestKey>() == 24);
const _: () = assert!(core::mem::offset_of!(DestKey, addr) == 8);
