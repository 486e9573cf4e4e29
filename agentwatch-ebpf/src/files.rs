//! The file guard (`[agents.files]`).
//!
//! - `files_file_open` (BPF LSM, host-wide, acts on agents' tasks only): an open whose path,
//!   as the kernel resolved it (`bpf_d_path`: symlinks and `..` already followed), is outside
//!   the agent's prefixes, or a write under a read-only one, fails with EACCES;
//!   `files_path_link` refuses the agent hard links (EPERM), which would give an outside file
//!   an allowed path.
//! - Where the kernel has no BPF LSM, the open syscalls' tracepoints stand in (detection, not
//!   prevention). At an agent's successful open the exit program takes the file the kernel
//!   opened from the fd table and walks its dentries up, across mounts, looking for one of the
//!   agent's allowed directories by identity (`FILE_DIRS`): found (and not read-only for a
//!   write), the open is cleared here. Otherwise it goes to the daemon with the path string
//!   as passed and the file's identity; the daemon believes the string only where it leads
//!   to that very file. The string is never what clears an open: it is read from the caller's
//!   memory at the syscall's exit, after the kernel read it, and another thread of the agent
//!   (or a stale pointer) can make it name something else.

use agentwatch_common::{
    AGENT_FLAG_FILES, EVENT_FILE_DENIED, EVENT_FILE_OPENED, FILE_ACCESS_LINK, FILE_ACCESS_READ,
    FILE_ACCESS_WRITE, FILE_EVENT_PATH, FILE_KEY_AGENT_BITS, FILE_KEY_PATH, FILE_RULE_READ_ONLY,
    FileDirKey, FileEvent, FilePath, InodeKey,
};
use aya_ebpf::{
    bindings::path,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_probe_read_user_str_bytes,
        generated::{bpf_d_path, bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{lsm, map, tracepoint},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{LsmContext, TracePointContext},
};

use crate::{
    agent::{EVENTS, count_lost_event, counters, current_agent},
    limits::{CapKind, over_limit},
    tamper::{file_inode, inode_identity, offset, read_at},
};

/// Allowed path prefixes per agent (`FILE_RULE_*` bits as values).
#[map]
static FILE_ALLOW: LpmTrie<FilePath, u32> = LpmTrie::with_max_entries(65536, 0);

/// Allowed directories per agent by identity (`FILE_RULE_*` bits as values): what the open
/// tracepoints clear an open by (see the module's doc).
#[map]
static FILE_DIRS: HashMap<FileDirKey, u32> = HashMap::with_max_entries(65536, 0);

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
const O_PATH: u32 = 0o10000000;
/// `fmode_t` bits of `struct file` (the same from 4.x to 6.18).
const FMODE_READ: u32 = 1;
const FMODE_WRITE: u32 = 2;
const FMODE_PATH: u32 = 0x4000;

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
    // A path the kernel cannot name is outside every prefix: fail closed. A pipe or socket
    // reopened through its /proc link is no file (its name, `pipe:[N]`, is none either).
    let allowed = (len > 0 && admitted(scratch, state.id, write)) || internal_file(file);
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
    // Read before the kernel copies the struct: another thread can still change it. O_PATH
    // from here would let an open pass unjudged where the file's own mode is unreadable.
    let flags = flags & !O_PATH;
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
    let file = fd_file(fd as u32);
    // How the file was opened, from the file itself where it can be read (the flags saved at
    // the enter say the same; a create or truncate counts as a write either way).
    let mode = file.and_then(|f| read_at::<u32>(f, &FILES_F_MODE));
    // An O_PATH descriptor reads and writes nothing (its content only through a real open
    // of it, e.g. of /proc/self/fd/N, judged then), and BPF LSM's file_open is never called
    // for one: no file access, as there. glibc's NSS lookups of a uid missing from
    // /etc/passwd walk "/", "run", "usr" so (nss-systemd's path chasing).
    let path_only = match mode {
        Some(mode) => mode & FMODE_PATH != 0,
        None => args.flags & O_PATH != 0,
    };
    if path_only {
        return;
    }
    let (read, write) = match mode {
        Some(mode) => (mode & FMODE_READ != 0, mode & FMODE_WRITE != 0),
        None => (
            args.flags & O_ACCMODE != O_WRONLY,
            args.flags & O_ACCMODE == O_WRONLY || args.flags & O_ACCMODE == O_RDWR,
        ),
    };
    let write = write || args.flags & (O_CREAT | O_TRUNC) != 0;
    if let Some(file) = file
        && (internal_file(file)
            || allowed_dir(state.id, file)
                .is_some_and(|rule| !write || rule & FILE_RULE_READ_ONLY == 0))
    {
        return;
    }
    let access = match (read, write) {
        (true, true) => FILE_ACCESS_READ | FILE_ACCESS_WRITE,
        (false, true) => FILE_ACCESS_WRITE,
        _ => FILE_ACCESS_READ,
    };
    let Some(scratch) = FILE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, this program's alone while it runs.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: the caller's string, read through the helper (bounded by the buffer). What the
    // daemon is told the caller passed, nothing more: unreadable, the helper leaves it empty.
    let _ = unsafe { bpf_probe_read_user_str_bytes(args.filename as *const u8, &mut scratch.full) };
    let opened = Opened {
        fd: fd as i32,
        dirfd: args.dirfd,
        flags: args.flags,
        file: file
            .and_then(file_inode)
            .and_then(inode_identity)
            .unwrap_or_default(),
    };
    emit(state.id, EVENT_FILE_OPENED, access, &opened, &scratch.full);
}

/// Offsets from the running kernel's BTF to the file behind one of the current task's fds
/// (`task_struct.files`, `files_struct.fdt`, `fdtable.fd`); 0: unknown, and then no open is
/// cleared here (all go to the daemon, which judges the path strings).
#[unsafe(no_mangle)]
static FILES_TASK_FILES: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FILES_FDT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FDT_FD: u32 = 0;
/// ... its `f_mode`, and up from a file through its dentries and mounts: `file.f_path` plus `path.mnt` and
/// `path.dentry`, `dentry.d_parent` and `d_inode`, `mount.mnt` (the `vfsmount` inside a
/// `struct mount`), `mount.mnt` plus `vfsmount.mnt_root`, `mount.mnt_parent`,
/// `mnt_mountpoint` and `mnt_ns`. Each is non-zero where known (the sums by construction).
#[unsafe(no_mangle)]
static FILES_F_MODE: u32 = 0;
#[unsafe(no_mangle)]
static FILES_F_PATH_MNT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_F_PATH_DENTRY: u32 = 0;
#[unsafe(no_mangle)]
static FILES_DENTRY_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_DENTRY_INODE: u32 = 0;
#[unsafe(no_mangle)]
static FILES_MOUNT_MNT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_MOUNT_MNT_ROOT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_MOUNT_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_MOUNT_MOUNTPOINT: u32 = 0;
#[unsafe(no_mangle)]
static FILES_MOUNT_NS: u32 = 0;

/// `mount.mnt_ns` of the kernel's internal mounts (`kern_mount`: pipes, sockets, anonymous
/// inodes, memfd, namespaces): `MNT_NS_INTERNAL`, `ERR_PTR(-EINVAL)`.
const MNT_NS_INTERNAL: usize = -22isize as usize;

/// Is `file` on one of the kernel's internal mounts, reachable by no path: a pipe or socket
/// reopened through `/dev/fd/N`, `/dev/stdin` or `/proc/PID/fd/N` (bash's process
/// substitution does it)? Reopening what the process already holds reads no file: no file
/// list judges it. False when unknown.
#[inline(always)]
fn internal_file(file: *const u8) -> bool {
    let mnt = offset(&FILES_MOUNT_MNT);
    let Some(vfsmount) = read_at::<*const u8>(file, &FILES_F_PATH_MNT) else {
        return false;
    };
    if mnt == 0 || vfsmount.is_null() {
        return false;
    }
    read_at::<usize>(vfsmount.wrapping_sub(mnt), &FILES_MOUNT_NS) == Some(MNT_NS_INTERNAL)
}

/// Directories and mount crossings [`allowed_dir`] looks at before giving up (the open then
/// goes to the daemon): deeper than any real allowed directory sits above a file.
const WALK_STEPS: u32 = 48;

/// The `struct file` behind the current task's `fd` (None if unreadable).
#[inline(always)]
fn fd_file(fd: u32) -> Option<*const u8> {
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
    (!file.is_null()).then_some(file)
}

/// The bits of the deepest of agent `agent`'s allowed directories that `file` lies under:
/// its own dentry, then each parent, crossing from a mount's root to where it is mounted, as
/// the kernel's own path walk would name it (None: none within [`WALK_STEPS`]).
#[inline(always)]
fn allowed_dir(agent: u32, file: *const u8) -> Option<u32> {
    let mut dentry = read_at::<*const u8>(file, &FILES_F_PATH_DENTRY)?;
    let vfsmount = read_at::<*const u8>(file, &FILES_F_PATH_MNT)?;
    let mnt = offset(&FILES_MOUNT_MNT);
    if mnt == 0 || vfsmount.is_null() {
        return None;
    }
    let mut mount = vfsmount.wrapping_sub(mnt);
    let mut step = 0;
    while step < WALK_STEPS {
        step += 1;
        if dentry.is_null() {
            return None;
        }
        if let Some(inode) = read_at::<*const u8>(dentry, &FILES_DENTRY_INODE)
            && let Some(id) = inode_identity(inode)
        {
            let key = FileDirKey {
                agent,
                dev: id.dev,
                ino: id.ino,
            };
            // SAFETY: a plain integer value, copied out at once.
            if let Some(&bits) = unsafe { FILE_DIRS.get(key) } {
                return Some(bits);
            }
        }
        let root = read_at::<*const u8>(mount, &FILES_MOUNT_MNT_ROOT)?;
        if dentry == root {
            // The top of this mount: go on from the dentry it is mounted on, in its parent
            // (the namespace's root mount is its own parent).
            let parent = read_at::<*const u8>(mount, &FILES_MOUNT_PARENT)?;
            if parent.is_null() || parent == mount {
                return None;
            }
            dentry = read_at::<*const u8>(mount, &FILES_MOUNT_MOUNTPOINT)?;
            mount = parent;
        } else {
            let parent = read_at::<*const u8>(dentry, &FILES_DENTRY_PARENT)?;
            if parent == dentry {
                return None;
            }
            dentry = parent;
        }
    }
    None
}

/// A u64 field of a tracepoint record.
#[inline(always)]
fn tp_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: a constant, aligned offset inside the tracepoint's record.
    unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0)
}
