//! Egress leases: the userspace half of `agentwatch-ebpf/src/lease.rs`.
//!
//! `lease = "2h"` gives an agent's egress a deadline: it is written into the kernel when the
//! agent is guarded (a re-adopted agent keeps the one it had), moved by `agentwatch extend`,
//! and restarted by a reload that changes the lease. The kernel denies every call from the
//! deadline on by itself; the daemon audits the expiry and runs `lease_action` (freeze, kill).

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, MapData},
};

use crate::{
    bpf::{KernelError, ktime_ns, load::LoadEnv, map_err, take_map},
    concern::{Concern, Load, MapSpec, Policy, Slot},
};

/// The deadlines, per agent id, and which of them the daemon audited the expiry of.
pub struct LeaseMaps {
    deadlines: Array<MapData, u64>,
    /// The deadline whose expiry was audited (0: none). Kept in the kernel, not in the
    /// daemon, so that it outlives a restart like the deadline itself.
    audited: Array<MapData, u64>,
}

impl Load for LeaseMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("LEASES", 4, 8),
        MapSpec::new("LEASE_AUDITED", 4, 8),
    ];

    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        Ok(Self {
            deadlines: take_map(ebpf, "LEASES")?,
            audited: take_map(ebpf, "LEASE_AUDITED")?,
        })
    }
}

impl Concern for LeaseMaps {
    fn name(&self) -> &'static str {
        "lease"
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        self.set(slot.id, None)
    }

    fn apply(&mut self, slot: Slot, old: Option<&Policy>, new: &Policy) -> Result<(), KernelError> {
        let deadline = match old {
            // Guarding: a lease keeps running across daemon restarts; only a new one starts
            // now (a fresh slot's was forgotten).
            None => match (new.lease, self.deadline(slot.id)) {
                (Some(_), Some(kept)) => Some(kept),
                (Some(length), None) => Some(deadline_in(length)),
                (None, _) => None,
            },
            // A changed lease starts again from now; an unchanged one keeps running.
            Some(old) if old.lease != new.lease => new.lease.map(deadline_in),
            Some(_) => return Ok(()),
        };
        self.set(slot.id, deadline)
    }
}

impl LeaseMaps {
    /// Was the expiry of agent `id`'s current deadline audited? A new deadline (extend, a
    /// reload that changes the lease) is a new expiry, audited again.
    pub(crate) fn expiry_audited(&self, id: u32) -> bool {
        self.deadline(id)
            .is_some_and(|d| self.audited.get(&id, 0).ok() == Some(d))
    }

    /// Records that the expiry of agent `id`'s current deadline was audited.
    pub(crate) fn mark_audited(&mut self, id: u32) -> Result<(), KernelError> {
        let Some(deadline) = self.deadline(id) else {
            return Ok(());
        };
        self.audited
            .set(id, deadline, 0)
            .map_err(map_err("LEASE_AUDITED"))
    }

    /// Agent `id`'s deadline (CLOCK_MONOTONIC ns), if it has a lease.
    pub(crate) fn deadline(&self, id: u32) -> Option<u64> {
        self.deadlines.get(&id, 0).ok().filter(|&d| d != 0)
    }

    /// Sets (Some) or removes (None) agent `id`'s deadline.
    pub(crate) fn set(&mut self, id: u32, deadline: Option<u64>) -> Result<(), KernelError> {
        if deadline.is_none() {
            // The slot's next agent starts with no expiry on record.
            self.audited
                .set(id, 0, 0)
                .map_err(map_err("LEASE_AUDITED"))?;
        }
        self.deadlines
            .set(id, deadline.unwrap_or(0), 0)
            .map_err(map_err("LEASES"))
    }
}

/// The deadline of a lease of `length` starting now.
pub fn deadline_in(length: Duration) -> u64 {
    ktime_ns().saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX))
}

/// Seconds from now to `deadline` (0 once it passed).
pub fn seconds_left(deadline: u64) -> f64 {
    deadline.saturating_sub(ktime_ns()) as f64 / 1e9
}
