//! Exec monitoring and the exec allow-list.

/// Longest exec path the allow-list can name (bytes, without the NUL). A longer path never
/// matches, so its exec is killed: fail closed.
pub const EXEC_PATH_MAX: usize = 251;

/// Key of the exec allow-list: agent id and the exec'd path, NUL-padded to the full length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecKey {
    pub agent: u32,
    pub path: [u8; EXEC_PATH_MAX + 1],
}

impl Default for ExecKey {
    fn default() -> Self {
        Self {
            agent: 0,
            path: [0; EXEC_PATH_MAX + 1],
        }
    }
}

/// Key of the exec allow-list by file (`EXEC_INODES`): agent id and the identity of the file
/// an allowed path names (`dev` in the kernel's encoding, `MAJOR << 20 | MINOR`). The kernel
/// judges an exec on the file it actually opened, so a bind mount, a chroot or another mount
/// namespace cannot put another program behind an allowed path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecInodeKey {
    pub agent: u32,
    pub dev: u32,
    pub ino: u64,
}

/// An exec of an agent process, allowed (`EVENT_EXEC`) or killed (`EVENT_EXEC_DENIED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub kind: u32,
    pub agent: u32,
    /// Process id after the exec.
    pub pid: u32,
    /// Parent process id as seen at fork (0 if the fork predates the programs).
    pub ppid: u32,
    pub ts_ns: u64,
    /// The task's name after the exec.
    pub comm: [u8; 16],
    /// The path given to execve, NUL-terminated (truncated to fit).
    pub path: [u8; EXEC_PATH_MAX + 1],
}

const _: () = assert!(core::mem::size_of::<ExecKey>() == 256);
const _: () = assert!(core::mem::size_of::<ExecInodeKey>() == 16);
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 296);
