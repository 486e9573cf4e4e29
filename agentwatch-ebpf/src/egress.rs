//! Egress allow-list on cgroup connect4/connect6/sendmsg4/sendmsg6.
//!
//! Default deny: a call is allowed only if the longest rule prefix covering its destination, in
//! the agent's live rule generation, admits its protocol and port. The daemon folds covering
//! prefixes' ranges into each entry, so the one longest-prefix lookup is the whole answer.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use agentwatch_common::{
    AGENT_FLAG_DENY_ALL, AGENT_FLAG_DESTINATIONS, AGENT_FLAG_DNS, AGENT_FLAG_LEARN, DestKey,
    EVENT_EGRESS_CAPPED, EVENT_EGRESS_DENIED, EVENT_EGRESS_WOULD_DENY, EgressEvent, HOOK_CONNECT,
    HOOK_SENDMSG, PROTO_OTHER, PROTO_TCP, PROTO_UDP, RULE_TRIE_CAPACITY, RuleKeyV4, RuleKeyV6,
    RuleValue, SCOPE_BITS, UNKNOWN_AGENT, VERDICT_ALLOWED, VERDICT_CAPPED, VERDICT_DENIED,
    VERDICT_WOULD_DENY, egress_slot, rule_scope,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map},
    maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    programs::SockAddrContext,
};

use crate::{
    agent::{Dest, EVENTS, count_lost_event, counters, current_agent},
    dns, learn, lease,
    limits::{CapKind, over_limit},
};

#[map]
static RULES_V4: LpmTrie<RuleKeyV4, RuleValue> = LpmTrie::with_max_entries(RULE_TRIE_CAPACITY, 0);

#[map]
static RULES_V6: LpmTrie<RuleKeyV6, RuleValue> = LpmTrie::with_max_entries(RULE_TRIE_CAPACITY, 0);

/// Destination -> the 1-second epoch (`ktime / 1e9`) in which it was last counted in
/// `destinations`. LRU: a destination evicted and seen again in the same second counts twice,
/// which only errs towards tripping the breaker early.
#[map]
static DEST_SEEN: LruHashMap<DestKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Destination -> events suppressed by the agent's event cap, so the daemon can name what a
/// flooding agent was hammering without the ring buffer carrying every call.
#[map]
static SUPPRESSED: LruHashMap<DestKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// What the cgroup sock_addr hooks return.
const ALLOW: i32 = 1;
/// The kernel turns this into EPERM for the caller.
const DENY: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_CONNECT, false)
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_CONNECT, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_SENDMSG, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_SENDMSG, true)
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, hook: u8, v6_hook: bool) -> i32 {
    // SAFETY: the kernel hands sock_addr programs a valid bpf_sock_addr context.
    let sa = unsafe { &*ctx.sock_addr };
    let proto = match sa.protocol {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => PROTO_OTHER,
    };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let mut addr = [0u8; 16];
    let v6 = if v6_hook {
        let w = [
            sa.user_ip6[0].to_ne_bytes(),
            sa.user_ip6[1].to_ne_bytes(),
            sa.user_ip6[2].to_ne_bytes(),
            sa.user_ip6[3].to_ne_bytes(),
        ];
        // ::ffff:a.b.c.d reaches an IPv4 host: judge it by the IPv4 rules, or an AF_INET6
        // socket would walk around an IPv4 allow-list.
        if sa.user_ip6[0] == 0 && sa.user_ip6[1] == 0 && w[2] == [0, 0, 0xff, 0xff] {
            addr[..4].copy_from_slice(&w[3]);
            false
        } else {
            addr[..4].copy_from_slice(&w[0]);
            addr[4..8].copy_from_slice(&w[1]);
            addr[8..12].copy_from_slice(&w[2]);
            addr[12..].copy_from_slice(&w[3]);
            true
        }
    } else {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
        false
    };
    let dest = Dest { v6, addr, port };

    let agent = current_agent();
    if let Some(state) = agent
        && state.flags & AGENT_FLAG_DESTINATIONS != 0
    {
        count_destination(state.id, proto, &dest);
    }
    // DNS of an agent with hostname rules goes to its forwarder, whatever resolver it names
    // (unless its egress is revoked: then it is denied like everything else).
    let redirect = agent.is_some_and(|s| {
        s.flags & (AGENT_FLAG_DNS | AGENT_FLAG_DENY_ALL) == AGENT_FLAG_DNS
            && dns::is_dns(proto, &dest)
    });
    // DNS redirected earlier, judged again on its way to the forwarder.
    let forwarder = agent.is_some_and(|s| {
        s.flags & (AGENT_FLAG_DNS | AGENT_FLAG_DENY_ALL) == AGENT_FLAG_DNS
            && dns::to_own_forwarder(s.id, proto, &dest)
    });
    // `learn`: the allow-list alone said no, and the agent is in learn mode: the call goes
    // through as a would-be denial. What holds an agent (kill switch, breaker, lease) never
    // turns into a would-be denial. `rule`: the rule that admitted the call (none for DNS
    // sent to the forwarder: no rule of the agent's admits that).
    let (allowed, learn, rule) = match agent {
        // A socket of an agent's cgroup used by a task outside every agent: fail closed.
        None => (false, false, None),
        Some(state) => {
            if state.flags & AGENT_FLAG_DENY_ALL != 0 || lease::expired(state.id) {
                // Revoked, but the gateway still answers its API calls (403, 401).
                let gateway = crate::agent::to_gateway(
                    &state,
                    proto == PROTO_TCP,
                    dest.v6,
                    &dest.addr,
                    dest.port,
                );
                (gateway, false, None)
            } else if redirect || forwarder {
                (true, false, None)
            } else {
                let mut rule = admitting_rule(rule_scope(state.id, state.generation), proto, &dest);
                if rule.is_none() && state.flags & AGENT_FLAG_DNS != 0 {
                    rule = dns::learned_rule(state.id, proto, &dest);
                }
                let admitted = rule.is_some();
                (
                    admitted,
                    !admitted && state.flags & AGENT_FLAG_LEARN != 0,
                    rule,
                )
            }
        }
    };
    let id = agent.map_or(UNKNOWN_AGENT, |s| s.id);
    let cap = if hook == HOOK_CONNECT {
        CapKind::Connects
    } else {
        CapKind::Sends
    };
    // The cap applies to calls that go through: a denied call is denied, not capped.
    let capped = (allowed || learn) && over_limit(id, cap);
    let verdict = if capped {
        VERDICT_CAPPED
    } else if allowed && (!redirect || dns::redirect(ctx, id, proto, v6_hook, &dest)) {
        VERDICT_ALLOWED
    } else if learn {
        VERDICT_WOULD_DENY
    } else {
        // Includes DNS with no forwarder to send it to (the daemon never started one).
        VERDICT_DENIED
    };
    if let Some(c) = counters(id) {
        c.egress[egress_slot(proto, verdict)] += 1;
        if hook == HOOK_CONNECT {
            c.connects += 1;
        } else {
            c.sends += 1;
        }
    }
    if let Some(state) = agent
        && state.flags & AGENT_FLAG_LEARN != 0
        && !forwarder
    {
        // Every call a learn-mode agent makes, whatever its verdict: what it tried is as much
        // part of its behaviour as what it reached. Not its forwarder's address: the call was
        // recorded as the DNS it was when it was redirected.
        learn::record_dest(&dest_key(id, proto, &dest), learn);
    }
    if verdict == VERDICT_ALLOWED {
        if let Some(rule) = rule {
            learn::count_rule_hit(id, rule);
        }
        return ALLOW;
    }
    if verdict == VERDICT_WOULD_DENY {
        emit(EVENT_EGRESS_WOULD_DENY, id, proto, hook, &dest);
        return ALLOW;
    }
    let kind = if capped {
        EVENT_EGRESS_CAPPED
    } else {
        EVENT_EGRESS_DENIED
    };
    emit(kind, id, proto, hook, &dest);
    DENY
}

/// The rule of `scope`'s allow-list that admits this call, if any.
#[inline(always)]
fn admitting_rule(scope: u32, proto: u8, dest: &Dest) -> Option<u64> {
    let value = if dest.v6 {
        let key = Key::new(
            SCOPE_BITS + 128,
            RuleKeyV6 {
                scope,
                addr: dest.addr,
            },
        );
        RULES_V6.get(&key)
    } else {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&dest.addr[..4]);
        let key = Key::new(SCOPE_BITS + 32, RuleKeyV4 { scope, addr });
        RULES_V4.get(&key)
    };
    value.and_then(|v| v.admitting_rule(proto, dest.port))
}

#[inline(always)]
fn dest_key(agent: u32, proto: u8, dest: &Dest) -> DestKey {
    DestKey {
        agent,
        port: dest.port,
        family: if dest.v6 { 6 } else { 4 },
        proto,
        addr: dest.addr,
    }
}

/// Counts the destination in `destinations` if this is its first call in this second.
#[inline(always)]
fn count_destination(agent: u32, proto: u8, dest: &Dest) {
    // SAFETY: helper without arguments.
    let epoch = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    let key = dest_key(agent, proto, dest);
    let first = match DEST_SEEN.get_ptr_mut(key) {
        // Compare-and-swap, so that of two CPUs seeing the destination in the same new second
        // only one counts it.
        // SAFETY: an aligned u64 map value; concurrent writers use the same atomic.
        Some(p) => unsafe {
            let old = core::ptr::read_volatile(p);
            old != epoch
                && atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
                    p, old, epoch,
                )
                .1
        },
        // NOEXIST: of two CPUs inserting at once only one counts.
        None => DEST_SEEN.insert(key, epoch, BPF_NOEXIST as u64).is_ok(),
    };
    if first && let Some(c) = counters(agent) {
        c.destinations += 1;
    }
}

/// Counts an event the agent's event cap kept out of the ring buffer, per destination.
#[inline(always)]
fn count_suppressed(agent: u32, proto: u8, dest: &Dest) {
    if let Some(c) = counters(agent) {
        c.egress_suppressed += 1;
    }
    let key = dest_key(agent, proto, dest);
    let p = match SUPPRESSED.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            if SUPPRESSED.insert(key, 1, BPF_NOEXIST as u64).is_ok() {
                return;
            }
            // Another CPU inserted it first: add to its entry.
            let Some(p) = SUPPRESSED.get_ptr_mut(key) else {
                return;
            };
            p
        }
    };
    // SAFETY: an aligned u64 map value; every writer adds atomically.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
}

#[inline(always)]
fn emit(kind: u32, agent: u32, proto: u8, hook: u8, dest: &Dest) {
    // The cap is checked before reserving: a flooding agent must not crowd the other agents'
    // events out of the shared buffer.
    if over_limit(agent, CapKind::Events) {
        count_suppressed(agent, proto, dest);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<EgressEvent>(0) else {
        count_lost_event(agent);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = EgressEvent {
        kind,
        agent,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or_default(),
        addr: dest.addr,
        port: dest.port,
        family: if dest.v6 { 6 } else { 4 },
        proto,
        hook,
        _pad: [0; 3],
    };
    entry.write(event);
    entry.submit(0);
}
