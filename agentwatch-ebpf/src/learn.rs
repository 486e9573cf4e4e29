//! What agents use, for least privilege (the kernel half of `agentwatch/src/learn.rs`): the
//! calls each rule admitted (every agent), and, for learn-mode agents, every destination called
//! and every path exec'd, with counts and when last. Pinned, so it survives a daemon restart.
//!
//! The maps are plain hashes, not LRU: an entry evicted silently would leave a rule out of the
//! proposal. A full map is counted (`learn_lost`) and `learn` says its proposal is partial.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use agentwatch_common::{DestKey, ExecKey, LearnName, LearnNameKey, MAX_AGENTS, RuleHitKey, Seen};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};

use crate::{agent::counters, egress::MAX_RULES};

/// (agent, rule id) -> calls that rule admitted, per CPU (a hot rule is not a contended
/// cache line). Allocated per entry: only rules that admitted something have one.
#[map]
static RULE_HITS: PerCpuHashMap<RuleHitKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);

/// (agent, proto, destination) -> calls. Allocated per entry.
#[map]
static LEARN_DESTS: HashMap<DestKey, Seen> = HashMap::with_max_entries(1 << 18, BPF_F_NO_PREALLOC);

/// (agent, path) -> execs.
#[map]
static LEARN_EXECS: HashMap<ExecKey, Seen> =
    HashMap::with_max_entries(MAX_AGENTS * 64, BPF_F_NO_PREALLOC);

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
    record(&LEARN_DESTS, key, key.agent, refused);
}

/// Records an exec of a learn-mode agent (`killed`: by its exec allow-list). `key` points into
/// a scratch map (it is too large for the stack).
#[inline(always)]
pub fn record_exec(key: &ExecKey, killed: bool) {
    // LEARN_NAMES is the daemon's; one reference from a program keeps the linker from dropping
    // it from the object (a lookup that cannot match costs nothing on an exec).
    let _ = LEARN_NAMES.get_ptr(LearnNameKey::default());
    record(&LEARN_EXECS, key, key.agent, killed);
}

/// Adds one use to `key`'s record in `map` (agent `agent`'s), inserting it the first time.
#[inline(always)]
fn record<K>(map: &HashMap<K, Seen>, key: &K, agent: u32, refused: bool) {
    let p = match map.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            if map.insert(key, first(refused), BPF_NOEXIST as u64).is_ok() {
                return;
            }
            // Another CPU inserted it first (add to its record), or the map is full.
            let Some(p) = map.get_ptr_mut(key) else {
                lost(agent);
                return;
            };
            p
        }
    };
    bump(p, refused);
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
