//! Per-agent syscall counts (raw tracepoint sys_enter).
//!
//! Every syscall on the host passes here while this is attached, so the daemon attaches it only
//! while some agent has `monitor.syscalls = true`, and it counts only those agents.
//!
//! What each CPU found last is cached ([`CURRENT`]): a task runs many syscalls in a row, and
//! on a hit the agent is found with one helper and two array reads instead of a hash lookup per
//! cgroup level. A cached entry holds while its task's cgroup and the daemon's count of
//! [`AGENTS`](crate::agent::AGENTS) writes ([`AGENTS_GEN`]) are unchanged: the daemon adds to
//! that count after each write, so a change is seen by the next syscall after it.

use agentwatch_common::{AGENT_FLAG_MONITOR_SYSCALLS, SyscallsCache};
use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id,
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};

use crate::agent::{AGENTS_GEN, counters, current_agent};

/// This CPU's last answer (slot 0).
#[map]
static CURRENT: PerCpuArray<SyscallsCache> = PerCpuArray::with_max_entries(1, 0);

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn syscalls_sys_enter(_ctx: RawTracePointContext) -> i32 {
    let Some(generation) = AGENTS_GEN.get(0).copied() else {
        return 0;
    };
    let Some(cache) = CURRENT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: this CPU's slot; nothing else touches it while the program runs (no preemption
    // inside a BPF program, and a per-CPU value is this CPU's alone).
    let cache = unsafe { &mut *cache };
    if cache.cgroup != cgroup || cache.generation != generation {
        let slot = match current_agent() {
            Some(state) if state.flags & AGENT_FLAG_MONITOR_SYSCALLS != 0 => state.id,
            _ => 0,
        };
        *cache = SyscallsCache {
            cgroup,
            generation,
            slot,
            _pad: 0,
        };
    }
    // Slot 0 is no agent's: a task outside every counted agent.
    if cache.slot != 0
        && let Some(c) = counters(cache.slot)
    {
        c.syscalls += 1;
    }
    0
}
