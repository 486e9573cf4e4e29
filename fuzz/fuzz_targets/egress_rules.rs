//! The egress rule parser and compiler. Input: rule lines as text, then optionally a NUL byte
//! and bytes that pick probes (destinations to judge).
//!
//! - parsing never panics, and a parsed rule's canonical text parses back to the same rule;
//! - `compile` never panics;
//! - when it compiles, `admitting_rule` names exactly the rule a naive reading of the config
//!   names: of the rules that admit the call, the most specific one (longest prefix, then
//!   fewest ports, then fewest protocols, then the one written first).

#![no_main]

use std::{
    cmp::Reverse,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agentwatch::rules::egress::{
    CompiledRules, EgressRule, Proto, Rule, admits, admitting_rule, compile,
};
use agentwatch_common::{
    PROTO_BIT_OTHER, PROTO_BIT_TCP, PROTO_BIT_UDP, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
};
use ipnet::IpNet;
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};

/// Protocols a call can have (the kernel reports every other inet protocol as "other").
const PROTOS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_OTHER];

/// The protocol bits a rule admits, from the rule syntax's meaning rather than the crate's
/// own table: `any` is TCP, UDP and every other protocol.
fn proto_bits(p: Proto) -> u8 {
    match p {
        Proto::Tcp => PROTO_BIT_TCP,
        Proto::Udp => PROTO_BIT_UDP,
        Proto::Any => PROTO_BIT_TCP | PROTO_BIT_UDP | PROTO_BIT_OTHER,
    }
}

/// The reference: the most specific written rule that admits the call, by a scan of the list.
fn oracle(rules: &[Rule], proto: u8, addr: IpAddr, port: u16) -> Option<u64> {
    // IPv4-mapped IPv6 destinations are judged as the IPv4 address they carry.
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.dest.contains(&addr)
                && (r.ports.lo..=r.ports.hi).contains(&port)
                && proto_bits(r.proto) & (1 << proto) != 0
        })
        .min_by_key(|&(i, r)| {
            (
                Reverse(r.dest.prefix_len()),
                r.ports.hi - r.ports.lo,
                proto_bits(r.proto).count_ones(),
                i,
            )
        })
        .map(|(_, r)| r.id())
}

/// An address in `net` (host bits from `host`), or just outside it when `outside`.
fn address_near(net: IpNet, host: u128, outside: bool) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let hostmask = u32::from(n.hostmask());
            let mut a = u32::from(n.network()) | (host as u32 & hostmask);
            if outside && n.prefix_len() > 0 {
                // Flip the last network bit: the neighbouring network of the same length.
                a ^= 1 << (32 - n.prefix_len());
            }
            IpAddr::V4(Ipv4Addr::from(a))
        }
        IpNet::V6(n) => {
            let hostmask = u128::from(n.hostmask());
            let mut a = u128::from(n.network()) | (host & hostmask);
            if outside && n.prefix_len() > 0 {
                a ^= 1 << (128 - n.prefix_len());
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
    }
}

fn check(rules: &[Rule], compiled: &CompiledRules, proto: u8, addr: IpAddr, port: u16) {
    let got = admitting_rule(compiled, proto, addr, port);
    let want = oracle(rules, proto, addr, port);
    assert_eq!(
        got, want,
        "proto {proto} {addr} port {port}: compiled rules name rule {got:?}, the config names {want:?}\nrules: {rules:#?}"
    );
    assert_eq!(admits(compiled, proto, addr, port), got.is_some());
}

/// Probes chosen by the fuzzer: near a rule (inside or just outside it), or anywhere.
fn probe(u: &mut Unstructured<'_>, rules: &[Rule]) -> Result<(u8, IpAddr, u16)> {
    let proto = PROTOS[usize::from(u.int_in_range(0..=2u8)?)];
    let port: u16 = u.arbitrary()?;
    let host: u128 = u.arbitrary()?;
    let addr = if rules.is_empty() || u.ratio(1, 8)? {
        if u.arbitrary()? {
            IpAddr::V4(Ipv4Addr::from(host as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(host))
        }
    } else {
        let r = rules[u.choose_index(rules.len())?];
        let addr = address_near(r.dest, host, u.ratio(1, 4)?);
        // Mapped IPv6 spellings of IPv4 destinations reach the hooks too.
        match addr {
            IpAddr::V4(a) if u.ratio(1, 4)? => IpAddr::V6(a.to_ipv6_mapped()),
            a => a,
        }
    };
    Ok((proto, addr, port))
}

fuzz_target!(|data: &[u8]| {
    let (text, probes) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let mut rules = Vec::new();
    for line in text.lines() {
        let Ok(rule) = line.parse::<EgressRule>() else {
            continue;
        };
        // The canonical text (what rule ids and `learn` proposals are made of) reads back as
        // the same rule.
        let canonical = rule.to_string();
        assert_eq!(
            canonical.parse::<EgressRule>().as_ref(),
            Ok(&rule),
            "`{line}` reads as `{canonical}`, which reads differently"
        );
        if let EgressRule::Net(r) = rule {
            rules.push(r);
        }
    }
    let Ok(compiled) = compile(&rules) else {
        return;
    };
    // Every rule's edges: first and last address, lowest and highest port, and one past them
    // (for the first rules only: this is quadratic, and longer lists add little).
    for r in rules.iter().take(32) {
        for proto in PROTOS {
            for port in [
                r.ports.lo,
                r.ports.hi,
                r.ports.lo.wrapping_sub(1),
                r.ports.hi.wrapping_add(1),
            ] {
                for (host, outside) in [(0, false), (u128::MAX, false), (0, true)] {
                    check(
                        &rules,
                        &compiled,
                        proto,
                        address_near(r.dest, host, outside),
                        port,
                    );
                }
            }
        }
    }
    let mut u = Unstructured::new(probes);
    while !u.is_empty() {
        let Ok((proto, addr, port)) = probe(&mut u, &rules) else {
            break;
        };
        check(&rules, &compiled, proto, addr, port);
    }
});
