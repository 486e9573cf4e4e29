//! Attached programs, pinned or owned, and what the kernel says of them now.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        TracePoint,
        links::{FdLink, LinkError, PinnedLink},
    },
};

use crate::bpf::{KernelError, bpf_call, program};

/// One attached program. Dropping an owned link detaches it; a pinned one stays attached until
/// its pin is removed ([`Link::detach`]).
#[derive(Debug)]
pub struct Link {
    /// This process's reference to the link: an fd of its own rather than aya's FdLink, whose
    /// fd aya does not lend out, so that the watchdog's check every second is one call on it.
    fd: OwnedFd,
    /// The kernel's id of the link.
    id: u32,
    /// The program's name in the object (also the pin's file name).
    name: &'static str,
    pin: Option<PathBuf>,
    /// Attached by this process (not adopted from a pin).
    fresh: bool,
}

/// What the kernel says of a link this process holds ([`Link::kernel_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Attached where it was (for a cgroup link: to the cgroup it was made for).
    Attached,
    /// The link still exists but is attached to nothing: someone called BPF_LINK_DETACH on it
    /// (any holder of an fd of it can, e.g. one got with BPF_OBJ_GET on its pin). The kernel
    /// then reports cgroup_id 0 for a cgroup link.
    Detached,
    /// The kernel no longer knows the link (its last fd and pin went).
    Missing,
}

impl LinkState {
    /// How the watchdog's audit line names what it found.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Detached => "detached",
            Self::Missing => "missing",
        }
    }
}

/// `BPF_LINK_TYPE_CGROUP` of linux/bpf.h.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// bpf(2) commands (linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The head of `struct bpf_link_info` and, for a cgroup link, its `cgroup` member (the union
/// starts at offset 16). 48 bytes: the size of the whole struct, so the kernel fills the union
/// whatever the link's type.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 5],
}

/// One bpf(2) call with `attr`, a #[repr(C)] prefix of `union bpf_attr` for `cmd`.
/// A new fd of the link with kernel id `id` (ENOENT: the kernel no longer knows it).
fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct GetFd {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let raw = bpf_call(
        crate::bpf::BPF_LINK_GET_FD_BY_ID,
        &mut GetFd {
            id,
            next_id: 0,
            open_flags: 0,
        },
    )?;
    let raw = i32::try_from(raw).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// What the bpf object pinned at `pin` is, as /proc names its fd: `anon_inode:bpf-link` for a
/// link (`anon_inode:bpf-map`, `anon_inode:bpf-prog` otherwise).
fn pinned_kind(pin: &Path) -> io::Result<String> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    /// The head of `union bpf_attr` for BPF_OBJ_GET.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let raw = bpf_call(
        BPF_OBJ_GET,
        &mut ObjGet {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            // Read-write: the kernel opens links no other way (EINVAL for BPF_F_RDONLY).
            file_flags: 0,
        },
    )?;
    let raw = i32::try_from(raw).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(target.to_string_lossy().into_owned())
}

/// The kernel's `bpf_link_info` of the link open at `fd`.
fn link_info(fd: &OwnedFd) -> io::Result<RawLinkInfo> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = RawLinkInfo::default();
    let mut attr = InfoByFd {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(size_of::<RawLinkInfo>()).map_err(io::Error::other)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

impl Link {
    /// With `pin_dir`: adopts the link pinned at `pin_dir/name` if there is one (it stays
    /// attached throughout), else attaches with `attach` and pins the result there. Without:
    /// attaches, and the link is owned by this process.
    pub(crate) fn pinned_or_attach(
        pin_dir: Option<&Path>,
        name: &'static str,
        attach: impl FnOnce() -> Result<FdLink, KernelError>,
    ) -> Result<Self, KernelError> {
        let Some(dir) = pin_dir else {
            return Self::new(attach()?, name, None, true);
        };
        let pin = dir.join(name);
        if pin.exists() {
            // aya opens any bpf object pinned there as a link, and a map's info read as a link's
            // names a link id that may be live (seen on 6.1): what is adopted must be a link.
            match pinned_kind(&pin) {
                Ok(kind) if kind == "anon_inode:bpf-link" => {}
                Ok(found) => {
                    return Err(KernelError::NotALink {
                        name,
                        path: pin,
                        found,
                    });
                }
                Err(io_error) => {
                    return Err(KernelError::Link {
                        name,
                        source: LinkError::SyscallError(aya::sys::SyscallError {
                            call: "BPF_OBJ_GET",
                            io_error,
                        }),
                    });
                }
            }
            let link =
                PinnedLink::from_pin(&pin).map_err(|source| KernelError::Link { name, source })?;
            return Self::new(FdLink::from(link), name, Some(pin), false);
        }
        std::fs::create_dir_all(dir).map_err(|source| KernelError::Pin {
            path: dir.to_owned(),
            source,
        })?;
        let pinned = attach()?.pin(&pin).map_err(|e| KernelError::Pin {
            path: pin.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Self::new(FdLink::from(pinned), name, Some(pin), true)
    }

    /// Takes `link` over: an fd of its own by the link's id, then aya's is closed (the link
    /// lives on through the new one, so an owned link is never detached in between). If that
    /// fails, a link this call attached and pinned is unpinned, so that it goes with aya's fd
    /// rather than stay attached behind the caller's back.
    fn new(
        link: FdLink,
        name: &'static str,
        pin: Option<PathBuf>,
        fresh: bool,
    ) -> Result<Self, KernelError> {
        let own = link
            .info()
            .map_err(|source| KernelError::Link { name, source })
            .and_then(|info| {
                let id = info.id();
                link_fd_by_id(id)
                    .map(|fd| (fd, id))
                    .map_err(|io_error| KernelError::Link {
                        name,
                        source: LinkError::SyscallError(aya::sys::SyscallError {
                            call: "BPF_LINK_GET_FD_BY_ID",
                            io_error,
                        }),
                    })
            });
        let (fd, id) = match own {
            Ok(own) => own,
            Err(e) => {
                if let (true, Some(pin)) = (fresh, &pin) {
                    let _ = std::fs::remove_file(pin);
                }
                return Err(e);
            }
        };
        drop(link);
        Ok(Self {
            fd,
            id,
            name,
            pin,
            fresh,
        })
    }

    /// The program's name in the object.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Is the link still attached, asked of the kernel (not of the pin, which stays in place
    /// when someone detaches the link)? `cgroup_id`: the cgroup a cgroup link must be attached
    /// to. Only cgroup links can be detached on the kernel measured (6.18): for
    /// tracepoint and raw tracepoint links BPF_LINK_DETACH fails with EOPNOTSUPP, so for them
    /// only [`LinkState::Missing`] can be found. The daemon's own fd keeps a link from going
    /// while it runs, so `Missing` means the kernel lost it some other way.
    pub fn kernel_state(&self, cgroup_id: Option<u64>) -> LinkState {
        let info = match link_info(&self.fd) {
            Ok(info) => info,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBADF)) => {
                return LinkState::Missing;
            }
            // Anything else (ENOMEM) says nothing about the link: judged next time.
            Err(e) => {
                tracing::debug!(link = self.name, id = self.id, "reading link info: {e}");
                return LinkState::Attached;
            }
        };
        match cgroup_id {
            Some(want) if info.link_type == BPF_LINK_TYPE_CGROUP && info.cgroup_id != want => {
                LinkState::Detached
            }
            _ => LinkState::Attached,
        }
    }

    /// Forgets a link that no longer guards anything (detached or missing): removes its pin
    /// (so the next attach makes a new one there) and closes this process's fd. A detached
    /// link lives on, attached to nothing, while someone else holds an fd of it.
    pub(crate) fn discard(self) -> Result<(), KernelError> {
        let path = self.pin.clone().unwrap_or_else(|| PathBuf::from(self.name));
        self.detach()
            .map_err(|source| KernelError::Pin { path, source })
    }

    /// The kernel's id of the link.
    pub fn id(&self) -> Option<u32> {
        Some(self.id)
    }

    /// Pins the link again if it has a pin path and the pin is gone (its bpffs was unmounted,
    /// the folder removed); the link itself stayed attached through this process's fd. True
    /// if it pinned it.
    pub(crate) fn repin(&self) -> Result<bool, KernelError> {
        let Some(pin) = &self.pin else {
            return Ok(false);
        };
        if pin.exists() {
            return Ok(false);
        }
        let pin_err = |source| KernelError::Pin {
            path: pin.clone(),
            source,
        };
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir).map_err(pin_err)?;
        }
        crate::bpf::pin_by_id(crate::bpf::BPF_LINK_GET_FD_BY_ID, self.id, pin).map_err(pin_err)?;
        Ok(true)
    }

    /// Attached by this process rather than adopted from a pin.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Detaches the link: removes its pin, then drops the last reference.
    pub fn detach(self) -> Result<(), std::io::Error> {
        if let Some(pin) = &self.pin {
            match std::fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        drop(self.fd);
        Ok(())
    }
}

/// Links attached as one group (an agent's cgroup, a host-wide set): on Drop, the links this
/// process attached are detached again (pins removed) unless [`LinkSet::keep`] took them, so
/// a group that fails halfway leaves nothing attached. Links adopted from an earlier daemon's
/// pins are never detached: they stay as they were found.
#[derive(Debug, Default)]
#[must_use = "dropping a LinkSet detaches the links it attached"]
pub struct LinkSet {
    links: Vec<Link>,
}

impl LinkSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `link` to the group.
    pub fn push(&mut self, link: Link) {
        self.links.push(link);
    }

    /// The links so far.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Runs `attach` on a new group and keeps what it attached if it succeeds (else nothing it
    /// attached stays).
    pub fn build(
        attach: impl FnOnce(&mut LinkSet) -> Result<(), KernelError>,
    ) -> Result<Vec<Link>, KernelError> {
        let mut set = Self::new();
        attach(&mut set)?;
        Ok(set.keep())
    }

    /// The group is complete: its links are the caller's to hold.
    pub fn keep(mut self) -> Vec<Link> {
        std::mem::take(&mut self.links)
    }
}

impl Drop for LinkSet {
    fn drop(&mut self) {
        for link in self.links.drain(..).filter(Link::fresh) {
            let name = link.name();
            if let Err(e) = link.detach() {
                tracing::warn!(link = name, "detaching a link of a group that failed: {e}");
            }
        }
    }
}

/// Attaches tracepoint programs host-wide: (name in the object, category, tracepoint). Pinned
/// under `pin_dir` when given; pins of an earlier daemon are adopted.
pub(crate) fn attach_tracepoints(
    ebpf: &mut Ebpf,
    programs: &[(&'static str, &str, &str)],
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    for &(name, category, tracepoint) in programs {
        links.push(Link::pinned_or_attach(pin_dir, name, || {
            let prog = program::<TracePoint>(ebpf, name)?;
            let id = prog
                .attach(category, tracepoint)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            FdLink::try_from(link).map_err(|source| KernelError::Link { name, source })
        })?);
    }
    Ok(())
}
