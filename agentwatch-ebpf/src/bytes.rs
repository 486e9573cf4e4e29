//! Outbound bytes: the kernel half of `agentwatch/src/bytes.rs`.
//!
//! A cgroup_skb egress program on each agent's cgroup counts the bytes of every IP packet its
//! sockets send and, with a byte cap, drops what goes over it (telling TCP it met congestion,
//! so it slows down rather than retransmitting into the cap).
//!
//! Being the one program that sees every packet, it also holds two verdicts the connect and
//! sendmsg hooks cannot, as they judge a call once, by the address it names:
//! - an agent whose egress is revoked (kill switch, tripped breaker, a kill's first step, lease
//!   end) sends nothing more on sockets it opened before: their packets are dropped here;
//! - a packet with an IPv6 routing header or IPv4 options goes first to an address the hooks
//!   never judged (the first segment, the source route): it is refused (EPERM to a sender that
//!   waits for the send) and audited with that real next hop.

use agentwatch_common::{
    AGENT_FLAG_DENY_ALL, AgentState, ByteCap, EVENT_EGRESS_DENIED, EgressEvent, HOOK_ROUTE,
    MAX_AGENTS, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
};
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id},
    macros::{cgroup_skb, map},
    maps::Array,
    programs::SkBuffContext,
};

use crate::{
    agent::{EVENTS, agent_among_ancestors, count_lost_event, counters},
    lease,
    limits::{CapKind, gcra_over, over_limit},
};

/// Agent id -> its byte cap.
#[map]
static BYTE_CAPS: Array<ByteCap> = Array::with_max_entries(MAX_AGENTS, 0);

/// cgroup_skb return values: let the packet go; drop it (the sender sees EPERM where it waits
/// for the send); drop it and report congestion to the sender.
const PASS: i32 = 1;
const DROP: i32 = 0;
const DROP_CONGESTED: i32 = 2;

/// IPv6 next-header values: hop-by-hop options, routing header, destination options; and the
/// transport protocols whose ports an event names.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Extension headers walked before the routing header is looked for; the kernel itself puts
/// at most hop-by-hop and destination options in front of it (RFC 8200 4.1 order).
const MAX_EXT_HEADERS: usize = 4;

#[cgroup_skb(egress)]
pub fn bytes_egress(ctx: SkBuffContext) -> i32 {
    let Some(state) = agent_of(ctx.skb.skb) else {
        return PASS;
    };
    let id = state.id;
    if (state.flags & AGENT_FLAG_DENY_ALL != 0 || lease::expired(id))
        && !tcp_control_only(&ctx)
        && !bound_for_gateway(&ctx, &state)
    {
        if let Some(c) = counters(id) {
            c.packets_revoked += 1;
        }
        return DROP;
    }
    if let Some(hop) = rerouted(&ctx) {
        if let Some(c) = counters(id) {
            c.route_options_refused += 1;
        }
        report_route(id, &hop);
        return DROP;
    }
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
fn agent_of(skb: *mut __sk_buff) -> Option<AgentState> {
    // SAFETY: the context pointer is what the kernel handed this program.
    agent_among_ancestors(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) })
        .map(|(_, state)| state)
}

/// Is this packet TCP to the daemon's API gateway, from an agent with API scopes? It leaves a
/// revoked agent too: the gateway refuses the call itself (403, 401), so the agent's SDK gets
/// an answer rather than waiting on a dropped packet (on loopback, never anywhere else).
#[inline(always)]
fn bound_for_gateway(ctx: &SkBuffContext, state: &AgentState) -> bool {
    if state.flags & agentwatch_common::AGENT_FLAG_GATEWAY == 0 {
        return false;
    }
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let mut addr = [0u8; 16];
    let (v6, proto, l4) = match first >> 4 {
        4 => {
            let (Ok(daddr), Ok(proto)) = (ctx.load::<[u8; 4]>(16), ctx.load::<u8>(9)) else {
                return false;
            };
            addr[..4].copy_from_slice(&daddr);
            (false, proto, usize::from(first & 0x0f) * 4)
        }
        6 => {
            let (Ok(daddr), Ok(proto)) = (ctx.load::<[u8; 16]>(24), ctx.load::<u8>(6)) else {
                return false;
            };
            addr = daddr;
            (true, proto, 40)
        }
        _ => return false,
    };
    let port = port_at(ctx, proto, l4);
    crate::agent::to_gateway(state, proto == IPPROTO_TCP, v6, &addr, port)
}

/// Is this a TCP segment without payload (an ACK, FIN or RST)? Those still leave a revoked
/// agent: they carry no data, and they let its peers see its connections end (a kill closes
/// them) instead of waiting on them for hours.
#[inline(always)]
fn tcp_control_only(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let (total, l4, proto) = match first >> 4 {
        4 => {
            let (Ok(len), Ok(proto)) = (ctx.load::<[u8; 2]>(2), ctx.load::<u8>(9)) else {
                return false;
            };
            (
                usize::from(u16::from_be_bytes(len)),
                usize::from(first & 0x0f) * 4,
                proto,
            )
        }
        6 => {
            // A TCP segment with extension headers in front is judged as data.
            let (Ok(len), Ok(proto)) = (ctx.load::<[u8; 2]>(4), ctx.load::<u8>(6)) else {
                return false;
            };
            (40 + usize::from(u16::from_be_bytes(len)), 40, proto)
        }
        _ => return false,
    };
    if proto != IPPROTO_TCP {
        return false;
    }
    // Data offset: the high nibble of byte 12 of the TCP header, in 32-bit words.
    let Ok(doff) = ctx.load::<u8>(l4 + 12) else {
        return false;
    };
    // A GSO packet's IP length field is not its length: such a packet always carries data.
    total == ctx.len() as usize && total == l4 + usize::from(doff >> 4) * 4
}

/// Where a rerouted packet really goes first: the header's destination and, for TCP and UDP,
/// its port.
struct Hop {
    v6: bool,
    addr: [u8; 16],
    port: u16,
    proto: u8,
}

/// Does this packet carry a routing header (IPv6) or IP options (IPv4)? Returns its real next
/// hop if so. A packet too short to read is let through: the stack built it, and a header it
/// did not write cannot be there.
#[inline(always)]
fn rerouted(ctx: &SkBuffContext) -> Option<Hop> {
    // cgroup_skb programs see the packet from its network header on.
    let first: u8 = ctx.load(0).ok()?;
    let mut addr = [0u8; 16];
    match first >> 4 {
        4 => {
            // IHL above 5 words: options (source routes, record route, timestamps...). The
            // kernel adds none of its own to a socket's packets; they come from IP_OPTIONS.
            if first & 0x0f <= 5 {
                return None;
            }
            let daddr: [u8; 4] = ctx.load(16).ok()?;
            addr[..4].copy_from_slice(&daddr);
            let proto: u8 = ctx.load(9).ok()?;
            let port = port_at(ctx, proto, usize::from(first & 0x0f) * 4);
            Some(Hop {
                v6: false,
                addr,
                port,
                proto,
            })
        }
        6 => {
            let mut next: u8 = ctx.load(6).ok()?;
            let mut off = 40usize;
            let mut i = 0;
            while i < MAX_EXT_HEADERS && (next == NEXTHDR_HOP || next == NEXTHDR_DEST) {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (usize::from(hdr[1]) + 1) * 8;
                i += 1;
            }
            if next != NEXTHDR_ROUTING {
                return None;
            }
            addr = ctx.load(24).ok()?;
            // What the routing header carries, to name the port in the audit line.
            let (proto, port) = match ctx.load::<[u8; 2]>(off) {
                Ok(rt) => (
                    rt[0],
                    port_at(ctx, rt[0], off + (usize::from(rt[1]) + 1) * 8),
                ),
                Err(_) => (NEXTHDR_ROUTING, 0),
            };
            Some(Hop {
                v6: true,
                addr,
                port,
                proto,
            })
        }
        _ => None,
    }
}

/// The destination port of a TCP or UDP header at `off` (0 for other protocols).
#[inline(always)]
fn port_at(ctx: &SkBuffContext, proto: u8, off: usize) -> u16 {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return 0;
    }
    ctx.load::<[u8; 2]>(off + 2)
        .map(u16::from_be_bytes)
        .unwrap_or(0)
}

/// Audits a rerouted packet as an `egress_denied` of hook `route` naming its real next hop.
/// The program may run in softirq (a TCP retransmission): no task is named, and the helpers
/// that would name one are not offered to cgroup_skb programs before 6.10.
#[inline(always)]
fn report_route(id: u32, hop: &Hop) {
    if over_limit(id, CapKind::Events) {
        if let Some(c) = counters(id) {
            c.egress_suppressed += 1;
        }
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<EgressEvent>(0) else {
        count_lost_event(id);
        return;
    };
    let proto = match hop.proto {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => PROTO_OTHER,
    };
    entry.write(EgressEvent {
        kind: EVENT_EGRESS_DENIED,
        agent: id,
        pid: 0,
        tgid: 0,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: [0; 16],
        addr: hop.addr,
        port: hop.port,
        family: if hop.v6 { 6 } else { 4 },
        proto,
        hook: HOOK_ROUTE,
        _pad: [0; 3],
    });
    entry.submit(0);
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
