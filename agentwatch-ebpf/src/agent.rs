//! Which agent is the current task? Shared by every hook.

use agentwatch_common::{
    AGENT_FLAG_GATEWAY, AgentCounters, AgentState, GatewayAddr, MAX_AGENTS, MAX_CGROUP_DEPTH,
    Settings,
};
use aya_ebpf::{
    helpers::generated::bpf_get_current_ancestor_cgroup_id,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};

/// Daemon-wide settings (slot 0), written by the daemon.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Agent cgroup id -> state. Written by the daemon before it attaches anything to the cgroup.
#[map]
pub static AGENTS: HashMap<u64, AgentState> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Slot 0: how many times the daemon changed [`AGENTS`]; it adds one after every write. What a
/// cache of an `AGENTS` lookup (the syscall monitor's) is valid for: an entry made under
/// another count is looked up again.
#[map]
pub static AGENTS_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// Per-agent counters, indexed by agent id.
#[map]
pub static COUNTERS: PerCpuArray<AgentCounters> = PerCpuArray::with_max_entries(MAX_AGENTS, 0);

/// Events for userspace (denied calls, execs, sockets, escapes). 1 MiB: ~16k egress events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Breaker trips per agent and action (alert, deny, freeze, kill). The daemon writes it; it
/// lives here so the counts persist with the other pinned maps across daemon restarts.
#[map]
pub static BREAKER_TRIPS: Array<[u64; 4]> = Array::with_max_entries(MAX_AGENTS, 0);

/// Where the daemon's API gateway listens (slot 0), written by the daemon at start.
#[map]
pub static GATEWAY: Array<GatewayAddr> = Array::with_max_entries(1, 0);

/// Is TCP to `addr` (IPv4 in the first 4 bytes unless `v6`) port `port` a call of an agent
/// with API scopes to the gateway? Such calls go through when the agent's egress is revoked:
/// the gateway refuses them itself, with an answer the agent's SDK understands.
#[inline(always)]
pub fn to_gateway(state: &AgentState, tcp: bool, v6: bool, addr: &[u8; 16], port: u16) -> bool {
    if state.flags & AGENT_FLAG_GATEWAY == 0 || !tcp {
        return false;
    }
    let Some(g) = GATEWAY.get(0) else {
        return false;
    };
    if g.set == 0 || g.port != port || (g.v6 != 0) != v6 {
        return false;
    }
    if v6 {
        g.addr == *addr
    } else {
        g.addr[..4] == addr[..4]
    }
}

/// Events that could not be reserved in [`EVENTS`] (slot 0).
#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Finds the agent of the calling task: the first ancestor cgroup (itself included) that is an
/// agent's. Processes may create nested cgroups below their agent's; they still belong to it.
/// Only the levels where agents sit are looked at (SETTINGS), so a task outside every agent
/// costs one or two lookups, which matters on the sys_enter hook.
#[inline(always)]
pub fn current_agent() -> Option<AgentState> {
    current_agent_key().map(|(_, state)| state)
}

/// As [`current_agent`], with the agent cgroup's id (its key in [`AGENTS`]): `TASKS` and the
/// escape check name agents by that key, which outlives a reuse of the agent id.
#[inline(always)]
pub fn current_agent_key() -> Option<(u64, AgentState)> {
    // SAFETY: helper without pointer arguments.
    agent_among_ancestors(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// The agent whose cgroup is among the ancestors `ancestor(level)` names (the calling task's,
/// or a packet's socket's), looked up only at the levels where agents sit.
#[inline(always)]
pub fn agent_among_ancestors(ancestor: impl Fn(i32) -> u64) -> Option<(u64, AgentState)> {
    let (min, max) = match SETTINGS.get(0) {
        Some(s) if s.max_level > 0 => (s.min_level as i32, s.max_level as i32),
        _ => return None,
    };
    let mut level = min;
    let mut steps = 0;
    while level <= max && steps < MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: AGENTS values are plain integers copied out at once.
        if let Some(state) = unsafe { AGENTS.get(id) } {
            return Some((id, *state));
        }
        level += 1;
        steps += 1;
    }
    None
}

/// This CPU's counters of agent `id`.
#[inline(always)]
pub fn counters(id: u32) -> Option<&'static mut AgentCounters> {
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs (no preemption).
    COUNTERS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// Counts a ring buffer record of agent `id` that could not be reserved: globally and for the
/// agent, so the daemon can tell which agent's events it is missing.
#[inline(always)]
pub fn count_lost_event(id: u32) {
    if let Some(p) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, see `counters`.
        unsafe { *p += 1 };
    }
    if let Some(c) = counters(id) {
        c.events_lost += 1;
    }
}

/// A destination as judged: IPv4 (also when it arrived v4-mapped through an AF_INET6 socket) or
/// IPv6, address bytes in network order.
pub struct Dest {
    pub v6: bool,
    pub addr: [u8; 16],
    pub port: u16,
}
