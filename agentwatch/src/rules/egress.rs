//! Egress rules: parsing `PROTO DEST PORTS` strings and compiling them into trie entries.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use agentwatch_common::{
    MAX_PORT_RANGES, PROTO_BIT_TCP, PROTO_BIT_UDP, PROTO_BITS_ANY, PortRange, RuleValue,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest as _, Sha256};

use super::names::{HostRule, NameError, looks_like_name};

/// Protocols a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    /// TCP, UDP and any other inet protocol.
    Any,
}

impl Proto {
    pub(crate) fn bits(self) -> u8 {
        match self {
            Self::Tcp => PROTO_BIT_TCP,
            Self::Udp => PROTO_BIT_UDP,
            Self::Any => PROTO_BITS_ANY,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Any => "any",
        })
    }
}

/// Inclusive port range; `*` is `0-65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ports {
    pub lo: u16,
    pub hi: u16,
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.lo, self.hi) {
            (0, u16::MAX) => f.write_str("*"),
            (lo, hi) if lo == hi => write!(f, "{lo}"),
            (lo, hi) => write!(f, "{lo}-{hi}"),
        }
    }
}

/// One egress rule, as written in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub proto: Proto,
    /// Destination network. IPv4-mapped IPv6 networks (`::ffff:a.b.c.d/96+`) are stored as the
    /// IPv4 network they name: the kernel judges such destinations by the IPv4 rules.
    pub dest: IpNet,
    pub ports: Ports,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.proto, self.dest, self.ports)
    }
}

/// Why a rule string was refused. The message is meant for the person who wrote the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("expected `PROTO DEST PORTS` (e.g. `tcp 10.0.0.0/8 443`), got {0} field(s)")]
    FieldCount(usize),
    #[error("unknown protocol `{0}`: expected tcp, udp or any")]
    Proto(String),
    #[error("destination `{0}` is a hostname, where only an address or CIDR fits")]
    Hostname(String),
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("bad destination `{0}`: expected an IPv4/IPv6 address or CIDR")]
    Dest(String),
    #[error("destination `{given}` has host bits set; did you mean `{network}`?")]
    HostBits { given: String, network: String },
    #[error("bad port `{0}`: expected a port 1-65535, a range LO-HI, or *")]
    Port(String),
    #[error("bad port range `{0}`: the low port is above the high port")]
    PortOrder(String),
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<EgressRule>()? {
            EgressRule::Net(rule) => Ok(rule),
            EgressRule::Name(rule) => Err(RuleError::Hostname(rule.name.to_string())),
        }
    }
}

/// One entry of an agent's `egress` list: an address rule, enforced by the rule tries, or a
/// hostname rule, enforced through the DNS forwarder (`crate::dns`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EgressRule {
    Net(Rule),
    Name(HostRule),
}

impl FromStr for EgressRule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields: Vec<&str> = s.split_whitespace().collect();
        let [proto, dest, ports] = fields[..] else {
            return Err(RuleError::FieldCount(fields.len()));
        };
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "any" => Proto::Any,
            other => return Err(RuleError::Proto(other.to_owned())),
        };
        let ports = parse_ports(ports)?;
        if looks_like_name(dest) {
            return Ok(Self::Name(HostRule {
                proto,
                name: dest.parse()?,
                ports,
            }));
        }
        Ok(Self::Net(Rule {
            proto,
            dest: parse_dest(dest)?,
            ports,
        }))
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(r) => r.fmt(f),
            Self::Name(r) => r.fmt(f),
        }
    }
}

fn parse_dest(s: &str) -> Result<IpNet, RuleError> {
    let net = if s.contains('/') {
        let net = IpNet::from_str(s).map_err(|_| dest_error(s))?;
        if net.trunc() != net {
            return Err(RuleError::HostBits {
                given: s.to_owned(),
                network: net.trunc().to_string(),
            });
        }
        net
    } else {
        IpNet::from(IpAddr::from_str(s).map_err(|_| dest_error(s))?)
    };
    Ok(unmap(net))
}

fn dest_error(s: &str) -> RuleError {
    RuleError::Dest(s.to_owned())
}

/// `::ffff:a.b.c.d/N` with N >= 96 names IPv4 hosts; store it as the IPv4 network.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

fn parse_ports(s: &str) -> Result<Ports, RuleError> {
    if s == "*" {
        return Ok(Ports {
            lo: 0,
            hi: u16::MAX,
        });
    }
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(RuleError::Port(s.to_owned())),
        Ok(n) => Ok(n),
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(RuleError::PortOrder(s.to_owned()));
    }
    Ok(Ports { lo, hi })
}

/// Rules compiled for the kernel's longest-prefix-match tries: for every destination prefix,
/// the port ranges of that prefix *and of every shorter prefix covering it*, so that the single
/// longest match the kernel finds carries the whole answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompiledRules {
    pub v4: Vec<(Ipv4Net, RuleValue)>,
    pub v6: Vec<(Ipv6Net, RuleValue)>,
}

/// A rule set that cannot be compiled (one prefix would need too many port ranges).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "destination {prefix} is covered by {count} distinct port ranges/protocols (the kernel's \
     limit per destination prefix is {MAX_PORT_RANGES}); merge ports into ranges"
)]
pub struct CompileError {
    pub prefix: IpNet,
    pub count: usize,
}

impl Rule {
    /// A stable identity: the first 8 bytes of the SHA-256 of the rule's canonical text (as
    /// for hostname rules). The kernel counts admitted calls under it, so a rule's count
    /// follows the rule through reloads that reorder or reformat the config.
    pub fn id(&self) -> u64 {
        text_id(&self.to_string())
    }
}

impl EgressRule {
    pub fn id(&self) -> u64 {
        match self {
            Self::Net(r) => r.id(),
            Self::Name(r) => r.id(),
        }
    }
}

/// The first 8 bytes of the SHA-256 of a rule's canonical text.
pub(crate) fn text_id(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Compiles `rules`. Each range carries its rule's [`Rule::id`], and the ranges of a prefix are
/// ordered so that the first one admitting a call is the rule the call is counted under: the
/// most specific (longest prefix, then fewest ports, then fewest protocols, then the rule
/// written first). Ranges of different rules are never merged, so that attribution stays
/// exact; a range wholly shadowed by earlier ones is left out (it could never be first).
pub fn compile(rules: &[Rule]) -> Result<CompiledRules, CompileError> {
    // Linear in rules up to a sort: a million rules compile in about a second. Each rule's id
    // is computed once (a rule covering many prefixes is copied into each), each prefix's
    // rules are one run of a sorted list, and a prefix looks for covering prefixes only at
    // the lengths some rule has (a handful), not at all 33 or 129.
    let ids: Vec<u64> = rules.iter().map(Rule::id).collect();
    let range_of = |index: usize| {
        let rule = &rules[index];
        PortRange {
            lo: rule.ports.lo,
            hi: rule.ports.hi,
            protos: rule.proto.bits(),
            _pad: [0; 3],
            rule: ids[index],
        }
    };
    // (destination, config index), sorted: the rules of a prefix are one run, in config order,
    // and the prefixes come in the order the compiled lists keep (deterministic, which keeps
    // kernel writes, errors and tests reproducible).
    let mut sorted: Vec<(IpNet, usize)> = rules
        .iter()
        .enumerate()
        .map(|(index, rule)| (rule.dest, index))
        .collect();
    sorted.sort_unstable();
    let mut runs: HashMap<IpNet, (usize, usize)> = HashMap::new();
    let mut prefixes: Vec<IpNet> = Vec::new();
    let (mut lens_v4, mut lens_v6) = ([false; 33], [false; 129]);
    let mut start = 0;
    while let Some(&(prefix, _)) = sorted.get(start) {
        let end = start + sorted[start..].partition_point(|&(p, _)| p == prefix);
        runs.insert(prefix, (start, end));
        prefixes.push(prefix);
        match prefix {
            IpNet::V4(n) => lens_v4[usize::from(n.prefix_len())] = true,
            IpNet::V6(n) => lens_v6[usize::from(n.prefix_len())] = true,
        }
        start = end;
    }
    let v4_count = prefixes
        .iter()
        .filter(|p| matches!(p, IpNet::V4(_)))
        .count();
    let mut compiled = CompiledRules {
        v4: Vec::with_capacity(v4_count),
        v6: Vec::with_capacity(prefixes.len() - v4_count),
    };
    for prefix in prefixes {
        let lens: &[bool] = match prefix {
            IpNet::V4(_) => &lens_v4,
            IpNet::V6(_) => &lens_v6,
        };
        // (prefix length, config index, range) of this prefix and every prefix covering it.
        let mut ranges = Vec::new();
        for (len, _) in lens
            .iter()
            .enumerate()
            .take(usize::from(prefix.prefix_len()) + 1)
            .filter(|&(_, &some)| some)
        {
            let Ok(len) = u8::try_from(len) else {
                continue;
            };
            let covering = match prefix {
                IpNet::V4(n) => Ipv4Net::new(n.network(), len).map(|n| IpNet::V4(n.trunc())),
                IpNet::V6(n) => Ipv6Net::new(n.network(), len).map(|n| IpNet::V6(n.trunc())),
            };
            if let Ok(covering) = covering
                && let Some(&(a, b)) = runs.get(&covering)
            {
                ranges.extend(
                    sorted[a..b]
                        .iter()
                        .map(|&(_, index)| (len, index, range_of(index))),
                );
            }
        }
        let ranges = order(ranges);
        if ranges.len() > MAX_PORT_RANGES {
            return Err(CompileError {
                prefix,
                count: ranges.len(),
            });
        }
        let mut value = RuleValue {
            count: u32::try_from(ranges.len()).unwrap_or(0),
            ..RuleValue::default()
        };
        value.ranges[..ranges.len()].copy_from_slice(&ranges);
        match prefix {
            IpNet::V4(n) => compiled.v4.push((n, value)),
            IpNet::V6(n) => compiled.v6.push((n, value)),
        }
    }
    Ok(compiled)
}

/// Orders one prefix's ranges most specific first and leaves out those no call could reach
/// first (every protocol and port of theirs is admitted by earlier ranges).
fn order(mut ranges: Vec<(u8, usize, PortRange)>) -> Vec<PortRange> {
    ranges.sort_by_key(|&(len, index, r)| {
        (
            std::cmp::Reverse(len),
            u32::from(r.hi) - u32::from(r.lo),
            r.protos.count_ones(),
            index,
        )
    });
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for (_, _, r) in ranges {
        let shadowed = (0..8u8)
            .filter(|bit| r.protos & (1 << bit) != 0)
            .all(|bit| covered(&out, 1 << bit, r.lo, r.hi));
        if !shadowed {
            out.push(r);
        }
    }
    out
}

/// Do the ranges of `ranges` that admit protocol bit `bit` cover every port of `lo..=hi`?
fn covered(ranges: &[PortRange], bit: u8, lo: u16, hi: u16) -> bool {
    let mut spans: Vec<(u32, u32)> = ranges
        .iter()
        .filter(|r| r.protos & bit != 0)
        .map(|r| (u32::from(r.lo), u32::from(r.hi)))
        .collect();
    spans.sort_unstable();
    let mut next = u32::from(lo);
    for (a, b) in spans {
        if a > next {
            break;
        }
        next = next.max(b + 1);
        if next > u32::from(hi) {
            return true;
        }
    }
    false
}

/// The id of the rule the compiled set counts a call under, if it admits it: the userspace
/// twin of the kernel's decision.
pub fn admitting_rule(compiled: &CompiledRules, proto: u8, addr: IpAddr, port: u16) -> Option<u64> {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let best = match addr {
        IpAddr::V4(a) => longest_v4(&compiled.v4, a),
        IpAddr::V6(a) => longest_v6(&compiled.v6, a),
    };
    best.and_then(|v| v.admitting_rule(proto, port))
}

/// Does the compiled rule set admit this destination? The userspace twin of the kernel's
/// decision, used by `check`-style tooling and tests of the compiler.
pub fn admits(compiled: &CompiledRules, proto: u8, addr: IpAddr, port: u16) -> bool {
    admitting_rule(compiled, proto, addr, port).is_some()
}

fn longest_v4(entries: &[(Ipv4Net, RuleValue)], a: Ipv4Addr) -> Option<&RuleValue> {
    entries
        .iter()
        .filter(|(n, _)| n.contains(&a))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, v)| v)
}

fn longest_v6(entries: &[(Ipv6Net, RuleValue)], a: Ipv6Addr) -> Option<&RuleValue> {
    entries
        .iter()
        .filter(|(n, _)| n.contains(&a))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use agentwatch_common::{PROTO_OTHER, PROTO_TCP, PROTO_UDP};

    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_good_rules() {
        let r = rule("tcp 10.1.2.3 443");
        assert_eq!(r.proto, Proto::Tcp);
        assert_eq!(r.dest, "10.1.2.3/32".parse::<IpNet>().unwrap());
        assert_eq!(r.ports, Ports { lo: 443, hi: 443 });
        let r = rule("  any   2001:db8::/32   *  ");
        assert_eq!(r.proto, Proto::Any);
        assert_eq!(r.dest, "2001:db8::/32".parse::<IpNet>().unwrap());
        assert_eq!(r.ports, Ports { lo: 0, hi: 65535 });
        assert_eq!(rule("udp ::1 53").dest, "::1/128".parse::<IpNet>().unwrap());
        assert_eq!(
            rule("tcp 10.0.0.0/8 80-443").ports,
            Ports { lo: 80, hi: 443 }
        );
        assert_eq!(rule("tcp 0.0.0.0/0 1-1").ports, Ports { lo: 1, hi: 1 });
        assert_eq!(
            rule("tcp 10.0.0.0/8 80-443").to_string(),
            "tcp 10.0.0.0/8 80-443"
        );
    }

    #[test]
    fn mapped_v6_rules_become_v4() {
        assert_eq!(
            rule("tcp ::ffff:127.0.0.1 80").dest,
            "127.0.0.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            rule("tcp ::ffff:10.0.0.0/104 80").dest,
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn rejects_bad_rules_with_clear_errors() {
        let err = |s: &str| s.parse::<Rule>().expect_err(s).to_string();
        assert_eq!(
            err("tcp 10.0.0.1"),
            "expected `PROTO DEST PORTS` (e.g. `tcp 10.0.0.0/8 443`), got 2 field(s)"
        );
        assert_eq!(
            err("icmp 10.0.0.1 1"),
            "unknown protocol `icmp`: expected tcp, udp or any"
        );
        assert_eq!(
            err("TCP 10.0.0.1 1"),
            "unknown protocol `TCP`: expected tcp, udp or any"
        );
        assert!(err("tcp api.example.com 443").contains("is a hostname"));
        assert!(err("tcp *.example.com 443").contains("is a hostname"));
        assert_eq!(
            err("tcp 10.0.0.300 1"),
            "bad destination `10.0.0.300`: expected an IPv4/IPv6 address or CIDR"
        );
        assert_eq!(
            err("tcp 10.0.0.0/33 1"),
            "bad destination `10.0.0.0/33`: expected an IPv4/IPv6 address or CIDR"
        );
        assert_eq!(
            err("tcp 10.1.2.3/8 1"),
            "destination `10.1.2.3/8` has host bits set; did you mean `10.0.0.0/8`?"
        );
        assert_eq!(
            err("tcp 10.0.0.1 0"),
            "bad port `0`: expected a port 1-65535, a range LO-HI, or *"
        );
        assert!(err("tcp 10.0.0.1 65536").starts_with("bad port `65536`"));
        assert!(err("tcp 10.0.0.1 80-").starts_with("bad port `80-`"));
        assert!(err("tcp 10.0.0.1 http").starts_with("bad port `http`"));
        assert_eq!(
            err("tcp 10.0.0.1 443-80"),
            "bad port range `443-80`: the low port is above the high port"
        );
        assert!(err("tcp 10.0.0.1 80 extra").contains("got 4 field(s)"));
    }

    #[test]
    fn covering_prefixes_fold_into_longer_ones() {
        let rules = [
            rule("tcp 10.0.0.0/8 80"),
            rule("tcp 10.1.2.3 443"),
            rule("udp 0.0.0.0/0 53"),
        ];
        let c = compile(&rules).unwrap();
        assert_eq!(c.v4.len(), 3);
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        // The /32 answers for 80 (from the /8) and 53/udp (from the /0) as well as its own 443.
        assert!(admits(&c, PROTO_TCP, a("10.1.2.3"), 80));
        assert!(admits(&c, PROTO_TCP, a("10.1.2.3"), 443));
        assert!(admits(&c, PROTO_UDP, a("10.1.2.3"), 53));
        assert!(!admits(&c, PROTO_UDP, a("10.1.2.3"), 443));
        assert!(!admits(&c, PROTO_TCP, a("10.1.2.4"), 443));
        assert!(admits(&c, PROTO_TCP, a("10.200.0.1"), 80));
        assert!(!admits(&c, PROTO_TCP, a("11.0.0.1"), 80));
        assert!(admits(&c, PROTO_UDP, a("11.0.0.1"), 53));
        assert!(!admits(&c, PROTO_OTHER, a("11.0.0.1"), 53));
        assert!(admits(&c, PROTO_TCP, a("::ffff:10.9.9.9"), 80));
        assert!(!admits(&c, PROTO_TCP, a("::1"), 80));
    }

    #[test]
    fn shadowed_ranges_go_and_the_limit_holds() {
        let rules = [
            rule("tcp 10.0.0.1 80"),
            rule("tcp 10.0.0.1 81-90"),
            rule("any 10.0.0.1 85"),
            // Covered by the two tcp ranges together: never the first match.
            rule("tcp 10.0.0.1 80-90"),
            // The same rule written twice counts once.
            rule("tcp 10.0.0.1/32 80"),
        ];
        let c = compile(&rules).unwrap();
        assert_eq!(c.v4[0].1.count, 3);
        let many: Vec<Rule> = (1..=17)
            .map(|p| rule(&format!("tcp 10.0.0.1 {}", p * 10)))
            .collect();
        let e = compile(&many).unwrap_err();
        assert_eq!(e.count, 17);
        assert!(compile(&many[..16]).is_ok());
    }

    #[test]
    fn calls_count_under_the_most_specific_rule() {
        let rules = [
            rule("tcp 10.0.0.0/8 *"),
            rule("tcp 10.1.2.3 443"),
            rule("any 10.1.2.3 400-500"),
            rule("tcp 10.1.2.3 80-90"),
            rule("udp 0.0.0.0/0 53"),
        ];
        let c = compile(&rules).unwrap();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let hit = |proto, addr: &str, port| admitting_rule(&c, proto, a(addr), port);
        let id = |i: usize| Some(rules[i].id());
        // The /32's own ranges before the /8's, the narrowest first.
        assert_eq!(hit(PROTO_TCP, "10.1.2.3", 443), id(1));
        assert_eq!(hit(PROTO_TCP, "10.1.2.3", 444), id(2));
        assert_eq!(hit(PROTO_UDP, "10.1.2.3", 444), id(2));
        assert_eq!(hit(PROTO_TCP, "10.1.2.3", 85), id(3));
        assert_eq!(hit(PROTO_TCP, "10.1.2.3", 22), id(0));
        assert_eq!(hit(PROTO_TCP, "10.1.2.4", 443), id(0));
        assert_eq!(hit(PROTO_UDP, "10.1.2.3", 53), id(4));
        assert_eq!(hit(PROTO_UDP, "10.1.2.4", 54), None);
        // Rule ids follow the canonical text, not the spelling or the position.
        assert_eq!(rule("tcp 10.1.2.3/32 443").id(), rules[1].id());
        assert_ne!(rule("tcp 10.1.2.3 444").id(), rules[1].id());
    }
}
