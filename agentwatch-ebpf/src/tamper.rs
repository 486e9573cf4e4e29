//! The tamper guard (BPF LSM, host-wide, acts on agents' tasks only): what would reach
//! agentwatch itself is refused with EPERM, root or not.
//!
//! - `tamper_bpf` (`lsm/bpf`): an agent's task may make no `bpf()` call at all. A pinned link
//!   opened with `BPF_OBJ_GET` needs only the pin file's permissions, and `BPF_LINK_DETACH` on
//!   it then needs nothing more: a root agent could switch its own guard off. An agent has no
//!   business with BPF, so every command is refused, not just those on agentwatch's objects.
//! - `tamper_task_kill` (`lsm/task_kill`): no signal from an agent's task reaches the daemon
//!   (its tgid is in `TAMPER_DAEMON`, written by the daemon at start).
//!
//! Without BPF LSM there is no such hook: a root agent can do both, and the daemon notices
//! (its links are checked every second, a restarted daemon says how the last one ended).

use agentwatch_common::{EVENT_TAMPER_REFUSED, TAMPER_BPF, TAMPER_SIGNAL, TamperEvent};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::bpf_ktime_get_ns,
    },
    macros::{lsm, map},
    maps::Array,
    programs::LsmContext,
};

use crate::{
    agent::{EVENTS, count_lost_event, counters, current_agent},
    egress::{CapKind, over_limit},
};

/// The daemon's tgid (slot 0; 0: no daemon has said yet).
#[map]
static TAMPER_DAEMON: Array<u32> = Array::with_max_entries(1, 0);

/// Offset of `tgid` in `struct task_struct` on the running kernel, from its BTF (written into
/// `.rodata` by the daemon before loading; aya-ebpf has no CO-RE).
#[unsafe(no_mangle)]
static TASK_TGID: u32 = 0;

const EPERM: i32 = 1;

#[lsm(hook = "bpf")]
pub fn tamper_bpf(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    let cmd: i32 = ctx.arg(0);
    refuse(state.id, TAMPER_BPF, cmd as u32, 0);
    -EPERM
}

#[lsm(hook = "task_kill")]
pub fn tamper_task_kill(ctx: LsmContext) -> i32 {
    let Some(daemon) = TAMPER_DAEMON.get(0).copied() else {
        return 0;
    };
    if daemon == 0 {
        return 0;
    }
    let Some(state) = current_agent() else {
        return 0;
    };
    let target: *const u8 = ctx.arg(0);
    // SAFETY: read-only global the loader fills; volatile so it is loaded, not folded.
    let offset = unsafe { core::ptr::read_volatile(&TASK_TGID) } as usize;
    if offset == 0 {
        return 0;
    }
    // SAFETY: `target` is the hook's `struct task_struct *`; the offset is its `tgid` field's
    // on this kernel; the read is checked by the helper.
    let Ok(tgid) = (unsafe { bpf_probe_read_kernel(target.add(offset).cast::<i32>()) }) else {
        return 0;
    };
    if tgid as u32 != daemon {
        return 0;
    }
    let sig: i32 = ctx.arg(2);
    refuse(state.id, TAMPER_SIGNAL, sig as u32, daemon);
    -EPERM
}

#[inline(always)]
fn refuse(agent: u32, what: u32, arg: u32, target: u32) {
    if let Some(c) = counters(agent) {
        c.tamper_refused += 1;
    }
    // A loop of refused calls costs nothing but this; under the agent's event rate like
    // denials, the rest counted.
    if over_limit(agent, CapKind::Events) {
        if let Some(c) = counters(agent) {
            c.tamper_suppressed += 1;
        }
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<TamperEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    entry.write(TamperEvent {
        kind: EVENT_TAMPER_REFUSED,
        agent,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or_default(),
        what,
        arg,
        target,
        _pad: 0,
    });
    entry.submit(0);
}
