//! Exec and fork telemetry and the exec allow-list (sched tracepoints).
//!
//! Attached host-wide, they act only on agents' tasks. An exec of a path that is not on an
//! agent's allow-list gets SIGKILL from the tracepoint itself: the new image never runs a
//! single user instruction, whatever the daemon is doing.

use agentwatch_common::{
    AGENT_FLAG_EXEC_ALLOW, AGENT_FLAG_LEARN, EVENT_EXEC, EVENT_EXEC_DENIED, EVENT_EXEC_REFUSED,
    EXEC_PATH_MAX, ExecEvent, ExecKey, MAX_AGENTS,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_ktime_get_ns, bpf_send_signal},
    },
    macros::{lsm, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{LsmContext, TracePointContext},
};

use crate::{
    agent::{
        BREAKER_TRIPS, EVENTS, SETTINGS, count_lost_event, counters, current_agent,
        current_agent_key,
    },
    egress::{CapKind, over_limit},
    learn,
    sockets::TASKS,
};

/// Allowed exec paths per agent (value unused).
#[map]
static EXEC_ALLOW: HashMap<ExecKey, u8> = HashMap::with_max_entries(MAX_AGENTS * 64, 0);

/// Parent tgid of agent tasks, recorded at fork (the exec tracepoint does not carry it).
#[map]
static PARENTS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);

/// Scratch key (too large for the 512-byte stack).
#[map]
static SCRATCH: PerCpuArray<ExecKey> = PerCpuArray::with_max_entries(1, 0);

const SIGKILL: u32 = 9;

/// Offset in the exec tracepoint's record (/sys/kernel/tracing/events/sched/*/format; the
/// same from 6.1 to 6.18). The fork record's layout changed between kernels: its `child_pid`
/// offset comes from the daemon, which reads it from tracefs (`Settings::fork_child_pid`).
const EXEC_FILENAME_LOC: usize = 8;

/// Offset of `filename` in `struct linux_binprm` on the running kernel, from its BTF (written
/// into `.rodata` by the daemon before loading; aya-ebpf has no CO-RE).
#[unsafe(no_mangle)]
static BPRM_FILENAME: u32 = 0;

const EPERM: i32 = 1;

/// With BPF LSM: an exec outside the agent's allow-list fails with EPERM before the new
/// image replaces the caller, which lives on (the tracepoint's SIGKILL is for kernels
/// without it). `bprm->filename` is the path the tracepoint reports, so both judge alike.
#[lsm(hook = "bprm_check_security")]
pub fn exec_bprm_check_security(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    if state.flags & AGENT_FLAG_EXEC_ALLOW == 0 {
        return 0;
    }
    let Some(key) = SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch slot, this program's alone while it runs.
    let key = unsafe { &mut *key };
    key.agent = state.id;
    key.path = [0; EXEC_PATH_MAX + 1];
    let bprm: *const u8 = ctx.arg(0);
    // SAFETY: a read-only global the loader fills (volatile: loaded, not folded); `bprm` is
    // the hook's `struct linux_binprm *` and the offset its `filename` field's here.
    let filename = unsafe {
        let off = core::ptr::read_volatile(&BPRM_FILENAME) as usize;
        core::ptr::read_volatile(bprm.add(off).cast::<*const u8>())
    };
    // SAFETY: a kernel string, read through the helper.
    if unsafe { bpf_probe_read_kernel_str_bytes(filename, &mut key.path) }.is_err() {
        // A path that cannot be read matches no entry: refused, as the tracepoint would kill.
        key.path = [0; EXEC_PATH_MAX + 1];
    }
    #[allow(clippy::needless_borrows_for_generic_args, reason = "see on_exec")]
    // SAFETY: HashMap values are copied out at once.
    let allowed = unsafe { EXEC_ALLOW.get(&*key) }.is_some();
    if allowed {
        return 0;
    }
    if state.flags & AGENT_FLAG_LEARN != 0 {
        learn::record_exec(key, true);
    }
    if let Some(c) = counters(state.id) {
        c.execs_denied += 1;
    }
    report(state.id, EVENT_EXEC_REFUSED, key);
    -EPERM
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn exec_sched_process_exec(ctx: TracePointContext) -> u32 {
    on_exec(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn exec_sched_process_fork(ctx: TracePointContext) -> u32 {
    let Some((key, state)) = current_agent_key() else {
        return 0;
    };
    if let Some(c) = counters(state.id) {
        c.forks += 1;
    }
    // BREAKER_TRIPS is the daemon's; one reference from a program keeps the linker from
    // dropping it from the object (an array lookup on a rare event costs nothing).
    let _ = BREAKER_TRIPS.get_ptr(state.id);
    let offset = SETTINGS.get(0).map_or(0, |s| s.fork_child_pid) as usize;
    if offset == 0 {
        return 0;
    }
    // SAFETY: reading the tracepoint's own record at the offset its format gives.
    if let Ok(child) = unsafe { ctx.read_at::<i32>(offset) } {
        let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = PARENTS.insert(child as u32, parent, 0);
        // The child belongs to the parent's agent wherever it moves later (the escape check).
        // A new thread lands here too (the record does not tell): its entry is harmless and
        // goes when the thread exits (sockets_sched_process_exit).
        let _ = TASKS.insert(child as u32, key, 0);
    }
    0
}

#[inline(always)]
fn on_exec(ctx: &TracePointContext) {
    let Some(state) = current_agent() else {
        return;
    };
    let Some(key) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, this program's alone while it runs.
    let key = unsafe { &mut *key };
    key.agent = state.id;
    key.path = [0; EXEC_PATH_MAX + 1];
    // SAFETY: reading the tracepoint's own record; __data_loc holds offset (low 16 bits).
    let loc = unsafe { ctx.read_at::<u32>(EXEC_FILENAME_LOC) }.unwrap_or(0);
    let filename = (loc & 0xffff) as usize;
    // An unreadable path is left zeroed by the helper: it matches no entry.
    // SAFETY: the string lies inside the tracepoint record.
    let _ = unsafe {
        bpf_probe_read_kernel_str_bytes(ctx.as_ptr().cast::<u8>().add(filename), &mut key.path)
    };
    // The key is passed by reference on purpose: by value it would be a 256-byte copy on the
    // 512-byte stack; as is, the helper reads it straight from the scratch map.
    #[allow(clippy::needless_borrows_for_generic_args, reason = "see above")]
    // SAFETY: HashMap values are copied out at once.
    let allowed =
        state.flags & AGENT_FLAG_EXEC_ALLOW == 0 || unsafe { EXEC_ALLOW.get(&*key) }.is_some();
    if !allowed {
        // SAFETY: signals the current task, which is the agent's exec'ing process.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    if state.flags & AGENT_FLAG_LEARN != 0 {
        learn::record_exec(key, !allowed);
    }
    if let Some(c) = counters(state.id) {
        if allowed {
            c.execs += 1;
        } else {
            c.execs_denied += 1;
        }
    }
    let kind = if allowed {
        EVENT_EXEC
    } else {
        EVENT_EXEC_DENIED
    };
    report(state.id, kind, key);
}

/// Sends the daemon an exec record of `kind` for the current task. Under the agent's event
/// rate like denials: a fork+exec loop cannot flood the trail; the daemon summarises what is
/// counted here instead.
#[inline(always)]
fn report(agent: u32, kind: u32, key: &ExecKey) {
    if over_limit(agent, CapKind::Events) {
        if let Some(c) = counters(agent) {
            c.execs_suppressed += 1;
        }
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: LRU values are plain integers copied out at once.
    let ppid = unsafe { PARENTS.get(pid) }.copied().unwrap_or(0);
    let event = entry.as_mut_ptr();
    // SAFETY: writing every field of the reserved record before submitting it.
    unsafe {
        (*event).kind = kind;
        (*event).agent = agent;
        (*event).pid = pid;
        (*event).ppid = ppid;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).path = key.path;
    }
    entry.submit(0);
}
