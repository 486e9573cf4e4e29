//! Socket guards (raw sockets refused, packet sockets killed) and cgroup escapes.

/// A socket an agent was refused (`EVENT_SOCKET_DENIED`: an inet raw socket, by the
/// sock_create hook) or killed for (`EVENT_SOCKET_KILLED`: a packet socket, by the
/// sys_enter_socket tracepoint).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEvent {
    pub kind: u32,
    pub agent: u32,
    /// Thread id (kernel pid) of the caller.
    pub pid: u32,
    /// Process id (kernel tgid) of the caller.
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the call.
    pub ts_ns: u64,
    pub comm: [u8; 16],
    /// socket() arguments: `AF_*`, `SOCK_*` and protocol. `sock_type` keeps SOCK_NONBLOCK /
    /// SOCK_CLOEXEC in a killed event (the syscall's argument as passed), not in a denied one
    /// (the socket's type); mask with 0xf.
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub _pad: u32,
}

/// Longest cgroup path an [`EscapeEvent`] carries, with its NUL.
pub const ESCAPE_PATH_MAX: usize = 128;

/// [`EscapeEvent::flags`]: the moved process moved itself and was killed in the kernel.
pub const ESCAPE_FLAG_MOVED_KILLED: u32 = 1 << 0;
/// The writer (the task that wrote cgroup.procs) was an agent task and was killed.
pub const ESCAPE_FLAG_WRITER_KILLED: u32 = 1 << 1;
/// The moved process could not be signalled from the hook: it is in `DOOMED`, killed by the
/// daemon when it reads this event, and by the kernel at its next socket() call.
pub const ESCAPE_FLAG_MOVED_DOOMED: u32 = 1 << 2;
/// The process came to live outside its agent by `clone3(CLONE_INTO_CGROUP)`, not by a move:
/// `pid` is the child, `writer` the agent task that cloned it.
pub const ESCAPE_FLAG_CLONE: u32 = 1 << 3;
/// The attempt was refused before any process left (BPF LSM `task_alloc`: the clone failed
/// with EPERM); `pid` and `writer` are the caller.
pub const ESCAPE_FLAG_REFUSED: u32 = 1 << 4;

/// `clone3()`'s flag that starts the child in the cgroup named by a file descriptor.
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// An agent's process moved out of its agent's cgroup subtree, or into another agent's
/// (`EVENT_CGROUP_ESCAPE`). Under the agent's event rate, but for a moved process the daemon
/// must kill (`ESCAPE_FLAG_MOVED_DOOMED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscapeEvent {
    pub kind: u32,
    /// Agent id of the moved process's agent (the one it left).
    pub agent: u32,
    /// The moved process (its thread group leader's pid).
    pub pid: u32,
    /// Process id (tgid) of the task that wrote cgroup.procs; equals `pid` for a self-move.
    pub writer: u32,
    pub ts_ns: u64,
    /// Destination cgroup id and level.
    pub dst_id: u64,
    pub dst_level: u32,
    /// `ESCAPE_FLAG_*`.
    pub flags: u32,
    /// The writer's comm.
    pub comm: [u8; 16],
    /// Destination cgroup path in the cgroup2 hierarchy, NUL-terminated (truncated to fit).
    pub dst_path: [u8; ESCAPE_PATH_MAX],
}

impl Default for EscapeEvent {
    fn default() -> Self {
        Self {
            kind: 0,
            agent: 0,
            pid: 0,
            writer: 0,
            ts_ns: 0,
            dst_id: 0,
            dst_level: 0,
            flags: 0,
            comm: [0; 16],
            dst_path: [0; ESCAPE_PATH_MAX],
        }
    }
}

const _: () = assert!(core::mem::size_of::<SocketEvent>() == 56);
const _: () = assert!(core::mem::offset_of!(SocketEvent, family) == 40);
const _: () = assert!(core::mem::size_of::<EscapeEvent>() == 56 + ESCAPE_PATH_MAX);
const _: () = assert!(core::mem::offset_of!(EscapeEvent, comm) == 40);
const _: () = assert!(core::mem::offset_of!(EscapeEvent, dst_path) == 56);
