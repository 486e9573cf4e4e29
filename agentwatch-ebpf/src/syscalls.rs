//! Per-agent syscall counts (raw tracepoint sys_enter).
//!
//! Every syscall on the host passes here while this is attached, so the daemon attaches it only
//! while some agent has `monitor.syscalls = true`, and it counts only those agents.

use agentwatch_common::AGENT_FLAG_MONITOR_SYSCALLS;
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::agent::{counters, current_agent};

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn syscalls_sys_enter(_ctx: RawTracePointContext) -> i32 {
    if let Some(state) = current_agent()
        && state.flags & AGENT_FLAG_MONITOR_SYSCALLS != 0
        && let Some(c) = counters(state.id)
    {
        c.syscalls += 1;
    }
    0
}
