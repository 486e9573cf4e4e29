//! The file guard (`[agents.files]`).

/// Longest path prefix a file rule can name (bytes, without the NUL): the LPM trie's key data
/// holds at most 256 bytes, four of which are the agent id. Longer opened paths are compared on
/// their first [`FILE_KEY_PATH`] bytes, which cannot cross a rule's end (rules are shorter).
pub const FILE_RULE_MAX: usize = 250;
/// Path bytes in a [`FileKey`].
pub const FILE_KEY_PATH: usize = 252;
/// Bits of an LPM key's data before the path: the agent id.
pub const FILE_KEY_AGENT_BITS: u32 = 32;

/// Data of a `FILE_ALLOW` LPM trie key: the agent id, then the path. A rule `/srv/app/` is the
/// prefix `agent . "/srv/app/"`; its directory itself is also matched exactly, as the prefix
/// `agent . "/srv/app\0"` (the NUL keeps it from matching `/srv/application`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilePath {
    pub agent: u32,
    pub path: [u8; FILE_KEY_PATH],
}

impl Default for FilePath {
    fn default() -> Self {
        Self {
            agent: 0,
            path: [0; FILE_KEY_PATH],
        }
    }
}

/// Key of `FILE_DIRS`: an allowed directory of an agent, by identity (the kernel's device
/// encoding and inode number). Without BPF LSM the open tracepoints clear an open whose file
/// has one of these among its ancestors: the dentries the kernel opened, walked up across
/// mounts, never the string the caller passed (which another thread can change meanwhile).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileDirKey {
    pub agent: u32,
    pub dev: u32,
    pub ino: u64,
}

/// `FILE_ALLOW` and `FILE_DIRS` value bits: the prefix admits reads only (`:ro`).
pub const FILE_RULE_READ_ONLY: u32 = 1 << 0;

/// [`FileEvent::access`] bits.
pub const FILE_ACCESS_READ: u32 = 1 << 0;
pub const FILE_ACCESS_WRITE: u32 = 1 << 1;
/// A hard link (BPF LSM `path_link`): refused to guarded agents outright, since a hard link
/// in an allowed directory would give an outside file an allowed path.
pub const FILE_ACCESS_LINK: u32 = 1 << 2;

/// Longest path a [`FileEvent`] carries, with its NUL.
pub const FILE_EVENT_PATH: usize = 256;

/// A file open of a guarded agent: refused (`EVENT_FILE_DENIED`, the path as the kernel
/// resolved it) or, without BPF LSM, made (`EVENT_FILE_OPENED`, the path as the process
/// passed it, with the fd it got, for the daemon to resolve and judge).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEvent {
    pub kind: u32,
    pub agent: u32,
    /// Thread id (kernel pid) and process id (tgid) of the caller.
    pub pid: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    pub comm: [u8; 16],
    /// `FILE_ACCESS_*`.
    pub access: u32,
    /// EVENT_FILE_OPENED: the fd the open returned, and the directory fd it was relative to
    /// (AT_FDCWD = -100 for the working directory).
    pub fd: i32,
    pub dirfd: i32,
    /// EVENT_FILE_OPENED: the open flags as passed.
    pub flags: u32,
    /// The path as passed (EVENT_FILE_OPENED) or resolved (EVENT_FILE_DENIED); empty when the
    /// kernel could not read the caller's string (its page was not mapped at the syscall's exit:
    /// reclaim, migration, or another thread unmapping it on purpose).
    pub path: [u8; FILE_EVENT_PATH],
    /// EVENT_FILE_OPENED: the opened file's device (the kernel's `MAJOR << 20 | MINOR`) and
    /// inode, read through the fd table, so the daemon can tell whether the path it resolved
    /// (or the fd's name) is the file the kernel opened. 0, 0: unknown.
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

const _: () = assert!(core::mem::size_of::<FilePath>() == 256);
const _: () = assert!(core::mem::size_of::<FileDirKey>() == 16);
const _: () = assert!(core::mem::size_of::<FileEvent>() == 328);
const _: () = assert!(core::mem::offset_of!(FileEvent, path) == 56);
const _: () = assert!(core::mem::offset_of!(FileEvent, ino) == 320);
