//! Outbound bytes: the kernel half of `agentwatch/src/bytes.rs`.
//!
//! A cgroup_skb egress program on each agent's cgroup counts the bytes of every IP packet its
//! sockets send and, with a byte cap, drops what goes over it (telling TCP it met congestion,
//! so it slows down rather than retransmitting into the cap).

use agentwatch_common::{ByteCap, MAX_AGENTS};
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::bpf_skb_ancestor_cgroup_id,
    macros::{cgroup_skb, map},
    maps::Array,
    programs::SkBuffContext,
};

use crate::{
    agent::{agent_among_ancestors, counters},
    egress::gcra_over,
};

/// Agent id -> its byte cap.
#[map]
static BYTE_CAPS: Array<ByteCap> = Array::with_max_entries(MAX_AGENTS, 0);

/// cgroup_skb return values: let the packet go; drop it and report congestion to the sender.
const PASS: i32 = 1;
const DROP_CONGESTED: i32 = 2;

#[cgroup_skb(egress)]
pub fn bytes_egress(ctx: SkBuffContext) -> i32 {
    let Some(id) = agent_of(ctx.skb.skb) else {
        return PASS;
    };
    let len = u64::from(ctx.len());
    if over_cap(id, len) {
        if let Some(c) = counters(id) {
            c.egress_bytes_dropped += len;
        }
        return DROP_CONGESTED;
    }
    if let Some(c) = counters(id) {
        c.egress_bytes += len;
    }
    PASS
}

/// The agent whose cgroup (or a cgroup below it) the packet's socket belongs to. Packets are
/// often sent from softirq context, so the socket's cgroup counts, not the current task's.
#[inline(always)]
fn agent_of(skb: *mut __sk_buff) -> Option<u32> {
    // SAFETY: the context pointer is what the kernel handed this program.
    agent_among_ancestors(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) })
        .map(|(_, state)| state.id)
}

/// GCRA on agent `id`'s byte cap with a cost of `len` bytes; takes them if under the cap.
#[inline(always)]
fn over_cap(id: u32, len: u64) -> bool {
    let Some(cap) = BYTE_CAPS.get_ptr_mut(id) else {
        return false;
    };
    // SAFETY: a valid map value; only `gcra_over`'s atomic writes `tat_ns` concurrently.
    let (ps_per_byte, tolerance) = unsafe { ((*cap).ps_per_byte, (*cap).tolerance_ns) };
    if ps_per_byte == 0 {
        return false;
    }
    // SAFETY: an aligned u64 inside the map value, which outlives this call.
    let tat = unsafe { &raw mut (*cap).tat_ns };
    gcra_over(tat, len * ps_per_byte / 1000, tolerance)
}
