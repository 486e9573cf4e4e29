//! Egress leases: the kernel half of `agentwatch/src/lease.rs`.
//!
//! An agent with a lease may call out until a deadline (CLOCK_MONOTONIC ns, `bpf_ktime_get_ns`)
//! that the daemon writes when it guards the agent and when someone extends the lease. The
//! egress hooks compare it themselves, so the lease ends on time while the daemon is down.

use agentwatch_common::MAX_AGENTS;
use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::map, maps::Array};

/// Agent id -> the lease's deadline; 0: no lease.
#[map]
static LEASES: Array<u64> = Array::with_max_entries(MAX_AGENTS, 0);

/// Agent id -> the deadline whose expiry the daemon audited (0: none yet). Only the daemon
/// reads and writes it; it lives here, pinned with the other maps, so a restarted daemon
/// neither audits an expiry again nor misses one that happened while it was down.
#[map]
static LEASE_AUDITED: Array<u64> = Array::with_max_entries(MAX_AGENTS, 0);

/// Has agent `id`'s lease run out?
#[inline(always)]
pub fn expired(id: u32) -> bool {
    match LEASES.get(id) {
        Some(&deadline) if deadline != 0 => {
            // SAFETY: helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            now >= deadline
        }
        _ => false,
    }
}
