//! The plumbing every concern shares, and nothing that is one: errors of the kernel layer,
//! taking maps and programs out of the loaded object and loading (verifying) programs (here),
//! what the loader needs from the running kernel ([`load`]: BTF offsets, tracefs, memlock),
//! its BTF ([`btf`]), links and the [`link::LinkSet`] that undoes a failed attach ([`link`]),
//! and the pin folder on bpffs ([`pin`]).
//!
//! Concerns import this module; nothing here imports a concern, so there is no import circle.

pub mod btf;
pub mod link;
pub mod load;
pub mod pin;

use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::MapError,
    programs::{Program, ProgramError},
};

pub use link::{Link, LinkSet, LinkState};
pub use pin::PinDir;
pub(crate) use pin::{BPF_LINK_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, pin_by_id, remove_link_dir};

/// Errors of the kernel layer.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this binary was built without its eBPF programs (AYA_BUILD_SKIP was set); rebuild \
         after `cargo xtask setup`"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {}", map_detail(.source))]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("attaching {name} to {cgroup}: {}", attach_detail(.source))]
    Attach {
        name: &'static str,
        cgroup: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "{path} is not a BPF link ({found}), though the link of {name} is pinned there: \
         something else was pinned in its place; remove it (`agentwatch run --cleanup` removes \
         every pin) and start again"
    )]
    NotALink {
        name: &'static str,
        path: std::path::PathBuf,
        found: String,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this agentwatch needs {want:?}: it was \
         pinned by another version; `agentwatch run --cleanup` removes the old pins"
    )]
    IncompatiblePin {
        path: PathBuf,
        found: (u32, u32),
        want: (u32, u32),
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy: {0}")]
    Policy(String),
    #[error("agent `{0}` is already guarded")]
    AlreadyGuarded(String),
    #[error("unknown agent `{0}`")]
    UnknownAgent(String),
    #[error("all {0} agent slots are in use")]
    NoAgentSlot(u32),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// The error of a failed write to map `name`, for `map_err`.
pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

/// What went wrong with a map, with the kernel's errno (aya's message alone names only the
/// syscall: "`bpf_map_update_elem` failed").
fn map_detail(source: &MapError) -> String {
    let mut text = source.to_string();
    let mut next = std::error::Error::source(source);
    while let Some(e) = next {
        text.push_str(&format!(": {e}"));
        if e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            == Some(libc::ENOSPC)
        {
            text.push_str(" (the map is full)");
        }
        next = e.source();
    }
    text
}

/// What went wrong attaching a program, with the kernel's errno (aya's message alone names
/// only the syscall), and what to do where the usual cause is known.
fn attach_detail(source: &ProgramError) -> String {
    let mut text = source.to_string();
    let mut errno = None;
    let mut next = std::error::Error::source(source);
    while let Some(e) = next {
        text.push_str(&format!(": {e}"));
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            errno = io.raw_os_error();
        }
        next = e.source();
    }
    if errno == Some(libc::EPERM) {
        text.push_str(
            " (another program is attached to this cgroup at this hook exclusively, without \
             BPF_F_ALLOW_MULTI, and agentwatch cannot attach beside it: detach that program \
             (`bpftool cgroup show PATH` lists it) or guard another cgroup)",
        );
    }
    text
}

/// Takes map `name` out of the object as a typed map.
pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Program `name` of the object as its type (`CgroupSockAddr`, `TracePoint`, ...).
pub(crate) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// How many times a load that the verifier gave up on because of a pending signal is retried
/// (libbpf's `PROG_LOAD_ATTEMPTS`).
pub const LOAD_ATTEMPTS: u32 = 5;

/// Loads (verifies) program `name` of the object.
///
/// The verifier stops with EAGAIN when the loading thread has a signal pending (kernel commit
/// c3494801cd17); libbpf, cilium/ebpf and runc retry, aya 0.14 does not. So the load runs with
/// every blockable signal blocked in this thread (a blocked signal does not count as pending; it
/// is delivered once the mask is restored), and an EAGAIN that still happens is retried, up to
/// [`LOAD_ATTEMPTS`] times.
pub(crate) fn load_program<T>(
    name: &'static str,
    prog: &mut T,
    load: impl Fn(&mut T) -> Result<(), ProgramError>,
) -> Result<(), KernelError> {
    let _mask = SignalsBlocked::new();
    let mut attempt = 1;
    loop {
        match load(prog) {
            Ok(()) => return Ok(()),
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::debug!(program = name, attempt, "BPF_PROG_LOAD: EAGAIN, retrying");
                attempt += 1;
            }
            Err(source) => return Err(KernelError::Program { name, source }),
        }
    }
}

/// Blocks every blockable signal in the current thread until dropped, then restores the mask.
/// Signals sent meanwhile stay pending and are delivered when it is dropped.
pub(crate) struct SignalsBlocked {
    old: Option<libc::sigset_t>,
}

impl SignalsBlocked {
    pub(crate) fn new() -> Self {
        // SAFETY: sigfillset/pthread_sigmask with valid pointers to zero-initialised sets.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let ok = libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) == 0;
            Self {
                old: ok.then_some(old),
            }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            // SAFETY: restores the mask saved in `new`.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
        }
    }
}

/// A ring buffer record of type `T` from the start of `bytes`, if they are long enough.
pub(crate) fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: the length was checked; a Pod type is plain old data for which any bytes are
        // a value, and the read is unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
    })
}

/// A NUL-terminated (or full) byte array of a kernel record as text.
pub(crate) fn c_string(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// A map removal that found nothing to remove is not an error (clearing is idempotent).
pub(crate) fn ignore_missing(
    r: Result<(), MapError>,
    name: &'static str,
) -> Result<(), KernelError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(KernelError::Map { name, source }),
    }
}

/// Removes every key of hash map `map` (named `name`) for which `gone` holds, in one pass
/// over the map; returns the keys removed.
pub(crate) fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    gone: impl Fn(&K) -> bool,
) -> Result<Vec<K>, KernelError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| gone(k))
        .collect();
    for k in &keys {
        ignore_missing(map.remove(k), name)?;
    }
    Ok(keys)
}

/// bpf(2) `cmd` with `attr`, a #[repr(C)] prefix of union bpf_attr for `cmd`: for what aya does
/// not offer (pinning again by id, a link's info, batch lookups).
pub(crate) fn bpf_call<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for reads and writes of size_of::<T>() bytes for the call; the
    // kernel reads (and for some commands writes back, or writes through pointers in it, which
    // the caller made valid for that) no more than the size given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so of the kernel's event
/// timestamps and of the deadlines it checks.
pub fn ktime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
