//! Attached programs, pinned or owned.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{
        TracePoint,
        links::{FdLink, PinnedLink},
    },
};

use crate::bpf::{KernelError, program};

/// One attached program. Dropping an owned link detaches it; a pinned one stays attached until
/// its pin is removed ([`Link::detach`]).
#[derive(Debug)]
pub struct Link {
    link: FdLink,
    pin: Option<PathBuf>,
    /// Attached by this process (not adopted from a pin).
    fresh: bool,
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
            return Ok(Self {
                link: attach()?,
                pin: None,
                fresh: true,
            });
        };
        let pin = dir.join(name);
        if pin.exists() {
            let link =
                PinnedLink::from_pin(&pin).map_err(|source| KernelError::Link { name, source })?;
            return Ok(Self {
                link: FdLink::from(link),
                pin: Some(pin),
                fresh: false,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| KernelError::Pin {
            path: dir.to_owned(),
            source,
        })?;
        let pinned = attach()?.pin(&pin).map_err(|e| KernelError::Pin {
            path: pin.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            link: FdLink::from(pinned),
            pin: Some(pin),
            fresh: true,
        })
    }

    /// The kernel's id of the link.
    pub fn id(&self) -> Option<u32> {
        self.link.info().ok().map(|i| i.id())
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
        let id = self
            .id()
            .ok_or_else(|| pin_err(std::io::Error::other("the link's id is unknown")))?;
        crate::bpf::pin_by_id(crate::bpf::BPF_LINK_GET_FD_BY_ID, id, pin).map_err(pin_err)?;
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
        drop(self.link);
        Ok(())
    }
}

/// Attaches tracepoint programs host-wide: (name in the object, category, tracepoint). Pinned
/// under `pin_dir` when given; pins of an earlier daemon are adopted.
pub(crate) fn attach_tracepoints(
    ebpf: &mut Ebpf,
    programs: &[(&'static str, &str, &str)],
    pin_dir: Option<&Path>,
) -> Result<Vec<Link>, KernelError> {
    let mut links = Vec::new();
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
    Ok(links)
}
