//! Hostname rules: the kernel half of `agentwatch/src/dns/`.
//!
//! An agent with hostname rules has every DNS call (UDP or TCP to port 53, whatever resolver it
//! names) redirected by the egress hooks to its own forwarder port on loopback, so the daemon
//! knows which agent asks by the port the query arrives on: no race, nothing to correlate.
//! The recvmsg and getpeername hooks here show the agent the resolver it asked as the peer.
//! The forwarder writes the addresses of allowed answers into `DNS_ALLOW` *before* it answers;
//! the egress hooks admit them until their deadline, which the kernel checks itself.

use agentwatch_common::{
    DNS_PORT, DNS_VERDICTS, DnsKey, DnsOrig, DnsPorts, DnsValue, MAX_AGENTS, PROTO_OTHER, PROTO_TCP,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockContext},
};

use crate::agent::Dest;

/// Most learned addresses over all agents. Allocated per entry, so the bound costs nothing
/// until used; a full map makes the forwarder answer SERVFAIL (fail closed), never drop rules.
const MAX_LEARNED: u32 = 1 << 17;

/// Agent id -> its forwarder's loopback ports.
#[map]
static DNS_PORTS: Array<DnsPorts> = Array::with_max_entries(MAX_AGENTS, 0);

/// (agent, address) -> the hostname rules that admit it, each until its deadline.
#[map]
static DNS_ALLOW: HashMap<DnsKey, DnsValue> =
    HashMap::with_max_entries(MAX_LEARNED, BPF_F_NO_PREALLOC);

/// Socket cookie -> the resolver it asked. `dns_release` removes a socket's entry when the
/// socket goes; LRU only for sockets released outside every agent cgroup (one passed to a
/// process elsewhere), whose release no hook of ours sees.
#[map]
static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(65536, 0);

/// Queries per agent and verdict. Only the daemon writes it; it lives here so the counts
/// persist with the other pinned maps across daemon restarts.
#[map]
static DNS_COUNTS: Array<[u64; DNS_VERDICTS]> = Array::with_max_entries(MAX_AGENTS, 0);

/// What the cgroup sock_addr hooks return; recvmsg and getpeername must always return it.
const PASS: i32 = 1;

/// 127.0.0.1 as the kernel keeps it in `user_ip4` (network order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The words of ::1 and of ::ffff:0.0.0.0, as in `user_ip6`.
const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// ::1 as address bytes.
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// `bpf_sock::family` of an IPv4 socket.
const AF_INET: u32 = 2;

/// Is this call DNS that the agent's forwarder must answer?
#[inline(always)]
pub fn is_dns(proto: u8, dest: &Dest) -> bool {
    dest.port == DNS_PORT && proto != PROTO_OTHER
}

/// Sends a DNS call of agent `id` to its forwarder: rewrites the destination to the forwarder's
/// loopback port and remembers the resolver asked. False when there is no forwarder to send it
/// to (the caller denies the call).
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, id: u32, proto: u8, v6_hook: bool, dest: &Dest) -> bool {
    let Some(ports) = DNS_PORTS.get(id) else {
        return false;
    };
    let tcp = proto == PROTO_TCP;
    // An AF_INET6 socket that names an IPv4 resolver (v4-mapped) reaches the IPv4 forwarder.
    let fwd_port = match (dest.v6, tcp) {
        (false, false) => ports.udp4,
        (false, true) => ports.tcp4,
        (true, false) => ports.udp6,
        (true, true) => ports.tcp6,
    };
    if fwd_port == 0 {
        return false;
    }
    // SAFETY: the context pointer is what the kernel handed this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = DnsOrig {
        addr: dest.addr,
        port: dest.port,
        fwd_port,
        family: if dest.v6 { 6 } else { 4 },
        _pad: [0; 3],
    };
    // Without the record the reply would not look like the resolver's: refuse rather than
    // send a query whose answer the agent drops.
    if DNS_ORIG.insert(cookie, orig, 0).is_err() {
        return false;
    }
    // SAFETY: a valid, writable bpf_sock_addr for connect and sendmsg hooks; the verifier
    // allows these 4-byte stores.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_port = u32::from(fwd_port.to_be());
    if !v6_hook {
        sa.user_ip4 = LOOPBACK4;
    } else if dest.v6 {
        sa.user_ip6 = [0, 0, 0, LOOPBACK6_LAST];
    } else {
        sa.user_ip6 = [0, 0, MAPPED_PREFIX, LOOPBACK4];
    }
    true
}

/// Is this call to agent `id`'s own forwarder on loopback? Only DNS the egress hooks sent
/// there goes there: an AF_INET6 UDP socket connected to a v4-mapped resolver (redirected to
/// `::ffff:127.0.0.1`) has each send judged again by the IPv4 sendmsg hook, with the address
/// it is connected to now, which no rule of the agent's names. Another agent's forwarder is
/// not its own: the forwarder knows the asking agent by the port.
#[inline(always)]
pub fn to_own_forwarder(id: u32, proto: u8, dest: &Dest) -> bool {
    let loopback = if dest.v6 {
        dest.addr == LOOPBACK6
    } else {
        dest.addr[..4] == LOOPBACK4.to_ne_bytes()
    };
    if !loopback || proto == PROTO_OTHER {
        return false;
    }
    let Some(ports) = DNS_PORTS.get(id) else {
        return false;
    };
    let port = match (dest.v6, proto == PROTO_TCP) {
        (false, false) => ports.udp4,
        (false, true) => ports.tcp4,
        (true, false) => ports.udp6,
        (true, true) => ports.tcp6,
    };
    port != 0 && port == dest.port
}

/// The hostname rule whose learned address admits this call of agent `id` now, if any.
#[inline(always)]
pub fn learned_rule(id: u32, proto: u8, dest: &Dest) -> Option<u64> {
    let mut key = DnsKey {
        agent: id,
        family: if dest.v6 { 6 } else { 4 },
        _pad: [0; 3],
        addr: [0; 16],
    };
    if dest.v6 {
        key.addr = dest.addr;
    } else {
        key.addr[..4].copy_from_slice(&dest.addr[..4]);
    }
    // SAFETY: the value is read at once; the daemon replaces values whole.
    let value = unsafe { DNS_ALLOW.get(key) }?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    value.admitting_rule(proto, dest.port, now)
}

/// A redirected socket's record is read only by its own recvmsg and getpeername calls; once the
/// socket is released there are none (a cookie is never reused), so the record goes with it.
/// Without this every lookup left an entry behind until the LRU evicted it.
#[cgroup_sock(sock_release)]
pub fn dns_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is what the kernel handed this program.
    let sk = unsafe { &*ctx.sock };
    // Most sockets were never redirected, and the cookie costs most of this hook (the first
    // call gives the socket one: 170 of 210 ns a close, measured with bpf_stats). A redirected
    // socket is either unconnected (a UDP sendto redirected) or connected to its forwarder on
    // loopback (the redirect writes exactly the forwarder's address); one connected elsewhere
    // was not redirected, or connected again since, when its record stays until the LRU
    // evicts it.
    let to_forwarder = if sk.family == AF_INET {
        forwarder4(sk.dst_ip4)
    } else {
        forwarder6(sk.dst_ip6)
    };
    if sk.dst_port != 0 && !to_forwarder {
        return PASS;
    }
    // SAFETY: the context pointer is what the kernel handed this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // A lookup tells without the LRU's lock that there is nothing to remove.
    // SAFETY: the value is not read, only whether there is one.
    if unsafe { DNS_ORIG.get(cookie) }.is_some() {
        let _ = DNS_ORIG.remove(cookie);
    }
    PASS
}

/// Is `ip` (as `bpf_sock` and `bpf_sock_addr` keep an IPv4 address) where the IPv4
/// forwarders listen, 127.0.0.1?
#[inline(always)]
fn forwarder4(ip: u32) -> bool {
    ip == LOOPBACK4
}

/// Is `ip` (the words of an IPv6 address, as above) where the forwarders listen: ::1, or
/// ::ffff:127.0.0.1 for an AF_INET6 socket sent to the IPv4 one?
#[inline(always)]
fn forwarder6(ip: [u32; 4]) -> bool {
    ip[0] == 0
        && ip[1] == 0
        && ((ip[2] == 0 && ip[3] == LOOPBACK6_LAST)
            || (ip[2] == MAPPED_PREFIX && ip[3] == LOOPBACK4))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn dns_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    PASS
}

#[cgroup_sock_addr(getpeername6)]
pub fn dns_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    PASS
}

/// A peer address that is the forwarder this socket was redirected to becomes the resolver
/// the socket asked (glibc, for one, drops answers from any other address).
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6_hook: bool) {
    // SAFETY: a valid bpf_sock_addr for recvmsg/getpeername hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if port == 0 {
        return;
    }
    // Only a peer where forwarders listen can be one; checked before the cookie, which costs
    // most of this hook (a socket's first call allocates it), on every receive of the agent.
    let from_forwarder = if v6_hook {
        forwarder6(sa.user_ip6)
    } else {
        forwarder4(sa.user_ip4)
    };
    if !from_forwarder {
        return;
    }
    // SAFETY: the context pointer is what the kernel handed this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { DNS_ORIG.get(cookie) }).copied() else {
        return;
    };
    if orig.fwd_port != port {
        return;
    }
    let word = |i: usize| {
        u32::from_ne_bytes([
            orig.addr[i],
            orig.addr[i + 1],
            orig.addr[i + 2],
            orig.addr[i + 3],
        ])
    };
    if orig.family == 4 {
        if v6_hook {
            sa.user_ip6 = [0, 0, MAPPED_PREFIX, word(0)];
        } else {
            sa.user_ip4 = word(0);
        }
    } else if v6_hook {
        sa.user_ip6 = [word(0), word(4), word(8), word(12)];
    } else {
        // An IPv6 resolver cannot be shown through an AF_INET hook; leave the address as is.
        return;
    }
    sa.user_port = u32::from(orig.port.to_be());
}
