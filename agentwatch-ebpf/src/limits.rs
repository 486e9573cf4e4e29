//! Bounds and caps every concern shares: how many rule hits are counted, and the per-agent
//! hard caps (connects, sends, events per second: GCRA in `LIMITS`, the byte cap's step too).

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use agentwatch_common::{AgentLimits, Cap, MAX_AGENTS};
use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::map, maps::Array};

/// Upper bound for distinct rules whose hits are counted (`RULE_HITS`, allocated per entry;
/// its hash buckets are sized by it).
pub const MAX_RULE_HITS: u32 = 1 << 20;

/// Per-agent hard caps (connects, sends, events per second), indexed by agent id.
#[map]
static LIMITS: Array<AgentLimits> = Array::with_max_entries(MAX_AGENTS, 0);

/// Which cap of an agent's [`AgentLimits`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CapKind {
    Connects,
    Sends,
    Events,
}

/// Is this call over agent `id`'s cap of `kind`? Takes a slot of the cap if not.
#[inline(always)]
pub fn over_limit(id: u32, kind: CapKind) -> bool {
    let Some(limits) = LIMITS.get_ptr_mut(id) else {
        return false;
    };
    // SAFETY: a valid map value; only the atomic in `over_cap` writes it concurrently.
    let cap: *mut Cap = unsafe {
        match kind {
            CapKind::Connects => &raw mut (*limits).connects,
            CapKind::Sends => &raw mut (*limits).sends,
            CapKind::Events => &raw mut (*limits).events,
        }
    };
    over_cap(cap)
}

/// GCRA step on one cap inside a `LIMITS` value (`interval_ns == 0`: no cap).
#[inline(always)]
fn over_cap(cap: *mut Cap) -> bool {
    // SAFETY: `cap` points into a map value, which outlives this call.
    let (interval, tolerance) = unsafe { ((*cap).interval_ns, (*cap).tolerance_ns) };
    if interval == 0 {
        return false;
    }
    // SAFETY: tat_ns is an aligned u64 inside the map value, which outlives this call.
    let tat = unsafe { &raw mut (*cap).tat_ns };
    gcra_over(tat, interval, tolerance)
}

/// One GCRA step on the theoretical arrival time `tat`: over the limit if it runs more than
/// `tolerance` ns ahead of now; otherwise takes `cost` ns of it. Shared by the call caps and
/// the byte cap (where the cost is the packet's length in time).
#[inline(always)]
pub fn gcra_over(tat: *mut u64, cost: u64, tolerance: u64) -> bool {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // A few attempts under contention; if every one loses the race, refuse (fail closed).
    // core's AtomicU64 has no compare_exchange on the BPF target (its spec predates ISA v3's
    // cmpxchg), so the intrinsic is used directly (the kernel runs BPF_CMPXCHG from 5.12).
    let mut tries = 0;
    while tries < 4 {
        // SAFETY: the caller's `tat` is an aligned u64 in a map value. An aligned 64-bit load
        // is single-copy atomic on every JIT; the BPF backend has no "atomic load" below ISA
        // v4, so it is a volatile read.
        let old = unsafe { core::ptr::read_volatile(tat) };
        let base = if old > now { old } else { now };
        if base - now > tolerance {
            return true;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
                tat,
                old,
                base + cost,
            )
        };
        if swapped {
            return false;
        }
        tries += 1;
    }
    true
}
