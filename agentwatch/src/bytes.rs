//! Outbound bytes: the userspace half of `agentwatch-ebpf/src/bytes.rs`.
//!
//! Attaches the cgroup_skb egress program to an agent's cgroup (it counts every byte the agent
//! sends: `agentwatch_egress_bytes_total`) and writes the agent's byte cap
//! (`limits.egress_bytes_per_second`): packets over it are dropped in the kernel.

use std::{os::fd::AsFd as _, path::Path};

use agentwatch_common::ByteCap;
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink},
};

use crate::{
    bpf::{KernelError, Link, LinkSet, load::LoadEnv, load_program, map_err, program, take_map},
    cgroup::Cgroup,
    concern::{Concern, Load, MapSpec, Policy, Slot},
};

/// The per-agent program.
pub const PROGRAM: &str = "bytes_egress";

/// The byte caps, per agent id.
pub struct BytesMaps {
    caps: Array<MapData, ByteCap>,
}

impl Load for BytesMaps {
    const MAPS: &'static [MapSpec] = &[MapSpec::new("BYTE_CAPS", 4, size_of::<ByteCap>())];

    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        load_program(
            PROGRAM,
            program::<CgroupSkb>(ebpf, PROGRAM)?,
            CgroupSkb::load,
        )?;
        Ok(Self {
            caps: take_map(ebpf, "BYTE_CAPS")?,
        })
    }
}

impl Concern for BytesMaps {
    fn name(&self) -> &'static str {
        "bytes"
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        self.write_cap(slot.id, None)
    }

    fn apply(
        &mut self,
        slot: Slot,
        _old: Option<&Policy>,
        new: &Policy,
    ) -> Result<(), KernelError> {
        self.write_cap(slot.id, new.egress_bytes_per_second)
    }

    fn programs(&self) -> &'static [&'static str] {
        &[PROGRAM]
    }

    fn attach(
        &mut self,
        obj: &mut Ebpf,
        cgroup: &Cgroup,
        pin_dir: Option<&Path>,
        links: &mut LinkSet,
    ) -> Result<(), KernelError> {
        links.push(attach(obj, cgroup, pin_dir)?);
        Ok(())
    }
}

impl BytesMaps {
    /// Writes agent `id`'s cap (None: no cap), keeping its running state so a reload grants no
    /// burst.
    pub(crate) fn write_cap(
        &mut self,
        id: u32,
        per_second: Option<u64>,
    ) -> Result<(), KernelError> {
        let old = self.caps.get(&id, 0).unwrap_or_default();
        let cap = ByteCap {
            tat_ns: old.tat_ns,
            ..ByteCap::per_second(per_second.unwrap_or(0))
        };
        self.caps.set(id, cap, 0).map_err(map_err("BYTE_CAPS"))
    }
}

/// Attaches the byte counter to `cgroup` (pinned under `pin_dir` like the egress programs).
fn attach(ebpf: &mut Ebpf, cgroup: &Cgroup, pin_dir: Option<&Path>) -> Result<Link, KernelError> {
    let dir = cgroup.dir()?;
    Link::pinned_or_attach(pin_dir, PROGRAM, || {
        let attach_err = |source| KernelError::Attach {
            name: PROGRAM,
            cgroup: cgroup.path().display().to_string(),
            source,
        };
        let prog = program::<CgroupSkb>(ebpf, PROGRAM)?;
        let id = prog
            .attach(
                dir.as_fd(),
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|source| KernelError::Link {
            name: PROGRAM,
            source,
        })
    })
}
