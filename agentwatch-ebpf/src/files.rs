//! The file guard (`[agents.files]`).
//!
//! - `files_file_open` (BPF LSM, host-wide, acts on agents' tasks only): an open whose path,
//!   as the kernel resolved it (`bpf_d_path`: symlinks and `..` already followed), is outside
//!   the agent's prefixes, or a write under a read-only one, fails with EACCES;
//!   `files_path_link` refuses the agent hard links (EPERM), which would give an outside file
//!   an allowed path.
//! - Where the kernel has no BPF LSM, the open syscalls' tracepoints stand in: an agent's
//!   successful open is reported to the daemon with its arguments and the fd it got, and the
//!   daemon resolves and judges it (detection, not prevention). Only a clean absolute path
//!   read under a read-only prefix is cleared here, as the agent cannot plant a symlink there
//!   through the guard; everything else, writable prefixes included, goes to the daemon.

use agentwatch_common::{
    AGENT_FLAG_FILES, EVENT_FILE_DENIED, EVENT_FILE_OPENED, FILE_ACCESS_LINK, FILE_ACCESS_READ,
    FILE_ACCESS_WRITE, FILE_EVENT_PATH, FILE_KEY_AGENT_BITS, FILE_KEY_PATH, FILE_RULE_READ_ONLY,
    FileEvent, FilePath, InodeKey,
};
use aya_ebpf::{
    bindings::path,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_probe_read_user_str_bytes,
        generated::{bpf_d_path, bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{lsm, map, tracepoint},
    maps::{LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{LsmContext, TracePointContext},
};

use crate::{
    agent::{EVENTS, count_lost_event, counters, current_agent},
    egress::{CapKind, over_limit},
    tamper::{file_inode, inode_identity, read_at},
};

/// Allowed path prefixes per agent (`FILE_RULE_*` bits as values).
#[map]
static FILE_ALLOW: LpmTrie<FilePath, u32> = LpmTrie::with_max_entries(65536, 0);

/// Scratch: the path `bpf_d_path` writes (up to PATH_MAX) and the trie key built from it,
/// both too large for the 512-byte stack.
#[map]
static FILE_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Scratch {
    key: Key<FilePath>,
    full: [u8; PATH_MAX],
}

/// Open arguments an agent thread passed to the syscall it is in (thread id -> arguments),
/// from the enter tracepoint to the exit one. No LSM needed; only guarded agents' threads.
/// LRU: an entry whose exit never came (a thread gone mid-call) cannot fill it.
#[map]
static OPENS: LruHashMap<u64, OpenArgs> = LruHashMap::with_max_entries(16384, 0);

#[derive(Clone, Copy)]
#[repr(C)]
pub struct OpenArgs {
    filename: u64,
    flags: u32,
    dirfd: i32,
}

const PATH_MAX: usize = 4096;
const EACCES: i32 = 13;
const AT_FDCWD: i32 = -100;
const O_ACCMODE: u32 = 3;
const O_WRONLY: u32 = 1;
const O_RDWR: u32 = 2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;
/// `fmode_t` bits of `struct file`.
const FMODE_WRITE: u32 = 2;

/// Offsets in `struct file` on the running kernel, from its BTF: written into `.rodata` by
/// the daemon before loading, so the verifier sees constants (a BTF pointer moved by a known
/// amount is still a typed pointer, which `bpf_d_path` needs). aya-ebpf has no CO-RE.
#[unsafe(no_mangle)]
static FILE_F_PATH: u32 = 0;
#[unsafe(no_mangle)]
static FILE_F_MODE: u32 = 0;

#[lsm(hook = "file_open")]
pub fn files_file_open(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    if state.flags & AGENT_FLAG_FILES == 0 {
        return 0;
    }
    let Some(scratch) = FILE_SCRATCH.get_ptr_mut(0) else {
        return -EACCES;
    };
    // SAFETY: per-CPU scratch slot, this program's alone while it runs.
    let scratch = unsafe { &mut *scratch };
    let file: *const u8 = ctx.arg(0);
    // SAFETY: read-only globals the loader fills; volatile so they are loaded, not folded.
    let (f_path, f_mode) = unsafe {
        (
            core::ptr::read_volatile(&FILE_F_PATH) as usize,
            core::ptr::read_volatile(&FILE_F_MODE) as usize,
        )
    };
    // SAFETY: `file` is the hook's `struct file *`; the offsets are its fields' on this kernel.
    let (len, mode) = unsafe {
        let len = bpf_d_path(
            file.add(f_path) as *mut path,
            scratch.full.as_mut_ptr().cast(),
            PATH_MAX as u32,
        );
        (
            len,
            core::ptr::read_volatile(file.add(f_mode).cast::<u32>()),
        )
    };
    let write = mode & FMODE_WRITE != 0;
    // A path the kernel cannot name is outside every prefix: fail closed.
    let allowed = len > 0 && admitted(scratch, state.id, write);
    if allowed {
        return 0;
    }
    if let Some(c) = counters(state.id) {
        c.files_denied += 1;
    }
    let access = if write {
        FILE_ACCESS_WRITE | (mode & 1)
    } else {
        FILE_ACCESS_READ
    };
    emit(
        state.id,
        EVENT_FILE_DENIED,
        access,
        &Opened::NONE,
        &scratch.full,
    );
    -EACCES
}

const EPERM: i32 = 1;

/// A hard link is its own path to the same file: one made in an allowed directory to a file
/// outside would pass `file_open` (the resolved path is the link's). Agents with a file guard
/// may make none; the open check cannot tell such a link from the file's own name.
#[lsm(hook = "path_link")]
pub fn files_path_link(_ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    if state.flags & AGENT_FLAG_FILES == 0 {
        return 0;
    }
    if let Some(c) = counters(state.id) {
        c.files_denied += 1;
    }
    emit(
        state.id,
        EVENT_FILE_DENIED,
        FILE_ACCESS_LINK,
        &Opened::NONE,
        &[0],
    );
    -EPERM
}

/// Does agent `agent`'s list admit the path in `scratch.full` (`write`: for writing)?
#[inline(always)]
fn admitted(scratch: &mut Scratch, agent: u32, write: bool) -> bool {
    scratch.key.prefix_len = FILE_KEY_AGENT_BITS + 8 * FILE_KEY_PATH as u32;
    scratch.key.data.agent = agent;
    // The trie compares the first FILE_KEY_PATH bytes; rules are shorter, so a longer path
    // matches exactly the rules a full comparison would.
    // SAFETY: copying between two parts of the same map value.
    if unsafe { bpf_probe_read_kernel_buf(scratch.full.as_ptr(), &mut scratch.key.data.path) }
        .is_err()
    {
        return false;
    }
    match FILE_ALLOW.get(&scratch.key) {
        Some(&rule) => !write || rule & FILE_RULE_READ_ONLY == 0,
        None => false,
    }
}

/// What an EVENT_FILE_OPENED record says about the open beside its path.
struct Opened {
    fd: i32,
    dirfd: i32,
    flags: u32,
    file: InodeKey,
}

impl Opened {
    const NONE: Opened = Opened {
        fd: -1,
        dirfd: 0,
        flags: 0,
        file: InodeKey {
            dev: 0,
            _pad: 0,
            ino: 0,
        },
    };
}

#[inline(always)]
fn emit(agent: u32, kind: u32, access: u32, opened: &Opened, path: &[u8]) {
    if over_limit(agent, CapKind::Events) {
        if let Some(c) = counters(agent) {
            c.files_suppressed += 1;
        }
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FileEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = entry.as_mut_ptr();
    // SAFETY: writing every field of the reserved record before submitting it.
    unsafe {
        (*event).kind = kind;
        (*event).agent = agent;
        (*event).pid = pid_tgid as u32;
        (*event).tgid = (pid_tgid >> 32) as u32;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).access = access;
        (*event).fd = opened.fd;
        (*event).dirfd = opened.dirfd;
        (*event).flags = opened.flags;
        (*event).dev = opened.file.dev;
        (*event)._pad = 0;
        (*event).ino = opened.file.ino;
        (*event).path = [0; FILE_EVENT_PATH];
        if path.len() >= FILE_EVENT_PATH - 1 {
            let n = FILE_EVENT_PATH - 1;
            let _ = bpf_probe_read_kernel_buf(path.as_ptr(), &mut (&mut (*event).path)[..n]);
        }
    }
    entry.submit(0);
}

// Without BPF LSM: the open syscalls. Record offsets from
// /sys/kernel/tracing/events/syscalls/*/format (the same on every kernel: syscall arguments
// are 8-byte slots after the 16-byte header).
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn files_sys_enter_openat(ctx: TracePointContext) -> u32 {
    enter(
        tp_u64(&ctx, ARG0) as i32,
        tp_u64(&ctx, ARG1),
        tp_u64(&ctx, ARG2) as u32,
    );
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat2")]
pub fn files_sys_enter_openat2(ctx: TracePointContext) -> u32 {
    // The flags are the first field of the caller's `struct open_how`.
    let how = tp_u64(&ctx, ARG2) as *const u64;
    // SAFETY: reading the caller's memory through the helper (a fault reads as 0).
    let flags = unsafe { aya_ebpf::helpers::bpf_probe_read_user(how) }.unwrap_or(0) as u32;
    enter(tp_u64(&ctx, ARG0) as i32, tp_u64(&ctx, ARG1), flags);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_open")]
pub fn files_sys_enter_open(ctx: TracePointContext) -> u32 {
    enter(AT_FDCWD, tp_u64(&ctx, ARG0), tp_u64(&ctx, ARG1) as u32);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_creat")]
pub fn files_sys_enter_creat(ctx: TracePointContext) -> u32 {
    enter(AT_FDCWD, tp_u64(&ctx, ARG0), O_CREAT | O_WRONLY | O_TRUNC);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_openat")]
pub fn files_sys_exit_openat(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_openat2")]
pub fn files_sys_exit_openat2(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_open")]
pub fn files_sys_exit_open(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_creat")]
pub fn files_sys_exit_creat(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}

#[inline(always)]
fn enter(dirfd: i32, filename: u64, flags: u32) {
    let Some(state) = current_agent() else {
        return;
    };
    if state.flags & AGENT_FLAG_FILES == 0 {
        return;
    }
    let args = OpenArgs {
        filename,
        flags,
        dirfd,
    };
    // An insert that fails leaves the open unjudged: counted, never silent.
    if OPENS.insert(bpf_get_current_pid_tgid(), args, 0).is_err()
        && let Some(c) = counters(state.id)
    {
        c.files_suppressed += 1;
    }
}

#[inline(always)]
fn exit(ctx: &TracePointContext) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: map values are plain integers copied out at once.
    let Some(args) = (unsafe { OPENS.get(id) }).copied() else {
        return;
    };
    let _ = OPENS.remove(id);
    let fd = tp_u64(ctx, RET) as i64;
    if fd < 0 {
        return;
    }
    let Some(state) = current_agent() else {
        return;
    };
    let Some(scratch) = FILE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, this program's alone while it runs.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: the caller's string, read through the helper (bounded by the buffer).
    let len = match unsafe {
        bpf_probe_read_user_str_bytes(args.filename as *const u8, &mut scratch.full)
    } {
        Ok(s) => s.len(),
        Err(_) => 0,
    };
    let write = args.flags & O_ACCMODE == O_WRONLY
        || args.flags & O_ACCMODE == O_RDWR
        || args.flags & (O_CREAT | O_TRUNC) != 0;
    if !write && len > 0 && scratch.full[0] == b'/' && clean(&scratch.full) {
        // Read under a read-only prefix: cleared here.
        scratch.key.prefix_len = FILE_KEY_AGENT_BITS + 8 * FILE_KEY_PATH as u32;
        scratch.key.data.agent = state.id;
        // SAFETY: copying between two parts of the same map value.
        let copied =
            unsafe { bpf_probe_read_kernel_buf(scratch.full.as_ptr(), &mut scratch.key.data.path) };
        if copied.is_ok()
            && let Some(&rule) = FILE_ALLOW.get(&scratch.key)
            && rule & FILE_RULE_READ_ONLY != 0
        {
            return;
        }
    }
    let access = match args.flags & O_ACCMODE {
        O_WRONLY => FILE_ACCESS_WRITE,
        O_RDWR => FILE_ACCESS_READ | FILE_ACCESS_WRITE,
        _ if write => FILE_ACCESS_WRITE,
        _ => FILE_ACCESS_READ,
    };
    // A string the kernel cannot read now (its page unmapped since the syscall read it) reads
    // as empty: the daemon then names the file by its fd, checked against this identity.
    let file = if len == 0 {
        fd_identity(fd as u32).unwrap_or_default()
    } else {
        InodeKey::default()
    };
    let opened = Opened {
        fd: fd as i32,
        dirfd: args.dirfd,
        flags: args.flags,
        file,
    };
    emit(state.id, EVENT_FILE_OPENED, access, &opened, &scratch.full);
}

/// Offsets from the running kernel's BTF to the file behind one of the current task's fds
/// (`task_struct.files`, `files_struct.fdt`, `fdtable.fd`); 0: unknown, and a file opened
/// under a path the kernel could not read has no identity for the daemon to check.
#[unsafe(no_mangle)]
static FILES_TASK_FILES: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FILES_FDT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FDT_FD: u32 = 0;

/// Device and inode of the file behind the current task's `fd` (None if unreadable).
#[inline(always)]
fn fd_identity(fd: u32) -> Option<InodeKey> {
    // SAFETY: the helper only returns the current task's address.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files = read_at::<*const u8>(task, &FILES_TASK_FILES)?;
    let fdt = read_at::<*const u8>(files, &FILES_FILES_FDT)?;
    let table = read_at::<*const u8>(fdt, &FILES_FDT_FD)?;
    if table.is_null() {
        return None;
    }
    // SAFETY: a checked kernel read of one slot of the fd array; `fd` was just returned by
    // the open, so it is below the table's size (tables only grow).
    let file = unsafe {
        bpf_probe_read_kernel(
            table
                .wrapping_add(fd as usize * core::mem::size_of::<usize>())
                .cast::<*const u8>(),
        )
    }
    .ok()?;
    file_inode(file).and_then(inode_identity)
}

/// No `/.` in the first FILE_KEY_PATH bytes before the NUL: no `.` or `..` component (nor a
/// hidden file, which the daemon then judges: harmless).
#[inline(always)]
fn clean(path: &[u8; PATH_MAX]) -> bool {
    let mut i = 0;
    while i < FILE_KEY_PATH - 1 {
        let c = path[i];
        if c == 0 {
            return true;
        }
        if c == b'/' && path[i + 1] == b'.' {
            return false;
        }
        i += 1;
    }
    // Longer than the trie compares: the daemon judges it.
    false
}

/// A u64 field of a tracepoint record.
#[inline(always)]
fn tp_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: a constant, aligned offset inside the tracepoint's record.
    unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0)
}
