//! The tamper guard: with BPF LSM, an agent's task may make no `bpf()` call, send no signal
//! to the daemon, and write, unlink or rename none of the daemon's files.

/// [`TamperEvent::what`]: a `bpf()` call (`arg` is its command, e.g. 7 BPF_OBJ_GET).
pub const TAMPER_BPF: u32 = 1;
/// [`TamperEvent::what`]: a signal to the daemon (`arg` is the signal, `target` its pid).
pub const TAMPER_SIGNAL: u32 = 2;
/// [`TamperEvent::what`]: a change to one of the daemon's files (`arg` is a `TAMPER_OP_*`,
/// `dev` and `ino` name the file).
pub const TAMPER_FILE: u32 = 3;

/// An open for writing (or truncating).
pub const TAMPER_OP_WRITE: u32 = 1;
/// An unlink.
pub const TAMPER_OP_UNLINK: u32 = 2;
/// A rename of it, or of another file over it.
pub const TAMPER_OP_RENAME: u32 = 3;

/// One of the daemon's files or folders, as the kernel names an inode: `dev` is the kernel's
/// `dev_t` of its file system (`MAJOR << 20 | MINOR`, not stat's encoding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

const _: () = assert!(core::mem::size_of::<InodeKey>() == 16);

/// Something an agent's task was refused because it would reach agentwatch itself
/// (`EVENT_TAMPER_REFUSED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TamperEvent {
    pub kind: u32,
    pub agent: u32,
    /// Thread id (kernel pid) of the caller.
    pub pid: u32,
    /// Process id (kernel tgid) of the caller.
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the call.
    pub ts_ns: u64,
    pub comm: [u8; 16],
    /// `TAMPER_*`.
    pub what: u32,
    pub arg: u32,
    /// The signalled process (its tgid), for [`TAMPER_SIGNAL`].
    pub target: u32,
    /// The file, for [`TAMPER_FILE`].
    pub dev: u32,
    pub ino: u64,
}

const _: () = assert!(core::mem::size_of::<TamperEvent>() == 64);
const _: () = assert!(core::mem::offset_of!(TamperEvent, what) == 40);
