//! What agents use, for least privilege (the kernel half of `agentwatch/src/learn.rs`): the
//! calls each rule admitted (every agent), and, for learn-mode agents, every destination called
//! and every path exec'd, with counts and when last. Pinned, so it survives a daemon restart.
//!
//! The maps are plain hashes, not LRU: an entry evicted silently would leave a rule out of the
//! proposal. A full map is counted (`learn_lost`) and `learn` says its proposal is partial.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xsub};

use agentwatch_common::{
    DestKey, ExecKey, LEARN_CAPACITY, LearnName, LearnNameKey, LearnQuota, MAX_AGENTS, RuleHitKey,
    Seen,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, PerCpuHashMap},
};

use crate::{agent::counters, limits::MAX_RULE_HITS};

/// (agent, rule id) -> calls that rule admitted, per CPU (a hot rule is not a contended
/// cache line). Allocated per entry: only rules that admitted something have one.
#[map]
static RULE_HITS: PerCpuHashMap<RuleHitKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_RULE_HITS, BPF_F_NO_PREALLOC);

/// (agent, proto, destination) -> calls. Allocated per entry.
#[map]
static LEARN_DESTS: HashMap<DestKey, Seen> =
    HashMap::with_max_entries(LEARN_CAPACITY, BPF_F_NO_PREALLOC);

/// (agent, path) -> execs.
#[map]
static LEARN_EXECS: HashMap<ExecKey, Seen> =
    HashMap::with_max_entries(LEARN_CAPACITY, BPF_F_NO_PREALLOC);

/// Agent id -> its share of the two maps above.
#[map]
static LEARN_QUOTA: Array<LearnQuota> = Array::with_max_entries(MAX_AGENTS, 0);

/// Which count of a [`LearnQuota`] a record takes.
#[derive(Clone, Copy)]
enum Share {
    Dests,
    Execs,
}

/// (agent, address, name) -> the name the DNS forwarder answered with that address. Only the
/// daemon writes it; it lives here so it is pinned with the rest.
#[map]
static LEARN_NAMES: HashMap<LearnNameKey, LearnName> =
    HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// Counts a call `rule` admitted for agent `agent`.
#[inline(always)]
pub fn count_rule_hit(agent: u32, rule: u64) {
    let key = RuleHitKey {
        agent,
        _pad: 0,
        rule,
    };
    if let Some(p) = RULE_HITS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value; nothing else writes it while we run.
        unsafe { *p += 1 };
        return;
    }
    // A per-CPU insert sets this CPU's slot and zeroes the others, so it cannot lose another
    // CPU's count: if one inserted first, NOEXIST fails and this CPU's slot is counted below.
    if RULE_HITS.insert(key, 1, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    match RULE_HITS.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(p) => unsafe { *p += 1 },
        None => {
            if let Some(c) = counters(agent) {
                c.rule_hits_lost += 1;
            }
        }
    }
}

/// Records a call of a learn-mode agent to `key` (`refused`: the allow-list would deny it).
#[inline(always)]
pub fn record_dest(key: &DestKey, refused: bool) {
    record(&LEARN_DESTS, key, key.agent, refused, Share::Dests);
}

/// Records an exec of a learn-mode agent (`killed`: by its exec allow-list). `key` points into
/// a scratch map (it is too large for the stack).
#[inline(always)]
pub fn record_exec(key: &ExecKey, killed: bool) {
    // LEARN_NAMES is the daemon's; one reference from a program keeps the linker from dropping
    // it from the object (a lookup that cannot match costs nothing on an exec).
    let _ = LEARN_NAMES.get_ptr(LearnNameKey::default());
    record(&LEARN_EXECS, key, key.agent, killed, Share::Execs);
}

/// Adds one use to `key`'s record in `map` (agent `agent`'s), inserting it the first time
/// if the agent's share has room.
#[inline(always)]
fn record<K>(map: &HashMap<K, Seen>, key: &K, agent: u32, refused: bool, share: Share) {
    let p = match map.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            // The slot is taken before the insert, so concurrent inserts of one agent on
            // several CPUs never take it past its limit.
            let Some(held) = reserve(agent, share) else {
                lost(agent);
                return;
            };
            if map.insert(key, first(refused), BPF_NOEXIST as u64).is_ok() {
                return;
            }
            // Another CPU inserted it first (add to its record), or the map is full: the
            // slot goes back either way.
            release(held);
            let Some(p) = map.get_ptr_mut(key) else {
                lost(agent);
                return;
            };
            p
        }
    };
    bump(p, refused);
}

/// Takes one record of `agent`'s share; None when it is full. Returns the count to give it
/// back to (null when the agent has no quota).
#[inline(always)]
fn reserve(agent: u32, share: Share) -> Option<*mut u64> {
    let Some(q) = LEARN_QUOTA.get_ptr_mut(agent) else {
        return Some(core::ptr::null_mut());
    };
    // SAFETY: a map value that outlives this call; `limit` is written by the daemon only.
    let limit = unsafe { core::ptr::read_volatile(&raw const (*q).limit) };
    if limit == 0 {
        return Some(core::ptr::null_mut());
    }
    // SAFETY: an aligned u64 inside the map value; every kernel writer uses these atomics.
    let used = unsafe {
        match share {
            Share::Dests => &raw mut (*q).dests,
            Share::Execs => &raw mut (*q).execs,
        }
    };
    // Compare-and-swap below the limit (a fetch-and-add's result needs BPF ISA v3, which
    // this object is not built for; cmpxchg is what `gcra_over` uses too). A few attempts
    // under contention; a record that loses every race is counted lost.
    let mut tries = 0;
    while tries < 4 {
        // SAFETY: an aligned u64 map value; an aligned load is single-copy atomic.
        let old = unsafe { core::ptr::read_volatile(used) };
        if old >= limit {
            return None;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
                used,
                old,
                old + 1,
            )
        };
        if swapped {
            return Some(used);
        }
        tries += 1;
    }
    None
}

#[inline(always)]
fn release(used: *mut u64) {
    if !used.is_null() {
        // SAFETY: a count inside a LEARN_QUOTA value, from `reserve`.
        unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(used, 1) };
    }
}

#[inline(always)]
fn first(refused: bool) -> Seen {
    Seen {
        count: 1,
        refused: u64::from(refused),
        // SAFETY: helper without arguments.
        last_ns: unsafe { bpf_ktime_get_ns() },
    }
}

#[inline(always)]
fn lost(agent: u32) {
    if let Some(c) = counters(agent) {
        c.learn_lost += 1;
    }
}

#[inline(always)]
fn bump(p: *mut Seen, refused: bool) {
    // SAFETY: `p` points at a map value; every writer adds atomically, and `last_ns` is a
    // plain store (the latest of two racing stores is as good as the other).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).count, 1);
        if refused {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).refused, 1);
        }
        core::ptr::write_volatile(&raw mut (*p).last_ns, bpf_ktime_get_ns());
    }
}
