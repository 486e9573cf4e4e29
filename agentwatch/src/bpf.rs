//! The plumbing every concern shares: errors of the kernel layer, taking maps and programs out of
//! the loaded object, loading (verifying) programs, and the pin folder on bpffs.
//!
//! Concerns (`egress`, `exec`, `syscalls`, `sockets`) import this module; `kernel.rs` imports the
//! concerns to hand each its programs and maps. Nothing here imports a concern, so there is no
//! import circle.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::MapError,
    programs::{Program, ProgramError},
};

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
    #[error("eBPF map {name}: {source}")]
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

/// Name of the host-wide links' folder under `links/`.
pub(crate) const HOST_LINKS: &str = "_host";

/// The folder on bpffs where one daemon pins its maps (`maps/`) and links (`links/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Folder of one agent's links; the cgroup id is part of the name, so the pins of a cgroup
    /// that was removed and made again are not mistaken for the new one's.
    pub(crate) fn agent_links(&self, name: &str, cgroup_id: u64) -> PathBuf {
        self.root.join("links").join(format!("{name}@{cgroup_id}"))
    }

    pub(crate) fn links_root(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Folder of the host-wide links (exec/fork tracepoints, sys_enter). Agent names cannot
    /// start with `_`, so it never clashes with an agent's folder.
    pub(crate) fn host_links(&self) -> PathBuf {
        self.root.join("links").join(HOST_LINKS)
    }

    /// Creates the folders; bpffs must be mounted at or above the root.
    pub fn create(&self) -> Result<(), KernelError> {
        for dir in [self.root.join("maps"), self.root.join("links")] {
            fs::create_dir_all(&dir).map_err(|source| KernelError::Pin {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Is there anything pinned here?
    pub fn exists(&self) -> bool {
        self.root.join("maps").exists()
    }

    /// Is the root (or, while it does not exist, its nearest existing parent) on a bpffs? Only
    /// there can pins be made: a folder left where a bpffs was unmounted is not one.
    pub fn on_bpffs(&self) -> bool {
        /// `BPF_FS_MAGIC` of linux/magic.h.
        const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
        let Some(dir) = self.root.ancestors().find(|d| d.exists()) else {
            return false;
        };
        let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: an all-zero statfs is a valid value for statfs(2) to overwrite.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a statfs the call writes into.
        let ret = unsafe { libc::statfs(path.as_ptr(), &mut st) };
        #[allow(clippy::unnecessary_cast)] // f_type's type differs between libc targets.
        let f_type = st.f_type as libc::c_long;
        ret == 0 && f_type == BPF_FS_MAGIC
    }

    /// Pins again every map of `maps` (name, kernel id) whose pin is missing; returns how many
    /// it pinned. The maps live on while this daemon holds them, so their ids still name them.
    pub(crate) fn restore_maps(&self, maps: &[(&'static str, u32)]) -> Result<usize, KernelError> {
        self.create()?;
        let mut n = 0;
        for &(name, id) in maps {
            let path = self.map(name);
            if path.exists() {
                continue;
            }
            pin_by_id(BPF_MAP_GET_FD_BY_ID, id, &path)
                .map_err(|source| KernelError::Pin { path, source })?;
            n += 1;
        }
        Ok(n)
    }

    /// Detaches every pinned link and removes every pin and folder under the root. Returns the
    /// number of links detached. Processes of the agents keep running, unguarded.
    pub fn remove_all(&self) -> Result<usize, KernelError> {
        let mut links = 0;
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| KernelError::Pin { path, source }
        };
        if let Ok(agents) = fs::read_dir(self.links_root()) {
            for agent in agents.filter_map(Result::ok) {
                links += remove_link_dir(&agent.path())?;
            }
        }
        for sub in ["links", "maps"] {
            let dir = self.root.join(sub);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.filter_map(Result::ok) {
                    fs::remove_file(e.path()).map_err(pin_err(&e.path()))?;
                }
                fs::remove_dir(&dir).map_err(pin_err(&dir))?;
            }
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => Ok(links),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(links),
            Err(source) => Err(KernelError::Pin {
                path: self.root.clone(),
                source,
            }),
        }
    }
}

/// Removes the link pins in `dir` (removing a link's last reference detaches it), then `dir`.
/// Returns how many links were detached.
pub(crate) fn remove_link_dir(dir: &Path) -> Result<usize, KernelError> {
    let pin_err = |source| KernelError::Pin {
        path: dir.to_owned(),
        source,
    };
    let mut n = 0;
    for link in fs::read_dir(dir).map_err(pin_err)?.filter_map(Result::ok) {
        fs::remove_file(link.path()).map_err(pin_err)?;
        n += 1;
    }
    fs::remove_dir(dir).map_err(pin_err)?;
    Ok(n)
}

/// bpf(2) commands used to pin again what this daemon holds (linux/bpf.h).
pub(crate) const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
pub(crate) const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_OBJ_PIN: libc::c_long = 6;

fn bpf_call<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`, alive for the call;
    // the kernel reads at most size_of::<T>() bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Pins the map or link with kernel id `id` (`get_cmd`: `BPF_MAP_GET_FD_BY_ID` or
/// `BPF_LINK_GET_FD_BY_ID`) at `path`, which must be on a bpffs.
pub(crate) fn pin_by_id(get_cmd: libc::c_long, id: u32, path: &Path) -> io::Result<()> {
    #[repr(C)]
    struct GetFd {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let raw = bpf_call(
        get_cmd,
        &GetFd {
            id,
            next_id: 0,
            open_flags: 0,
        },
    )?;
    let raw = i32::try_from(raw).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf_call(BPF_OBJ_PIN, &attr).map(drop)
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
