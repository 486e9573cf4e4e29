//! Socket guards and cgroup escapes.
//!
//! - `sockets_create` (cgroup sock_create, per agent cgroup): inet raw sockets are refused.
//! - `sockets_sys_enter_socket` (host-wide): a packet socket costs the agent process its life.
//!   The sock_create hook never sees it (it runs for inet sockets only), and a packet socket
//!   sends frames past every cgroup egress hook.
//! - `sockets_cgroup_attach_task` (host-wide): an agent process moved out of its agent's
//!   subtree would leave the egress hooks behind; the move is killed where the kernel allows,
//!   otherwise the process is doomed: the daemon kills it as soon as it reads the event, and
//!   the kernel at its next socket() call. (A hook on every connect and send of the host to
//!   catch it sooner measured +300-440 ns on each UDP send of every process: not paid.)
//! - `clone3(CLONE_INTO_CGROUP)` starts a child straight in another cgroup, and no
//!   `cgroup_attach_task` fires for it. With BPF LSM, `sockets_task_alloc` refuses the flag
//!   to agent tasks (EPERM: the hook runs before the kernel opens the target cgroup, so it
//!   cannot tell an inside target from an outside one). Elsewhere, `sockets_task_newtask`
//!   (raw tracepoint, before the child first runs) reads the child's cgroup: outside its
//!   agent, the cloning task dies at once and the child is doomed (killed at its first
//!   socket() call by the kernel, and by the daemon when it reads the event).
//! - `sockets_sched_process_exit` keeps `TASKS` and `DOOMED` free of dead processes, so a reused
//!   pid is never taken for an agent's.

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xsub};

use agentwatch_common::{
    CLONE_INTO_CGROUP, ESCAPE_FLAG_CLONE, ESCAPE_FLAG_MOVED_DOOMED, ESCAPE_FLAG_MOVED_KILLED,
    ESCAPE_FLAG_REFUSED, ESCAPE_FLAG_WRITER_KILLED, ESCAPE_PATH_MAX, EVENT_CGROUP_ESCAPE,
    EVENT_SOCKET_DENIED, EVENT_SOCKET_KILLED, EscapeEvent, LSM_SOCKETS, SocketEvent, UNKNOWN_AGENT,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_ktime_get_ns, bpf_send_signal},
    },
    macros::{cgroup_sock, lsm, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap},
    programs::{LsmContext, RawTracePointContext, SockContext, TracePointContext},
};

use crate::{
    agent::{
        AGENTS, EVENTS, SETTINGS, count_lost_event, counters, current_agent, current_agent_key,
    },
    limits::{CapKind, over_limit},
};

/// Process (tgid) -> key in `AGENTS` of the agent it belongs to. Filled at fork (exec.rs), by
/// moves into an agent (below) and by the daemon for processes already in an agent's cgroup;
/// emptied at exit. The escape check needs it because the tracepoint fires after the move,
/// when the moved task's cgroup no longer says where it came from.
#[map]
pub static TASKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(262_144, 0);

/// Cgroup id -> key in `AGENTS` of the agent whose subtree holds it, for every cgroup nested
/// below an agent's cgroup. Written by the daemon.
#[map]
static NESTED: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);

/// Escaped processes (tgid -> agent id) that could not be signalled when they moved: killed
/// at their next socket/connect/send syscall. Entries go when the process exits.
#[map]
static DOOMED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Slot 0: how many entries DOOMED holds, kept by the kernel (and reset by the daemon if it
/// cleans DOOMED up itself). Zero, the common case, lets the host-wide socket() hook skip the
/// hash lookup; it is only a hint (any non-zero value, even one that wrapped, means "look").
#[map]
static DOOMED_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// What the cgroup sock hooks return; 0 makes socket() fail with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const SIGKILL: u32 = 9;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_PACKET: u32 = 17;
const SOCK_RAW: u32 = 3;
/// Obsolete: socket(AF_INET, SOCK_PACKET) is rewritten by the kernel into a packet socket.
const SOCK_PACKET: u32 = 10;
/// Low bits of socket()'s type argument; the rest are SOCK_NONBLOCK / SOCK_CLOEXEC.
const SOCK_TYPE_MASK: u32 = 0xf;

/// Hierarchy id of cgroup v2 in cgroup_attach_task's `dst_root`: cgroup v2 (cgrp_dfl_root) is
/// always hierarchy 0, v1 hierarchies count from 1. Measured here by moving a process between
/// two v2 cgroups with the event enabled in tracefs (dst_root=0) and through a v1 `pids`
/// cgroup (dst_root=8, its number in /proc/cgroups).
const CGROUP2_ROOT: i32 = 0;

/// Offsets in the tracepoints' records (/sys/kernel/tracing/events/*/*/format).
const SOCKET_FAMILY: usize = 16;
const SOCKET_TYPE: usize = 24;
const SOCKET_PROTOCOL: usize = 32;
const ATTACH_DST_ROOT: usize = 8;
const ATTACH_DST_LEVEL: usize = 12;
const ATTACH_DST_ID: usize = 16;
const ATTACH_PID: usize = 24;
const ATTACH_DST_PATH_LOC: usize = 28;

#[cgroup_sock(sock_create)]
pub fn sockets_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands sock programs a valid bpf_sock context.
    let sk = unsafe { &*ctx.sock };
    let (family, sock_type, protocol) = (sk.family, sk.type_, sk.protocol);
    if sock_type != SOCK_RAW || (family != AF_INET && family != AF_INET6) {
        return ALLOW;
    }
    // Attached to agents' cgroups only; a caller matched to no agent is refused all the same
    // (fail closed, counted in the unknown agent's slot), as the egress hooks do.
    let id = current_agent().map_or(UNKNOWN_AGENT, |s| s.id);
    if let Some(c) = counters(id) {
        c.raw_sockets_denied += 1;
    }
    if over_limit(id, CapKind::Events) {
        if let Some(c) = counters(id) {
            c.sockets_suppressed += 1;
        }
    } else {
        emit_socket(EVENT_SOCKET_DENIED, id, family, sock_type, protocol);
    }
    DENY
}

const EPERM: i32 = 1;

/// With BPF LSM: an agent's packet socket fails with EPERM and the process lives on (the
/// tracepoint below kills instead where the kernel has no BPF LSM). Sockets the kernel makes
/// for itself (`kern`) are not the agent's doing.
#[lsm(hook = "socket_create")]
pub fn sockets_socket_create(ctx: LsmContext) -> i32 {
    let (family, sock_type, protocol, kern): (i32, i32, i32, i32) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    if kern != 0 || !is_packet(family as u32, sock_type as u32) {
        return 0;
    }
    let Some(state) = current_agent() else {
        return 0;
    };
    if let Some(c) = counters(state.id) {
        c.packet_sockets_denied += 1;
    }
    if over_limit(state.id, CapKind::Events) {
        if let Some(c) = counters(state.id) {
            c.sockets_suppressed += 1;
        }
    } else {
        emit_socket(
            EVENT_SOCKET_DENIED,
            state.id,
            family as u32,
            sock_type as u32,
            protocol as u32,
        );
    }
    -EPERM
}

#[inline(always)]
fn is_packet(family: u32, sock_type: u32) -> bool {
    family == AF_PACKET
        || ((family == AF_INET || family == AF_INET6) && sock_type & SOCK_TYPE_MASK == SOCK_PACKET)
}

#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn sockets_sys_enter_socket(ctx: TracePointContext) -> u32 {
    kill_if_doomed();
    // Every socket() on the host comes here: the arguments are checked (two loads) before
    // the agent (one to a few map lookups).
    let family = tp_u64(&ctx, SOCKET_FAMILY) as u32;
    let sock_type = tp_u64(&ctx, SOCKET_TYPE) as u32;
    if !is_packet(family, sock_type) {
        return 0;
    }
    // lsm/socket_create refuses it with EPERM: nothing to kill.
    if SETTINGS.get(0).is_some_and(|s| s.lsm & LSM_SOCKETS != 0) {
        return 0;
    }
    let Some(state) = current_agent() else {
        return 0;
    };
    // SAFETY: signals the current task, the agent's process calling socket().
    unsafe { bpf_send_signal(SIGKILL) };
    if let Some(c) = counters(state.id) {
        c.packet_sockets_killed += 1;
    }
    // Each costs the agent a process, but a fork loop makes thousands a second: under the
    // agent's event rate like denials.
    if over_limit(state.id, CapKind::Events) {
        if let Some(c) = counters(state.id) {
            c.sockets_suppressed += 1;
        }
        return 0;
    }
    let protocol = tp_u64(&ctx, SOCKET_PROTOCOL) as u32;
    emit_socket(EVENT_SOCKET_KILLED, state.id, family, sock_type, protocol);
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn sockets_cgroup_attach_task(ctx: TracePointContext) -> u32 {
    on_attach(&ctx);
    0
}

/// Offsets from the running kernel's BTF for reading a new task's cgroup id
/// (`task->cgroups->dfl_cgrp->kn->id`) and its tgid, written into `.rodata` by the daemon
/// before loading (aya-ebpf has no CO-RE). 0 for all: the kernel's BTF did not say, and a
/// clone into a cgroup is then taken for an escape (fail closed).
#[unsafe(no_mangle)]
static NEW_TASK_CGROUPS: u32 = 0;
#[unsafe(no_mangle)]
static NEW_CSS_SET_DFL_CGRP: u32 = 0;
#[unsafe(no_mangle)]
static NEW_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static NEW_KERNFS_NODE_ID: u32 = 0;
#[unsafe(no_mangle)]
static NEW_TASK_TGID: u32 = 0;

/// With BPF LSM: `clone3(CLONE_INTO_CGROUP)` by an agent task fails with EPERM, whatever the
/// target (the hook runs before the kernel resolves the cgroup fd; a nested cgroup of the
/// agent's is refused too: its processes can still move there by `cgroup.procs`).
#[lsm(hook = "task_alloc")]
pub fn sockets_task_alloc(ctx: LsmContext) -> i32 {
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_INTO_CGROUP == 0 {
        return 0;
    }
    let Some((_, state)) = current_agent_key() else {
        return 0;
    };
    if let Some(c) = counters(state.id) {
        c.cgroup_escapes += 1;
    }
    let me = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit_clone_escape(state.id, me, me, 0, ESCAPE_FLAG_CLONE | ESCAPE_FLAG_REFUSED);
    -EPERM
}

/// A child started by `clone3(CLONE_INTO_CGROUP)`: runs in the parent, after the child's
/// cgroup is set and before the child first runs (`copy_process`).
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn sockets_task_newtask(ctx: RawTracePointContext) -> i32 {
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_INTO_CGROUP == 0 {
        return 0;
    }
    let Some((src_key, state)) = current_agent_key() else {
        return 0;
    };
    let task: *const u8 = ctx.arg(0);
    let (dst_id, child) = new_task_cgroup(task);
    if dst_id != 0 && dst_agent(dst_id, false) == Some(src_key) {
        // Into a cgroup nested below its own agent's: still guarded there.
        return 0;
    }
    if let Some(c) = counters(state.id) {
        c.cgroup_escapes += 1;
    }
    let mut flags = ESCAPE_FLAG_CLONE;
    // SAFETY: signals the current task, the agent task that cloned outside its agent.
    if unsafe { bpf_send_signal(SIGKILL) } == 0 {
        flags |= ESCAPE_FLAG_WRITER_KILLED;
    }
    // BPF can signal only the current task: the child dies at its first socket() call, and
    // the daemon kills it as it reads the event (it never got to run before that either way:
    // the parent is still in clone3).
    if child != 0 {
        match DOOMED.insert(child, state.id, BPF_NOEXIST as u64) {
            Ok(()) => {
                add_doomed_count(true);
                flags |= ESCAPE_FLAG_MOVED_DOOMED;
            }
            Err(_) if DOOMED.get_ptr(child).is_some() => flags |= ESCAPE_FLAG_MOVED_DOOMED,
            Err(_) => {}
        }
    }
    let writer = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit_clone_escape(state.id, child, writer, dst_id, flags);
    0
}

/// The new task's cgroup id (0: unreadable) and tgid (0: unreadable).
#[inline(always)]
fn new_task_cgroup(task: *const u8) -> (u64, u32) {
    // SAFETY: read-only globals the loader fills (volatile: loaded, not folded).
    let (cgroups, dfl, kn, id, tgid) = unsafe {
        (
            core::ptr::read_volatile(&NEW_TASK_CGROUPS) as usize,
            core::ptr::read_volatile(&NEW_CSS_SET_DFL_CGRP) as usize,
            core::ptr::read_volatile(&NEW_CGROUP_KN) as usize,
            core::ptr::read_volatile(&NEW_KERNFS_NODE_ID) as usize,
            core::ptr::read_volatile(&NEW_TASK_TGID) as usize,
        )
    };
    if cgroups == 0 || kn == 0 || id == 0 {
        return (0, 0);
    }
    // SAFETY: kernel pointers read through the helper, which fails cleanly on a bad one;
    // `task` is the tracepoint's `struct task_struct *`.
    unsafe {
        let child = if tgid == 0 {
            0
        } else {
            bpf_probe_read_kernel(task.add(tgid).cast::<i32>()).unwrap_or(0) as u32
        };
        let Ok(css_set) = bpf_probe_read_kernel(task.add(cgroups).cast::<*const u8>()) else {
            return (0, child);
        };
        let Ok(cgrp) = bpf_probe_read_kernel(css_set.add(dfl).cast::<*const u8>()) else {
            return (0, child);
        };
        let Ok(node) = bpf_probe_read_kernel(cgrp.add(kn).cast::<*const u8>()) else {
            return (0, child);
        };
        (
            bpf_probe_read_kernel(node.add(id).cast::<u64>()).unwrap_or(0),
            child,
        )
    }
}

/// A `cgroup_escape` record for a clone into a cgroup (no tracepoint record to copy the
/// destination path from: the daemon names it from `dst_id` or the child's /proc).
#[inline(always)]
fn emit_clone_escape(agent: u32, pid: u32, writer: u32, dst_id: u64, flags: u32) {
    let Some(mut entry) = EVENTS.reserve::<EscapeEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: writing every field of the reserved record before submitting it.
    unsafe {
        (*event).kind = EVENT_CGROUP_ESCAPE;
        (*event).agent = agent;
        (*event).pid = pid;
        (*event).writer = writer;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).dst_id = dst_id;
        (*event).dst_level = 0;
        (*event).flags = flags;
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).dst_path = [0; ESCAPE_PATH_MAX];
    }
    entry.submit(0);
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sockets_sched_process_exit(_ctx: TracePointContext) -> u32 {
    // Runs in the exiting task. Keyed by its thread id, not its tgid: the group leader
    // (pid == tgid) removes the process's entries, and any other thread removes only the
    // entry the fork hook made for it as if it were a process. No live process can have a
    // tgid equal to a non-leader thread's id, so nothing live is lost.
    let pid = bpf_get_current_pid_tgid() as u32;
    if TASKS.get_ptr(pid).is_some() {
        let _ = TASKS.remove(pid);
    }
    if doomed_count() != 0 && DOOMED.remove(pid).is_ok() {
        add_doomed_count(false);
    }
    0
}

/// A u64 field of a tracepoint record, read straight from the context (cheaper than
/// bpf_probe_read on the host-wide hooks; the verifier allows aligned loads of the record).
#[inline(always)]
fn tp_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: a constant, aligned offset inside the tracepoint's record.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>()) }
}

#[inline(always)]
fn doomed_count() -> u64 {
    DOOMED_COUNT.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn add_doomed_count(up: bool) {
    if let Some(p) = DOOMED_COUNT.get_ptr_mut(0) {
        // SAFETY: an aligned u64 map value; every kernel writer uses these atomics.
        unsafe {
            if up {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1);
            } else {
                atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1);
            }
        }
    }
}

/// SIGKILL for a process that escaped its agent and could not be signalled at the move.
#[inline(always)]
fn kill_if_doomed() {
    if doomed_count() == 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if DOOMED.get_ptr(tgid).is_some() {
        // SAFETY: signals the current task, the doomed process itself.
        unsafe { bpf_send_signal(SIGKILL) };
    }
}

#[inline(always)]
fn emit_socket(kind: u32, agent: u32, family: u32, sock_type: u32, protocol: u32) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    entry.write(SocketEvent {
        kind,
        agent,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or_default(),
        family,
        sock_type,
        protocol,
        _pad: 0,
    });
    entry.submit(0);
}

/// The agent key a live `TASKS` entry names, with the agent's state (None once the agent
/// is no longer guarded).
#[inline(always)]
fn agent_of_task(pid: u32) -> Option<(u64, u32)> {
    // SAFETY: map values are plain integers copied out at once.
    let key = unsafe { TASKS.get(pid) }.copied()?;
    // SAFETY: as above.
    let state = unsafe { AGENTS.get(key) }?;
    Some((key, state.id))
}

#[inline(always)]
fn on_attach(ctx: &TracePointContext) {
    // cgroup v1 hierarchies on a hybrid host fire too; only v2 carries the agents.
    if tp_u32(ctx, ATTACH_DST_ROOT) as i32 != CGROUP2_ROOT {
        return;
    }
    let pid = tp_u32(ctx, ATTACH_PID);
    let dst_id = tp_u64(ctx, ATTACH_DST_ID);
    let writer = (bpf_get_current_pid_tgid() >> 32) as u32;
    let self_move = writer == pid;
    let dst = dst_agent(dst_id, self_move);
    // The daemon is no agent's process, wherever it is put: a root agent on a cgroup2 mount
    // without nsdelegate can write its pid into its own cgroup.procs (to freeze or kill it
    // there). It is not taken for the agent's (its move back out would be an escape that
    // costs its life), and an agent task that put it there dies before its write returns.
    // The daemon finds itself there within a second and leaves (`daemon_moved`).
    let daemon = crate::tamper::daemon_tgid();
    if daemon != 0 && pid == daemon {
        if dst.is_some() && !self_move && current_agent_key().is_some() {
            // SAFETY: signals the current task, the agent task that moved the daemon.
            unsafe { bpf_send_signal(SIGKILL) };
        }
        return;
    }
    let Some((src_key, src_id)) = agent_of_task(pid) else {
        // Not an agent process. Moving into an agent (`agentwatch launch` moves itself in)
        // makes it one.
        if let Some(dst_key) = dst {
            let _ = TASKS.insert(pid, dst_key, 0);
        }
        return;
    };
    if dst == Some(src_key) {
        // A move inside its own agent's subtree.
        return;
    }
    if let Some(c) = counters(src_id) {
        c.cgroup_escapes += 1;
    }
    let mut flags = 0;
    if self_move {
        // SAFETY: signals the current task, the moved process; it dies before its write to
        // cgroup.procs returns.
        if unsafe { bpf_send_signal(SIGKILL) } == 0 {
            flags |= ESCAPE_FLAG_MOVED_KILLED;
        }
    } else {
        // An agent task moving processes out (of its own agent or another) is hostile.
        // SAFETY: signals the current task, the writer.
        if current_agent_key().is_some() && unsafe { bpf_send_signal(SIGKILL) } == 0 {
            flags |= ESCAPE_FLAG_WRITER_KILLED;
        }
        // BPF can signal only the current task: the moved one dies at its next socket call.
        match DOOMED.insert(pid, src_id, BPF_NOEXIST as u64) {
            Ok(()) => {
                add_doomed_count(true);
                flags |= ESCAPE_FLAG_MOVED_DOOMED;
            }
            // Already doomed by an earlier move.
            Err(_) if DOOMED.get_ptr(pid).is_some() => flags |= ESCAPE_FLAG_MOVED_DOOMED,
            Err(_) => {}
        }
    }
    emit_escape(ctx, src_id, pid, writer, dst_id, flags);
}

/// The agent (its `AGENTS` key) whose subtree the destination cgroup lies in.
#[inline(always)]
fn dst_agent(dst_id: u64, self_move: bool) -> Option<u64> {
    if self_move {
        // The writer has just moved: its own cgroup is the destination, and the ancestor walk
        // finds its agent exactly, nested cgroups included.
        return current_agent_key().map(|(key, _)| key);
    }
    // SAFETY: map values are plain integers copied out at once.
    if unsafe { AGENTS.get(dst_id) }.is_some() {
        return Some(dst_id);
    }
    // SAFETY: as above.
    unsafe { NESTED.get(dst_id) }.copied()
}

#[inline(always)]
fn tp_u32(ctx: &TracePointContext, offset: usize) -> u32 {
    // SAFETY: a constant, aligned offset inside the tracepoint's record.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(offset).cast::<u32>()) }
}

#[inline(always)]
fn emit_escape(
    ctx: &TracePointContext,
    agent: u32,
    pid: u32,
    writer: u32,
    dst_id: u64,
    flags: u32,
) {
    // A process the daemon must kill is always reported; the others (killed here already) are
    // under the agent's event rate, so a fork+move loop cannot flood the trail.
    if flags & ESCAPE_FLAG_MOVED_DOOMED == 0 && over_limit(agent, CapKind::Events) {
        if let Some(c) = counters(agent) {
            c.escapes_suppressed += 1;
        }
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<EscapeEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let loc = tp_u32(ctx, ATTACH_DST_PATH_LOC);
    let event = entry.as_mut_ptr();
    // SAFETY: writing every field of the reserved record before submitting it; the path lies
    // inside the tracepoint record (__data_loc: offset in the low 16 bits).
    unsafe {
        (*event).kind = EVENT_CGROUP_ESCAPE;
        (*event).agent = agent;
        (*event).pid = pid;
        (*event).writer = writer;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).dst_id = dst_id;
        (*event).dst_level = tp_u32(ctx, ATTACH_DST_LEVEL);
        (*event).flags = flags;
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).dst_path = [0; ESCAPE_PATH_MAX];
        let _ = bpf_probe_read_kernel_str_bytes(
            ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize),
            &mut (*event).dst_path,
        );
    }
    entry.submit(0);
}
