//! The tamper guard: with BPF LSM, an agent's task may make no `bpf()` call and send no signal
//! to the daemon.

/// [`TamperEvent::what`]: a `bpf()` call (`arg` is its command, e.g. 7 BPF_OBJ_GET).
pub const TAMPER_BPF: u32 = 1;
/// [`TamperEvent::what`]: a signal to the daemon (`arg` is the signal, `target` its pid).
pub const TAMPER_SIGNAL: u32 = 2;

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
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<TamperEvent>() == 56);
const _: () = assert!(core::mem::offset_of!(TamperEvent, what) == 40);
