//! The pin folder on bpffs: where one daemon pins its maps and links so that enforcement
//! outlives it, and pinning again what it holds when a pin vanished.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use super::{KernelError, bpf_call};

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
        &mut GetFd {
            id,
            next_id: 0,
            open_flags: 0,
        },
    )?;
    let raw = i32::try_from(raw).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf_call(BPF_OBJ_PIN, &mut attr).map(drop)
}
