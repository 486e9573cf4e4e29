//! Which agent is the current task? Shared by every hook.

use agentwatch_common::{AgentCounters, AgentState, MAX_AGENTS, MAX_CGROUP_DEPTH};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};

/// Agent cgroup id -> state. Written by the daemon before it attaches anything to the cgroup.
#[map]
pub static AGENTS: HashMap<u64, AgentState> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Per-agent counters, indexed by agent id.
#[map]
pub static COUNTERS: PerCpuArray<AgentCounters> = PerCpuArray::with_max_entries(MAX_AGENTS, 0);

/// Events for userspace (denied calls, later execs). 1 MiB: ~16k egress events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events that could not be reserved in [`EVENTS`] (slot 0).
#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Finds the agent of the calling task: its own cgroup in the common case, otherwise the first
/// ancestor that is an agent's cgroup (processes may create nested cgroups below their agent's).
#[inline(always)]
pub fn current_agent() -> Option<AgentState> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: AGENTS values are plain integers copied out at once.
    if let Some(state) = unsafe { AGENTS.get(own) } {
        return Some(*state);
    }
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == own {
            break;
        }
        // SAFETY: as above.
        if let Some(state) = unsafe { AGENTS.get(id) } {
            return Some(*state);
        }
        level += 1;
    }
    None
}

/// This CPU's counters of agent `id`.
#[inline(always)]
pub fn counters(id: u32) -> Option<&'static mut AgentCounters> {
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs (no preemption).
    COUNTERS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// Counts a ring buffer record that could not be reserved.
#[inline(always)]
pub fn count_lost_event() {
    if let Some(p) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, see `counters`.
        unsafe { *p += 1 };
    }
}
