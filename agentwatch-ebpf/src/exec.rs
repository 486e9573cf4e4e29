//! Exec and fork telemetry and the exec allow-list (sched tracepoints).
//!
//! Attached host-wide, they act only on agents' tasks. An exec of a path that is not on an
//! agent's allow-list gets SIGKILL from the tracepoint itself: the new image never runs a
//! single user instruction, whatever the daemon is doing.

use agentwatch_common::{
    AGENT_FLAG_EXEC_ALLOW, AGENT_FLAG_LEARN, EVENT_EXEC, EVENT_EXEC_DENIED, EVENT_EXEC_REFUSED,
    EXEC_PATH_MAX, ExecEvent, ExecInodeKey, ExecKey, MAX_AGENTS,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task, bpf_ktime_get_ns, bpf_send_signal},
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
    learn,
    limits::{CapKind, over_limit},
    sockets::TASKS,
    tamper::{file_inode, inode_identity, inode_offsets_known, offset_known, read_at},
};

/// Allowed exec paths per agent (value unused): what an exec is judged on where the kernel's
/// BTF does not say how to reach the exec'd file.
#[map]
static EXEC_ALLOW: HashMap<ExecKey, u8> = HashMap::with_max_entries(MAX_AGENTS * 64, 0);

/// The files those paths name (agent, device, inode; value unused), written by the daemon
/// (and rewritten when a package upgrade puts a new file at an allowed path): what an exec is
/// judged on everywhere else.
#[map]
static EXEC_INODES: HashMap<ExecInodeKey, u8> = HashMap::with_max_entries(MAX_AGENTS * 64, 0);

/// Offsets from the running kernel's BTF to the exec'd file: `linux_binprm.file` (the LSM
/// hook), `task_struct.mm` and `mm_struct.exe_file` (the tracepoint, after the exec). 0:
/// unknown, and execs are judged on the path given to execve.
#[unsafe(no_mangle)]
static EXEC_BPRM_FILE: u32 = 0;
#[unsafe(no_mangle)]
static EXEC_TASK_MM: u32 = 0;
#[unsafe(no_mangle)]
static EXEC_MM_EXE_FILE: u32 = 0;

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
    let bprm_file = read_at::<*const u8>(bprm, &EXEC_BPRM_FILE).unwrap_or(core::ptr::null());
    if file_allowed(state.id, bprm_file, key) {
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
    let allowed = state.flags & AGENT_FLAG_EXEC_ALLOW == 0 || {
        // After the exec: the task's new executable is the file the kernel opened.
        // SAFETY: helper without arguments.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let mm = read_at::<*const u8>(task, &EXEC_TASK_MM).unwrap_or(core::ptr::null());
        let exe = if mm.is_null() {
            core::ptr::null()
        } else {
            read_at::<*const u8>(mm, &EXEC_MM_EXE_FILE).unwrap_or(core::ptr::null())
        };
        file_allowed(state.id, exe, key)
    };
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

/// Is the exec'd file on agent `agent`'s allow-list? Judged on the file itself (device and
/// inode) where this kernel's BTF gave the offsets to reach it; a file that cannot be read
/// then (`file` null) is refused. Elsewhere on the path given to execve (`key`). Pointers,
/// not Options: the verifier refuses a register an Option's unset payload leaves unwritten.
#[inline(always)]
fn file_allowed(agent: u32, file: *const u8, key: &ExecKey) -> bool {
    let offsets_known = inode_offsets_known()
        && offset_known(&EXEC_BPRM_FILE)
        && offset_known(&EXEC_TASK_MM)
        && offset_known(&EXEC_MM_EXE_FILE);
    if !offsets_known {
        // The key is passed by reference on purpose: by value it would be a 256-byte copy on
        // the 512-byte stack; as is, the helper reads it straight from the scratch map.
        // SAFETY: HashMap values are copied out at once.
        return unsafe { EXEC_ALLOW.get(key) }.is_some();
    }
    if file.is_null() {
        return false;
    }
    let Some(id) = file_inode(file).and_then(inode_identity) else {
        return false;
    };
    let key = ExecInodeKey {
        agent,
        dev: id.dev,
        ino: id.ino,
    };
    // SAFETY: the value is not read, only whether there is one.
    unsafe { EXEC_INODES.get(key) }.is_some()
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
