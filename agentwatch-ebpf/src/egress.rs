//! Egress allow-list on cgroup connect4/connect6/sendmsg4/sendmsg6.
//!
//! Default deny: a call is allowed only if the longest rule prefix covering its destination, in
//! the agent's live rule generation, admits its protocol and port. The daemon folds covering
//! prefixes' ranges into each entry, so the one longest-prefix lookup is the whole answer.

use agentwatch_common::{
    AGENT_FLAG_DENY_ALL, EVENT_EGRESS_DENIED, EgressEvent, HOOK_CONNECT, HOOK_SENDMSG, PROTO_OTHER,
    PROTO_TCP, PROTO_UDP, RuleKeyV4, RuleKeyV6, RuleValue, SCOPE_BITS, UNKNOWN_AGENT,
    VERDICT_ALLOWED, VERDICT_DENIED, egress_slot, rule_scope,
};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map},
    maps::{LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};

use crate::agent::{EVENTS, count_lost_event, counters, current_agent};

/// Upper bound for rules across all agents and both generations; LPM tries allocate per entry
/// (BPF_F_NO_PREALLOC), so the bound costs nothing until used.
const MAX_RULES: u32 = 1 << 20;

#[map]
static RULES_V4: LpmTrie<RuleKeyV4, RuleValue> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map]
static RULES_V6: LpmTrie<RuleKeyV6, RuleValue> = LpmTrie::with_max_entries(MAX_RULES, 0);

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

/// A destination as judged: IPv4 (also when it arrived v4-mapped through an AF_INET6 socket) or
/// IPv6, address bytes in network order.
struct Dest {
    v6: bool,
    addr: [u8; 16],
    port: u16,
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
    let allowed = match agent {
        // A socket of an agent's cgroup used by a task outside every agent: fail closed.
        None => false,
        Some(state) => {
            state.flags & AGENT_FLAG_DENY_ALL == 0
                && allowed_by_rules(rule_scope(state.id, state.generation), proto, &dest)
        }
    };
    let id = agent.map_or(UNKNOWN_AGENT, |s| s.id);
    let verdict = if allowed {
        VERDICT_ALLOWED
    } else {
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
    if allowed {
        return ALLOW;
    }
    emit(EVENT_EGRESS_DENIED, id, proto, hook, &dest);
    DENY
}

#[inline(always)]
fn allowed_by_rules(scope: u32, proto: u8, dest: &Dest) -> bool {
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
    value.is_some_and(|v| v.admits(proto, dest.port))
}

#[inline(always)]
fn emit(kind: u32, agent: u32, proto: u8, hook: u8, dest: &Dest) {
    let Some(mut entry) = EVENTS.reserve::<EgressEvent>(0) else {
        count_lost_event();
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
