//! Types that cross the kernel/userspace boundary.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (padding bytes in a hash or LPM key
//! are uninitialised stack in the kernel and make lookups miss), and has its size asserted at
//! compile time so that a change on one side cannot silently disagree with the other.
#![no_std]

pub mod dns;
pub mod egress;
pub mod exec;
pub mod files;
pub mod learn;
pub mod limits;
pub mod sockets;
pub mod tamper;

pub use dns::*;
pub use egress::*;
pub use exec::*;
pub use files::*;
pub use learn::*;
pub use limits::*;
pub use sockets::*;
pub use tamper::*;

/// Largest number of agents one daemon guards. Agent ids index per-CPU arrays, so this bounds
/// their size (and the kernel's memory: counters are per CPU).
pub const MAX_AGENTS: u32 = 1024;

/// How many cgroup levels the kernel programs walk up from the calling task to find its agent.
/// Agents' cgroups may sit anywhere; processes below an agent's cgroup belong to that agent.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Agent id of a call whose task could not be matched to any agent (a socket created inside an
/// agent and used from outside it). Such calls are denied (fail closed) and counted in slot 0;
/// real agents get ids from 1.
pub const UNKNOWN_AGENT: u32 = 0;

/// Per-agent state the kernel reads on every call, keyed by the agent cgroup's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentState {
    /// Index into the per-agent counter arrays, `1..MAX_AGENTS`.
    pub id: u32,
    /// Which of the two rule generations is live. A reload writes the other generation and
    /// then flips this field in one map update, so no call ever sees a half-written policy.
    pub generation: u32,
    /// `AGENT_FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// All egress of the agent is denied whatever its rules say (kill switch, tripped breaker).
pub const AGENT_FLAG_DENY_ALL: u32 = 1 << 0;
/// Count this agent's syscalls (the sys_enter hook costs every process on the host a little, so
/// it only counts agents that asked for it).
pub const AGENT_FLAG_MONITOR_SYSCALLS: u32 = 1 << 1;
/// The agent has an exec allow-list: an exec of a path not in [`crate::ExecKey`] entries is
/// killed in the kernel.
pub const AGENT_FLAG_EXEC_ALLOW: u32 = 1 << 2;
/// The agent has hostname rules: its DNS traffic goes to its forwarder ([`crate::DnsPorts`]) and
/// addresses the forwarder learned for it ([`crate::DnsKey`]) are allowed as their rules say.
pub const AGENT_FLAG_DNS: u32 = 1 << 3;
/// Learn mode: what the allow-list would deny goes through, counted (`VERDICT_WOULD_DENY`)
/// and reported; caps, the exec allow-list, the escape guards, leases and the kill switch
/// still hold.
pub const AGENT_FLAG_LEARN: u32 = 1 << 4;
/// The agent has a file guard (`[agents.files]`): opens outside its `FILE_ALLOW` prefixes are
/// refused (BPF LSM) or reported to the daemon (the open tracepoints, elsewhere).
pub const AGENT_FLAG_FILES: u32 = 1 << 5;
/// The agent has API scopes: it may reach the daemon's gateway ([`GatewayAddr`]), also while
/// its egress is revoked (the gateway answers it 403 or 401 itself, rather than the kernel
/// leaving its SDK waiting on a dropped packet).
pub const AGENT_FLAG_GATEWAY: u32 = 1 << 6;
/// Count the agent's distinct destinations per second (`AgentCounters::destinations`). Only a
/// breaker judges them, and counting costs every call of the agent a clock read and an LRU
/// lookup.
pub const AGENT_FLAG_DESTINATIONS: u32 = 1 << 7;
/// Userspace bookkeeping, ignored by the kernel but kept in its map so that it survives a daemon
/// restart: the agent was killed with the kill switch and awaits `approve`.
pub const AGENT_FLAG_KILLED: u32 = 1 << 8;
/// Userspace bookkeeping as above: the agent's circuit breaker is open.
pub const AGENT_FLAG_TRIPPED: u32 = 1 << 9;

/// The scope part of a rule key: one agent's one rule generation.
#[inline(always)]
pub const fn rule_scope(agent_id: u32, generation: u32) -> u32 {
    (agent_id << 1) | (generation & 1)
}

/// Kinds of record in the event ring buffer; every record starts with this `u32`.
pub const EVENT_EGRESS_DENIED: u32 = 1;
pub const EVENT_EGRESS_CAPPED: u32 = 2;
pub const EVENT_EXEC: u32 = 3;
pub const EVENT_EXEC_DENIED: u32 = 4;
pub const EVENT_SOCKET_DENIED: u32 = 5;
pub const EVENT_SOCKET_KILLED: u32 = 6;
pub const EVENT_CGROUP_ESCAPE: u32 = 7;
/// Learn mode: an egress call the allow-list would have denied (it went through).
pub const EVENT_EGRESS_WOULD_DENY: u32 = 8;
/// An exec refused with EPERM at `lsm/bprm_check_security` (the process lives on).
pub const EVENT_EXEC_REFUSED: u32 = 9;
/// A file open refused with EACCES at `lsm/file_open` ([`FileEvent`]).
pub const EVENT_FILE_DENIED: u32 = 10;
/// Without BPF LSM: a file open of a guarded agent that the kernel could not clear, for the
/// daemon to judge ([`FileEvent`] with the syscall's arguments and result).
pub const EVENT_FILE_OPENED: u32 = 11;
/// A `bpf()` call or a signal to the daemon refused at the tamper guard's LSM hooks
/// ([`TamperEvent`]).
pub const EVENT_TAMPER_REFUSED: u32 = 12;

/// Daemon-wide settings the kernel programs read (slot 0 of the `SETTINGS` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Shallowest and deepest cgroup level at which an agent's cgroup sits (0 is the root).
    /// The programs look a task's agent up only at these ancestor levels: one or two hash
    /// lookups per call, which matters on sys_enter. `max_level == 0`: no agent yet.
    pub min_level: u32,
    pub max_level: u32,
    /// Where `child_pid` sits in the `sched/sched_process_fork` record, read from tracefs when
    /// the daemon loads: the record's layout changed between kernels (44 on 6.1 and 6.12,
    /// whose comms are `char[16]`; 20 on 6.18, whose comms are `__data_loc`). 0: not known yet
    /// (forks are then counted, but their parents not recorded).
    pub fork_child_pid: u32,
    /// `LSM_*` bits: which BPF LSM guards are attached. The tracepoints that stand in for
    /// them where the kernel has no BPF LSM (the packet-socket kill) step aside when set.
    pub lsm: u32,
}

/// The syscall monitor's per-CPU memo of the agent it found last (`CURRENT`, slot 0): valid
/// while the task's cgroup is `cgroup` and `AGENTS_GEN` is `generation`. Only the kernel
/// reads and writes it; it is here for its size, which the daemon checks pins against.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallsCache {
    pub cgroup: u64,
    pub generation: u64,
    /// The agent whose syscalls are counted; 0: none (no agent, or one not monitored).
    pub slot: u32,
    pub _pad: u32,
}

/// Where the daemon's API gateway listens (slot 0 of `GATEWAY`): TCP to it is the one egress
/// an agent with [`AGENT_FLAG_GATEWAY`] keeps when its egress is revoked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayAddr {
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    pub port: u16,
    /// 1: IPv6.
    pub v6: u8,
    /// 0: no gateway (nothing is exempt).
    pub set: u8,
}

const _: () = assert!(core::mem::size_of::<GatewayAddr>() == 20);

/// [`Settings::lsm`]: `lsm/socket_create` refuses agents' packet sockets.
pub const LSM_SOCKETS: u32 = 1 << 0;
/// [`Settings::lsm`]: `lsm/file_open` guards agents' files.
pub const LSM_FILES: u32 = 1 << 1;
/// [`Settings::lsm`]: `lsm/bprm_check_security` refuses execs outside the allow-list.
pub const LSM_EXEC: u32 = 1 << 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and have no padding
    // (asserted below), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::AgentState {}
    unsafe impl aya::Pod for super::AgentCounters {}
    unsafe impl aya::Pod for super::LearnQuota {}
    unsafe impl aya::Pod for super::ExecInodeKey {}
    unsafe impl aya::Pod for super::RuleKeyV4 {}
    unsafe impl aya::Pod for super::RuleKeyV6 {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::PortRange {}
    unsafe impl aya::Pod for super::EgressEvent {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::GatewayAddr {}
    unsafe impl aya::Pod for super::ExecKey {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::AgentLimits {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::SocketEvent {}
    unsafe impl aya::Pod for super::EscapeEvent {}
    unsafe impl aya::Pod for super::TamperEvent {}
    unsafe impl aya::Pod for super::InodeKey {}
    unsafe impl aya::Pod for super::DnsPorts {}
    unsafe impl aya::Pod for super::DnsKey {}
    unsafe impl aya::Pod for super::DnsValue {}
    unsafe impl aya::Pod for super::DnsOrig {}
    unsafe impl aya::Pod for super::ByteCap {}
    unsafe impl aya::Pod for super::RuleHitKey {}
    unsafe impl aya::Pod for super::Seen {}
    unsafe impl aya::Pod for super::LearnNameKey {}
    unsafe impl aya::Pod for super::LearnName {}
    unsafe impl aya::Pod for super::FilePath {}
    unsafe impl aya::Pod for super::FileDirKey {}
    unsafe impl aya::Pod for super::FileEvent {}
}

const _: () = assert!(core::mem::size_of::<AgentState>() == 16);
const _: () = assert!(core::mem::size_of::<Settings>() == 16);
