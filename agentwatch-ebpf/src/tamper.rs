//! The tamper guard (BPF LSM, host-wide, acts on agents' tasks only): what would reach
//! agentwatch itself is refused with EPERM, root or not.
//!
//! - `tamper_bpf` (`lsm/bpf`): an agent's task may make no `bpf()` call at all. A pinned link
//!   opened with `BPF_OBJ_GET` needs only the pin file's permissions, and `BPF_LINK_DETACH` on
//!   it then needs nothing more: a root agent could switch its own guard off. An agent has no
//!   business with BPF, so every command is refused, not just those on agentwatch's objects.
//! - `tamper_task_kill` (`lsm/task_kill`): no signal from an agent's task reaches the daemon
//!   (its tgid is in `TAMPER_DAEMON`, written by the daemon at start).
//! - `tamper_file_open`, `tamper_inode_unlink`, `tamper_inode_rename` (`lsm/file_open`,
//!   `lsm/inode_unlink`, `lsm/inode_rename`): an agent's task may not open for writing,
//!   unlink, rename or replace by a rename any of the daemon's files and folders (their inodes
//!   are in `TAMPER_INODES`, kept by the daemon: config, trail, socket, pins, their folders).
//!   Reading stays allowed (the trail and the config are no secret of the agent's).
//!
//! Without BPF LSM there is no such hook: a root agent can do both, and the daemon notices
//! (its links are checked every second, a restarted daemon says how the last one ended).

use agentwatch_common::{
    EVENT_TAMPER_REFUSED, InodeKey, TAMPER_BPF, TAMPER_FILE, TAMPER_OP_RENAME, TAMPER_OP_UNLINK,
    TAMPER_OP_WRITE, TAMPER_SIGNAL, TamperEvent,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::bpf_ktime_get_ns,
    },
    macros::{lsm, map},
    maps::{Array, HashMap},
    programs::LsmContext,
};

use crate::{
    agent::{EVENTS, count_lost_event, counters, current_agent},
    limits::{CapKind, over_limit},
};

/// The daemon's tgid (slot 0; 0: no daemon has said yet).
#[map]
static TAMPER_DAEMON: Array<u32> = Array::with_max_entries(1, 0);

/// The daemon's tgid, 0 until it has said.
#[inline(always)]
pub fn daemon_tgid() -> u32 {
    TAMPER_DAEMON.get(0).copied().unwrap_or(0)
}

/// Offset of `tgid` in `struct task_struct` on the running kernel, from its BTF (written into
/// `.rodata` by the daemon before loading; aya-ebpf has no CO-RE).
#[unsafe(no_mangle)]
static TASK_TGID: u32 = 0;

/// The daemon's files and folders (value unused).
#[map]
static TAMPER_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(8192, 0);

/// Offsets of the fields the file hooks follow to an inode's identity, from the running
/// kernel's BTF like `TASK_TGID` (0: unknown, and the file hooks then do nothing).
#[unsafe(no_mangle)]
static FILE_F_INODE: u32 = 0;
#[unsafe(no_mangle)]
static INODE_I_INO: u32 = 0;
#[unsafe(no_mangle)]
static INODE_I_SB: u32 = 0;
#[unsafe(no_mangle)]
static SB_S_DEV: u32 = 0;
#[unsafe(no_mangle)]
static DENTRY_D_INODE: u32 = 0;
/// The same as the file guard's (`files.rs`): `f_mode` of `struct file`.
#[unsafe(no_mangle)]
static TAMPER_F_MODE: u32 = 0;

const EPERM: i32 = 1;
const EACCES: i32 = 13;
const FMODE_WRITE: u32 = 2;

#[lsm(hook = "bpf")]
pub fn tamper_bpf(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    let cmd: i32 = ctx.arg(0);
    refuse(state.id, TAMPER_BPF, cmd as u32, 0, InodeKey::default());
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
    refuse(
        state.id,
        TAMPER_SIGNAL,
        sig as u32,
        daemon,
        InodeKey::default(),
    );
    -EPERM
}

#[lsm(hook = "file_open")]
pub fn tamper_file_open(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    let file: *const u8 = ctx.arg(0);
    let (f_mode, f_inode) = (offset(&TAMPER_F_MODE), offset(&FILE_F_INODE));
    if f_mode == 0 || f_inode == 0 {
        return 0;
    }
    let Some(mode) = read::<u32>(file, f_mode) else {
        return 0;
    };
    if mode & FMODE_WRITE == 0 {
        return 0;
    }
    let Some(key) = read::<*const u8>(file, f_inode).and_then(protected) else {
        return 0;
    };
    refuse(state.id, TAMPER_FILE, TAMPER_OP_WRITE, 0, key);
    -EACCES
}

#[lsm(hook = "inode_unlink")]
pub fn tamper_inode_unlink(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    let dentry: *const u8 = ctx.arg(1);
    let Some(key) = dentry_inode(dentry).and_then(protected) else {
        return 0;
    };
    refuse(state.id, TAMPER_FILE, TAMPER_OP_UNLINK, 0, key);
    -EPERM
}

#[lsm(hook = "inode_rename")]
pub fn tamper_inode_rename(ctx: LsmContext) -> i32 {
    let Some(state) = current_agent() else {
        return 0;
    };
    // Moving one of them away, or another file over one of them.
    let (old, new): (*const u8, *const u8) = (ctx.arg(1), ctx.arg(3));
    let Some(key) = dentry_inode(old)
        .and_then(protected)
        .or_else(|| dentry_inode(new).and_then(protected))
    else {
        return 0;
    };
    refuse(state.id, TAMPER_FILE, TAMPER_OP_RENAME, 0, key);
    -EPERM
}

#[inline(always)]
pub fn offset(global: &'static u32) -> usize {
    // SAFETY: read-only global the loader fills; volatile so it is loaded, not folded.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// A `T` at `base + off` in kernel memory (None if the read faults).
#[inline(always)]
fn read<T>(base: *const u8, off: usize) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: a checked kernel read (bpf_probe_read_kernel) of a field of a kernel object
    // whose offset comes from the running kernel's BTF.
    unsafe { bpf_probe_read_kernel(base.add(off).cast::<T>()).ok() }
}

/// The inode of a dentry (null for a negative one, e.g. a rename's absent target).
#[inline(always)]
fn dentry_inode(dentry: *const u8) -> Option<*const u8> {
    let off = offset(&DENTRY_D_INODE);
    if off == 0 {
        return None;
    }
    read::<*const u8>(dentry, off).filter(|p| !p.is_null())
}

/// The inode's key when it is one of the daemon's files.
#[inline(always)]
fn protected(inode: *const u8) -> Option<InodeKey> {
    let key = inode_identity(inode)?;
    // SAFETY: the value is not read, only whether there is one.
    unsafe { TAMPER_INODES.get(key) }.map(|_| key)
}

/// Did the loader fill in offset `global` (the kernel's BTF had it)?
#[inline(always)]
pub fn offset_known(global: &'static u32) -> bool {
    offset(global) != 0
}

/// Can [`inode_identity`] and [`file_inode`] read anything on this kernel (its BTF gave the
/// offsets)?
#[inline(always)]
pub fn inode_offsets_known() -> bool {
    offset(&FILE_F_INODE) != 0
        && offset(&INODE_I_INO) != 0
        && offset(&INODE_I_SB) != 0
        && offset(&SB_S_DEV) != 0
}

/// Device (the kernel's encoding) and inode number of an inode (None if unreadable).
#[inline(always)]
pub fn inode_identity(inode: *const u8) -> Option<InodeKey> {
    let (i_ino, i_sb, s_dev) = (offset(&INODE_I_INO), offset(&INODE_I_SB), offset(&SB_S_DEV));
    if i_ino == 0 || i_sb == 0 || s_dev == 0 {
        return None;
    }
    let ino = read::<u64>(inode, i_ino)?;
    let sb = read::<*const u8>(inode, i_sb)?;
    let dev = read::<u32>(sb, s_dev)?;
    Some(InodeKey { dev, _pad: 0, ino })
}

/// The inode of a `struct file *` (None if unreadable).
#[inline(always)]
pub fn file_inode(file: *const u8) -> Option<*const u8> {
    let off = offset(&FILE_F_INODE);
    if off == 0 {
        return None;
    }
    read::<*const u8>(file, off).filter(|p| !p.is_null())
}

/// A `T` at `base + off` in kernel memory, `off` read from a loader-filled global (None if
/// the offset is unknown or the read faults).
#[inline(always)]
pub fn read_at<T>(base: *const u8, off: &'static u32) -> Option<T> {
    let off = offset(off);
    if off == 0 {
        return None;
    }
    read::<T>(base, off)
}

#[inline(always)]
fn refuse(agent: u32, what: u32, arg: u32, target: u32, file: InodeKey) {
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
        dev: file.dev,
        ino: file.ino,
    });
    entry.submit(0);
}
