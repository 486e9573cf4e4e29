//! Hostname rules end to end: an agent that names hosts in its egress rules has all its DNS
//! traffic (UDP and TCP to port 53, whatever resolver address it asks, IPv4 or IPv6) turned in
//! the kernel to the daemon's forwarder. The forwarder refuses names no rule allows (REFUSED,
//! never asked upstream, audited), asks `dns_upstream` (here a [`TestDnsServer`] on loopback)
//! for the others, and writes the answer's addresses into that agent's kernel allow-list, with
//! the rule's protocol and ports and the answer's TTL bounded by `dns_min_ttl`/`dns_max_ttl`,
//! before the agent sees the answer. Every test runs a real daemon, a real DNS server and real
//! listeners on loopback addresses, and asserts exact errnos, rcodes and counts.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use agentwatch_tests::{
    Attempt, DaemonEnv, EPERM,
    dns::{
        Lookup, RawReply, Rdata, TestDnsServer, ZoneRecord, hex, malformed_with_header,
        oversized_junk, parse_lookups, parse_raw, rec, start_daemon, start_daemon_with_min_ttl,
    },
    one, parse_attempts, privileged, probe_bin,
};
use agentwatch_tests::{scaled, scaled_toml, skipped_under_tcg, sleep_until, wait_until};
use hickory_proto::{
    op::{Message, OpCode, Query as HickoryQuery},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

/// The resolver address the agents ask: nothing listens there; only the redirect answers.
const RESOLVER: &str = "10.53.0.1";

/// An `[[agents]]` table with these egress rules.
fn agent(name: &str, rules: &[String]) -> String {
    let list: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[[agents]]\nname = \"{name}\"\negress = [{}]\n\n",
        list.join(", ")
    )
}

fn a(name: &str, ip: [u8; 4], ttl: u32) -> ZoneRecord {
    rec(name, Rdata::A(Ipv4Addr::from(ip)), ttl)
}

/// TCP listeners on the same port of every address of `ips`.
fn listen_all(ips: &[&str]) -> (Vec<TcpListener>, u16) {
    for _ in 0..50 {
        let first = TcpListener::bind((ips[0], 0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        let rest: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if let Ok(mut rest) = rest {
            rest.insert(0, first);
            return (rest, port);
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// A port nothing listens on (a connect that gets through is refused: ECONNREFUSED).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// How a test runs aw-probe as an agent's process.
#[derive(Clone, Copy)]
struct Agent<'a> {
    env: &'a DaemonEnv,
    name: &'a str,
    /// `aw-probe --cgroup` as root instead of `agentwatch launch` (needed once the daemon is
    /// dead, or for a process that must keep CAP_SYS_ADMIN).
    direct: bool,
}

impl<'a> Agent<'a> {
    fn launched(env: &'a DaemonEnv, name: &'a str) -> Self {
        Self {
            env,
            name,
            direct: false,
        }
    }

    fn direct(env: &'a DaemonEnv, name: &'a str) -> Self {
        Self {
            env,
            name,
            direct: true,
        }
    }

    fn cgroup(&self) -> PathBuf {
        self.env.agent_cgroup(self.name)
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = if self.direct {
            Command::new(probe_bin())
                .arg("--cgroup")
                .arg(self.cgroup())
                .args(args)
                .output()
                .expect("running aw-probe")
        } else {
            self.env.launch_probe(self.name, args)
        };
        assert!(
            out.status.success(),
            "{} {args:?}: {:?}\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// One lookup of `name` for `qtype`, asked of `server`:53 over `mode`.
    fn resolve_at(&self, server: &str, name: &str, qtype: &str, mode: &str) -> Lookup {
        let out = self.run(&["resolve", server, "53", name, qtype, mode]);
        let mut l = parse_lookups(&out.stdout);
        assert_eq!(l.len(), 1, "{}: {l:?}", self.name);
        l.remove(0)
    }

    /// One UDP lookup of `name` for `qtype`, asked of 10.53.0.1:53.
    fn resolve(&self, name: &str, qtype: &str) -> Lookup {
        self.resolve_at(RESOLVER, name, qtype, "udp")
    }

    fn connect(&self, ip: &str, port: u16) -> Attempt {
        one(parse_attempts(
            &self.run(&["connect", "tcp", ip, &port.to_string()]).stdout,
        ))
    }

    #[track_caller]
    fn assert_connects(&self, ip: &str, port: u16, why: &str) {
        let r = self.connect(ip, port);
        assert!(r.ok, "{}: {why}: connect {ip} {port}: {r:?}", self.name);
    }

    #[track_caller]
    fn assert_eperm(&self, ip: &str, port: u16, why: &str) {
        let r = self.connect(ip, port);
        assert_eq!(
            (r.ok, r.errno),
            (false, EPERM),
            "{}: {why}: connect {ip} {port}",
            self.name
        );
    }

    fn raw(&self, server: &str, bytes: &[u8], tcp: bool) -> RawReply {
        let h = hex(bytes);
        let mut args = vec!["dns-raw", server, "53", h.as_str()];
        if tcp {
            args.push("tcp");
        }
        let mut r = parse_raw(&self.run(&args).stdout);
        assert_eq!(r.len(), 1, "{r:?}");
        r.remove(0)
    }
}

/// A NOERROR answer from `from` carrying exactly `addrs`.
#[track_caller]
fn assert_answer(l: &Lookup, addrs: &[&str], from: &str) {
    assert_eq!(
        (l.errno, l.rcode.as_deref(), l.id_ok),
        (0, Some("NoError"), true),
        "{l:?}"
    );
    assert_eq!(l.addrs, addrs, "{l:?}");
    assert_eq!(l.from.as_deref(), Some(from), "who answered: {l:?}");
}

/// A REFUSED answer from `from`, with no records.
#[track_caller]
fn assert_refused(l: &Lookup, from: &str) {
    assert_eq!(
        (l.errno, l.rcode.as_deref(), l.id_ok),
        (0, Some("Refused"), true),
        "{l:?}"
    );
    assert!(l.addrs.is_empty() && l.cnames.is_empty(), "{l:?}");
    assert_eq!(l.from.as_deref(), Some(from), "who answered: {l:?}");
}

/// The `dns` counters of an agent's status row: (allowed, denied, failed, malformed, learned).
fn dns_counts(env: &DaemonEnv, agent: &str) -> (u64, u64, u64, u64, u64) {
    let status = env.status();
    let row = &status[agent]["dns"];
    let n = |k: &str| {
        row[k]
            .as_u64()
            .unwrap_or_else(|| panic!("status {agent}.dns.{k}: {row}"))
    };
    (
        n("allowed"),
        n("denied"),
        n("failed"),
        n("malformed"),
        n("learned"),
    )
}

fn dns_metric(env: &DaemonEnv, agent: &str, verdict: &str) -> Option<f64> {
    env.metric(&format!(
        "agentwatch_dns_queries_total{{agent=\"{agent}\",verdict=\"{verdict}\"}}"
    ))
}

fn learned_metric(env: &DaemonEnv, agent: &str) -> Option<f64> {
    env.metric(&format!(
        "agentwatch_dns_learned_addresses{{agent=\"{agent}\"}}"
    ))
}

fn q(name: &str, t: RecordType) -> (String, RecordType) {
    (name.to_owned(), t)
}

#[test]
fn an_allowed_name_opens_its_address_on_the_rules_port_only() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.1"]);
    let (_o, other) = listen_all(&["127.0.20.1"]);
    let closed = closed_port();
    let server = TestDnsServer::start([a("api.agentwatch.test", [127, 0, 20, 1], 60)]);
    let env = start_daemon(
        &server,
        &agent(
            "api",
            &[
                format!("tcp api.agentwatch.test {port}"),
                format!("tcp api.agentwatch.test {closed}"),
            ],
        ),
    );
    let api = Agent::launched(&env, "api");
    api.assert_eperm("127.0.20.1", port, "before the name was resolved");
    api.assert_eperm("127.0.20.1", closed, "before the name was resolved");

    let l = api.resolve("api.agentwatch.test", "A");
    assert_answer(&l, &["127.0.20.1"], "10.53.0.1:53");
    assert_eq!(
        l.ttls,
        [60],
        "a TTL within the bounds reaches the agent as is"
    );
    assert_eq!(server.queries(), [q("api.agentwatch.test", RecordType::A)]);

    api.assert_connects(
        "127.0.20.1",
        port,
        "the rule's port, right after the answer",
    );
    // Let through by the kernel, refused by the host: nothing listens there.
    let r = api.connect("127.0.20.1", closed);
    assert_eq!((r.ok, r.errno), (false, libc::ECONNREFUSED), "{r:?}");
    api.assert_eperm("127.0.20.1", other, "another port of the same address");
    api.assert_eperm("127.0.20.2", port, "an address the name did not resolve to");
    assert_eq!(dns_counts(&env, "api"), (1, 0, 0, 0, 1));
    assert_eq!(dns_metric(&env, "api", "allowed"), Some(1.0));
    assert_eq!(learned_metric(&env, "api"), Some(1.0));
}

#[test]
fn a_denied_name_is_refused_audited_and_never_asked_upstream() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.1", "127.0.20.2"]);
    let server = TestDnsServer::start([
        a("api.agentwatch.test", [127, 0, 20, 1], 60),
        a("evil.agentwatch.test", [127, 0, 20, 2], 60),
        rec("evil.agentwatch.test", Rdata::Aaaa(Ipv6Addr::LOCALHOST), 60),
    ]);
    let env = start_daemon(
        &server,
        &agent("strict", &[format!("tcp api.agentwatch.test {port}")]),
    );
    let strict = Agent::launched(&env, "strict");

    let l = strict.resolve("evil.agentwatch.test", "A");
    assert_refused(&l, "10.53.0.1:53");
    let l = strict.resolve_at(RESOLVER, "Evil.AgentWatch.Test", "AAAA", "tcp");
    assert_refused(&l, "10.53.0.1:53");
    assert_eq!(server.queries(), [], "a denied name is never forwarded");

    let lines = env.wait_audit("dns_denied", 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for (line, (qtype, transport)) in lines.iter().zip([("A", "udp"), ("AAAA", "tcp")]) {
        assert_eq!(line["agent"], "strict", "{line}");
        assert_eq!(line["name"], "evil.agentwatch.test", "{line}");
        assert_eq!(line["qtype"], qtype, "{line}");
        assert_eq!(line["transport"], transport, "{line}");
    }
    assert_eq!(dns_counts(&env, "strict"), (0, 2, 0, 0, 0));
    assert_eq!(dns_metric(&env, "strict", "denied"), Some(2.0));
    strict.assert_eperm("127.0.20.2", port, "the denied name's address");
    // The allowed name still resolves; the refusals changed nothing for it.
    assert_answer(
        &strict.resolve("api.agentwatch.test", "A"),
        &["127.0.20.1"],
        "10.53.0.1:53",
    );
    strict.assert_connects("127.0.20.1", port, "the allowed name's address");
    strict.assert_eperm("127.0.20.2", port, "the denied name's address, still");
}

#[test]
fn wildcards_apex_cname_chains_case_trailing_dots_and_aaaa() {
    privileged!();
    let ips = [
        "127.0.20.11",
        "127.0.20.12",
        "127.0.20.13",
        "127.0.20.14",
        "127.0.20.15",
        "127.0.20.16",
    ];
    let (_l, port) = listen_all(&ips);
    let (_l6, port6) = listen_all(&["::1"]);
    let (_o6, other6) = listen_all(&["::1"]);
    let server = TestDnsServer::start([
        a("a.cdn.agentwatch.test", [127, 0, 20, 11], 60),
        a("a.b.cdn.agentwatch.test", [127, 0, 20, 12], 60),
        a("cdn.agentwatch.test", [127, 0, 20, 13], 60),
        // www -> edge -> origin: only www has a rule.
        rec(
            "www.agentwatch.test",
            Rdata::Cname("edge.unlisted.agentwatch.test".into()),
            60,
        ),
        rec(
            "edge.unlisted.agentwatch.test",
            Rdata::Cname("origin.unlisted.agentwatch.test".into()),
            60,
        ),
        a("origin.unlisted.agentwatch.test", [127, 0, 20, 14], 60),
        a("mixed.agentwatch.test", [127, 0, 20, 15], 60),
        a("dotted.agentwatch.test", [127, 0, 20, 16], 60),
        rec("v6.agentwatch.test", Rdata::Aaaa(Ipv6Addr::LOCALHOST), 60),
    ]);
    let wild_rules = vec![
        format!("tcp *.cdn.agentwatch.test {port}"),
        format!("tcp www.agentwatch.test {port}"),
        // A rule in mixed case and one with a trailing dot: names are case-insensitive and the
        // root label is implied.
        format!("tcp MiXeD.AgentWatch.test {port}"),
        format!("tcp dotted.agentwatch.test. {port}"),
        format!("tcp v6.agentwatch.test {port6}"),
    ];
    let apex_rules = vec![
        format!("tcp *.cdn.agentwatch.test {port}"),
        format!("tcp cdn.agentwatch.test {port}"),
    ];
    let env = start_daemon(
        &server,
        &format!(
            "{}{}",
            agent("wild", &wild_rules),
            agent("apex", &apex_rules)
        ),
    );
    let wild = Agent::launched(&env, "wild");
    let apex = Agent::launched(&env, "apex");
    let from = "10.53.0.1:53";

    // The wildcard covers names one and two labels below it ...
    for (name, ip) in [
        ("a.cdn.agentwatch.test", "127.0.20.11"),
        ("a.b.cdn.agentwatch.test", "127.0.20.12"),
    ] {
        wild.assert_eperm(ip, port, "before the lookup");
        assert_answer(&wild.resolve(name, "A"), &[ip], from);
        wild.assert_connects(ip, port, name);
    }
    // ... but not the apex itself ...
    assert_refused(&wild.resolve("cdn.agentwatch.test", "A"), from);
    assert_eq!(server.queries_for("cdn.agentwatch.test"), 0);
    wild.assert_eperm("127.0.20.13", port, "the apex's address");
    // ... which an agent that lists it gets, and which then opens nothing for the other.
    assert_answer(
        &apex.resolve("cdn.agentwatch.test", "A"),
        &["127.0.20.13"],
        from,
    );
    apex.assert_connects("127.0.20.13", port, "the listed apex");
    wild.assert_eperm("127.0.20.13", port, "learned by another agent");

    // A CNAME chain: the asked name's rule admits the address at the end of the chain.
    wild.assert_eperm("127.0.20.14", port, "before the lookup");
    let l = wild.resolve("www.agentwatch.test", "A");
    assert_answer(&l, &["127.0.20.14"], from);
    assert_eq!(
        l.cnames,
        [
            "edge.unlisted.agentwatch.test",
            "origin.unlisted.agentwatch.test"
        ]
    );
    wild.assert_connects("127.0.20.14", port, "the end of an allowed name's chain");
    // Asked directly, a name inside the chain needs a rule of its own.
    server.clear_queries();
    assert_refused(&wild.resolve("origin.unlisted.agentwatch.test", "A"), from);
    assert_refused(&wild.resolve("edge.unlisted.agentwatch.test", "A"), from);
    assert_eq!(server.queries(), []);

    // Case and the trailing dot, in the question and in the rule.
    assert_answer(
        &wild.resolve("mIxEd.AGENTWATCH.test", "A"),
        &["127.0.20.15"],
        from,
    );
    wild.assert_connects("127.0.20.15", port, "a mixed-case name");
    assert_answer(
        &wild.resolve("DOTTED.agentwatch.test.", "A"),
        &["127.0.20.16"],
        from,
    );
    wild.assert_connects("127.0.20.16", port, "a rule with a trailing dot");

    // AAAA: the IPv6 address is opened on the rule's port only.
    wild.assert_eperm("::1", port6, "before the AAAA lookup");
    assert_answer(&wild.resolve("v6.agentwatch.test", "AAAA"), &["::1"], from);
    wild.assert_connects("::1", port6, "the AAAA answer on the rule's port");
    wild.assert_eperm("::1", other6, "the AAAA answer on another port");
    // The rule's port is TCP: the A lookups above opened nothing over UDP.
    let udp = wild.run(&["connect", "udp", "127.0.20.11", &port.to_string()]);
    assert_eq!(one(parse_attempts(&udp.stdout)).errno, EPERM);

    assert_eq!(dns_counts(&env, "wild"), (6, 3, 0, 0, 6));
    assert_eq!(dns_counts(&env, "apex"), (1, 0, 0, 0, 1));
}

#[test]
fn learned_addresses_expire_after_the_bounded_ttl() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.21", "127.0.20.22", "127.0.20.23"]);
    // The TTLs, dns_min_ttl and the sleeps are stretched alike by the time scale (see
    // `scaled`): under TCG a lookup and a connect (two processes) take seconds, longer than a
    // 1 s TTL. On the host they are 2 s, 1 s and the times below.
    let api_ttl = scaled(Duration::from_secs(2));
    let server = TestDnsServer::start([
        a(
            "api.agentwatch.test",
            [127, 0, 20, 21],
            u32::try_from(api_ttl.as_secs()).expect("ttl"),
        ),
        // TTL 0: raised to dns_min_ttl (1 s) in the kernel, so the connect after the answer
        // still gets through.
        a("zero.agentwatch.test", [127, 0, 20, 22], 0),
        // A day: lowered to dns_max_ttl (1 h), in the kernel and in the answer.
        a("long.agentwatch.test", [127, 0, 20, 23], 86_400),
    ]);
    let env = start_daemon_with_min_ttl(
        &server,
        &agent("ttl", &[format!("tcp *.agentwatch.test {port}")]),
        &scaled_toml(Duration::from_secs(1)),
    );
    let ttl = Agent::launched(&env, "ttl");
    let from = "10.53.0.1:53";

    let l = ttl.resolve("long.agentwatch.test", "A");
    assert_answer(&l, &["127.0.20.23"], from);
    assert_eq!(l.ttls, [3600], "the answer's TTL is lowered to dns_max_ttl");
    assert_answer(
        &ttl.resolve("zero.agentwatch.test", "A"),
        &["127.0.20.22"],
        from,
    );
    ttl.assert_connects("127.0.20.22", port, "TTL 0, right after the answer");
    let l = ttl.resolve("api.agentwatch.test", "A");
    let t0 = Instant::now();
    assert_answer(&l, &["127.0.20.21"], from);
    assert_eq!(l.ttls, [u32::try_from(api_ttl.as_secs()).expect("ttl")]);
    ttl.assert_connects("127.0.20.21", port, "TTL 2 s, right after the answer");

    // 1.4 s on: the TTL-0 entry (1 s) is gone, the 2 s one is not.
    sleep_until(t0 + scaled(Duration::from_millis(1400)));
    ttl.assert_connects("127.0.20.21", port, "TTL 2 s, 1.4 s after the answer");
    ttl.assert_eperm("127.0.20.22", port, "TTL 0 raised to 1 s, 1.4 s after");

    sleep_until(t0 + scaled(Duration::from_millis(3500)));
    ttl.assert_eperm("127.0.20.21", port, "TTL 2 s, 3.5 s after the answer");
    ttl.assert_connects("127.0.20.23", port, "dns_max_ttl, 3.5 s after");
    wait_until(
        "the expired entries to leave the learned count",
        Duration::from_secs(5),
        || dns_counts(&env, "ttl").4 == 1,
    );

    // Resolved again: open again, for another TTL.
    assert_answer(
        &ttl.resolve("api.agentwatch.test", "A"),
        &["127.0.20.21"],
        from,
    );
    ttl.assert_connects("127.0.20.21", port, "resolved again");
    assert_eq!(server.queries_for("api.agentwatch.test"), 2);
    assert_eq!(dns_counts(&env, "ttl"), (4, 0, 0, 0, 2));
}

#[test]
fn two_agents_resolving_the_same_name_each_get_their_own_ports() {
    privileged!();
    let (_l1, p1) = listen_all(&["127.0.20.31"]);
    let (_l2, p2) = listen_all(&["127.0.20.31"]);
    let server = TestDnsServer::start([
        a("api.agentwatch.test", [127, 0, 20, 31], 60),
        a("other.agentwatch.test", [127, 0, 20, 32], 60),
    ]);
    let env = start_daemon(
        &server,
        &format!(
            "{}{}{}",
            agent("one", &[format!("tcp api.agentwatch.test {p1}")]),
            agent("two", &[format!("tcp api.agentwatch.test {p2}")]),
            agent("none", &[format!("tcp other.agentwatch.test {p1}")]),
        ),
    );
    let one_ = Agent::launched(&env, "one");
    let two = Agent::launched(&env, "two");
    let none = Agent::launched(&env, "none");
    let ip = "127.0.20.31";
    let from = "10.53.0.1:53";

    assert_answer(&one_.resolve("api.agentwatch.test", "A"), &[ip], from);
    one_.assert_connects(ip, p1, "its rule's port");
    one_.assert_eperm(ip, p2, "the other agent's port");
    two.assert_eperm(ip, p2, "learned by `one`, not by `two`");
    two.assert_eperm(ip, p1, "learned by `one`, not by `two`");

    assert_answer(&two.resolve("api.agentwatch.test", "A"), &[ip], from);
    two.assert_connects(ip, p2, "its rule's port");
    two.assert_eperm(ip, p1, "the other agent's port");
    one_.assert_connects(ip, p1, "unchanged by `two`'s lookup");
    one_.assert_eperm(ip, p2, "unchanged by `two`'s lookup");

    assert_refused(&none.resolve("api.agentwatch.test", "A"), from);
    none.assert_eperm(ip, p1, "no rule for the name");
    none.assert_eperm(ip, p2, "no rule for the name");

    assert_eq!(dns_counts(&env, "one"), (1, 0, 0, 0, 1));
    assert_eq!(dns_counts(&env, "two"), (1, 0, 0, 0, 1));
    assert_eq!(dns_counts(&env, "none"), (0, 1, 0, 0, 0));
    assert_eq!(server.queries_for("api.agentwatch.test"), 2);
}

#[test]
fn every_resolver_address_and_transport_goes_through_the_forwarder() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.41"]);
    let cases = [
        ("127.0.0.99", "udp", "127.0.0.99:53"),
        ("127.0.0.53", "udp-connected", "127.0.0.53:53"),
        ("10.53.0.1", "udp", "10.53.0.1:53"),
        ("10.53.0.1", "udp-connected", "10.53.0.1:53"),
        ("10.53.0.1", "tcp", "10.53.0.1:53"),
        ("127.0.0.99", "tcp", "127.0.0.99:53"),
        ("fd00::53", "udp", "[fd00::53]:53"),
        ("fd00::53", "udp-connected", "[fd00::53]:53"),
        ("fd00::53", "tcp", "[fd00::53]:53"),
    ];
    // One name per case, so each case's question is seen upstream on its own.
    let name = |i: usize| format!("c{i}.res.agentwatch.test");
    let server = TestDnsServer::start((0..cases.len()).map(|i| a(&name(i), [127, 0, 20, 41], 60)));
    let env = start_daemon(
        &server,
        &agent("res", &[format!("tcp *.res.agentwatch.test {port}")]),
    );
    let res = Agent::launched(&env, "res");
    for (i, (resolver, mode, from)) in cases.iter().enumerate() {
        let l = res.resolve_at(resolver, &name(i), "A", mode);
        assert_answer(&l, &["127.0.20.41"], from);
        assert_eq!(
            server.queries_for(&name(i)),
            1,
            "{resolver} over {mode}: {:?}",
            server.queries()
        );
    }
    res.assert_connects("127.0.20.41", port, "learned through every path");
    let asked = server.queries().len();
    assert_eq!(asked, cases.len());

    // Asking the upstream on its own port is no DNS to port 53: plain egress, denied.
    let upstream_port = server.addr().port().to_string();
    for mode in ["udp", "tcp"] {
        let out = res.run(&["resolve", "127.0.0.1", &upstream_port, &name(0), "A", mode]);
        let l = one_lookup(&out);
        assert_eq!(
            (l.errno, l.rcode.as_deref()),
            (EPERM, None),
            "{mode}: {l:?}"
        );
    }
    // Port 53 is what is turned, not the address: a resolver address on another port is not.
    let out = res.run(&["resolve", RESOLVER, "5353", &name(0), "A", "udp"]);
    assert_eq!(one_lookup(&out).errno, EPERM);
    assert_eq!(
        server.queries().len(),
        asked,
        "nothing reached the upstream"
    );
    assert_eq!(dns_counts(&env, "res"), (9, 0, 0, 0, 1));
}

/// Each redirected socket's record of the resolver it asked (`DNS_ORIG`) is what shows the
/// answer as coming from that resolver; it must go when the socket goes. Before the release
/// hook every lookup left one entry behind for good (the soak's map grew 150 a minute). The
/// hook looks only at sockets unconnected or connected to loopback (where forwarders listen):
/// every form a redirected socket takes is here.
#[test]
fn every_lookup_leaves_no_redirect_record_behind() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.42"]);
    let modes = [
        ("10.53.0.1", "udp", "10.53.0.1:53"),
        ("10.53.0.1", "udp-connected", "10.53.0.1:53"),
        ("10.53.0.1", "tcp", "10.53.0.1:53"),
        ("fd00::53", "udp", "[fd00::53]:53"),
        ("fd00::53", "tcp", "[fd00::53]:53"),
        // An AF_INET6 socket naming an IPv4 resolver: connected to ::ffff:127.0.0.1 after
        // the redirect, which the release hook must still see as its forwarder. (Its UDP
        // sends, judged again by the IPv4 sendmsg hook, got EPERM until 2026-12-07.)
        ("::ffff:10.53.0.1", "udp-connected", "[::ffff:10.53.0.1]:53"),
        ("::ffff:10.53.0.1", "tcp", "[::ffff:10.53.0.1]:53"),
    ];
    const ROUNDS: usize = 4;
    let server = TestDnsServer::start([a("leak.agentwatch.test", [127, 0, 20, 42], 60)]);
    let env = start_daemon(
        &server,
        &agent("leak", &[format!("tcp leak.agentwatch.test {port}")]),
    );
    assert_eq!(
        agentwatch_tests::pinned_entries(&env.pin_dir, "DNS_ORIG"),
        Some(0)
    );
    let leak = Agent::launched(&env, "leak");
    for _ in 0..ROUNDS {
        for (resolver, mode, from) in modes {
            let l = leak.resolve_at(resolver, "leak.agentwatch.test", "A", mode);
            // The answer shows the resolver asked: the record was there while it was needed.
            assert_answer(&l, &["127.0.20.42"], from);
        }
        // A refused name is redirected (and recorded) all the same.
        let l = leak.resolve_at(RESOLVER, "other.example", "A", "udp");
        assert_refused(&l, "10.53.0.1:53");
    }
    let lookups = ROUNDS * (modes.len() + 1);
    assert_eq!(server.queries().len(), ROUNDS * modes.len());
    assert_eq!(
        dns_counts(&env, "leak"),
        ((ROUNDS * modes.len()) as u64, ROUNDS as u64, 0, 0, 1)
    );
    // The count reads pinned maps for real: the one learned address is there.
    assert_eq!(
        agentwatch_tests::pinned_entries(&env.pin_dir, "DNS_ALLOW"),
        Some(1)
    );
    // Every probe process exited, so every redirected socket was released.
    assert_eq!(
        agentwatch_tests::pinned_entries(&env.pin_dir, "DNS_ORIG"),
        Some(0),
        "{lookups} lookups"
    );
}

fn one_lookup(out: &Output) -> Lookup {
    let mut l = parse_lookups(&out.stdout);
    assert_eq!(l.len(), 1, "{l:?}");
    l.remove(0)
}

#[test]
fn malformed_and_oversized_packets_get_formerr_or_nothing_and_change_nothing() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.51"]);
    let server = TestDnsServer::start([a("api.agentwatch.test", [127, 0, 20, 51], 60)]);
    let rules = [format!("tcp api.agentwatch.test {port}")];
    let env = start_daemon(
        &server,
        &format!("{}{}", agent("junk", &rules), agent("other", &rules)),
    );
    let junk = Agent::launched(&env, "junk");
    let other = Agent::launched(&env, "other");

    // Shorter than a header: no reply (the 2 s wait runs out).
    let r = junk.raw(RESOLVER, &[1, 2, 3, 4, 5], false);
    assert_eq!((r.errno, r.reply_len), (libc::EAGAIN, 0), "{r:?}");
    // A header, then a question cut short: FORMERR with the same id.
    let r = junk.raw(RESOLVER, &malformed_with_header(0xbeef), false);
    assert_eq!(
        (r.errno, r.rcode.as_deref(), r.id),
        (0, Some("FormErr"), Some(0xbeef)),
        "{r:?}"
    );
    // 3000 bytes of junk behind a header: FORMERR with the same id.
    let r = junk.raw(RESOLVER, &oversized_junk(0x1234, 3000), false);
    assert_eq!(
        (r.errno, r.rcode.as_deref(), r.id),
        (0, Some("FormErr"), Some(0x1234)),
        "{r:?}"
    );
    // Over TCP: FORMERR with the same id, or the connection closed without a reply.
    let r = junk.raw(RESOLVER, &malformed_with_header(0x4321), true);
    assert!(
        (r.errno, r.rcode.as_deref(), r.id) == (0, Some("FormErr"), Some(0x4321))
            || (r.reply_len == 0 && [libc::ECONNRESET, libc::EAGAIN].contains(&r.errno)),
        "{r:?}"
    );
    assert_eq!(server.queries(), [], "junk is never forwarded");
    assert_eq!(dns_counts(&env, "junk"), (0, 0, 0, 4, 0));
    assert_eq!(dns_metric(&env, "junk", "malformed"), Some(4.0));

    // The forwarder still answers the same agent and another one.
    let from = "10.53.0.1:53";
    assert_answer(
        &junk.resolve("api.agentwatch.test", "A"),
        &["127.0.20.51"],
        from,
    );
    assert_answer(
        &other.resolve("api.agentwatch.test", "A"),
        &["127.0.20.51"],
        from,
    );
    junk.assert_connects("127.0.20.51", port, "after its junk");

    // A flood of junk from one agent while another resolves: every lookup answered.
    // Spawned as the flooding process itself (not through launch), so killing it stops it.
    let mut flood = Command::new(probe_bin())
        .arg("--cgroup")
        .arg(junk.cgroup())
        .args(["sendto", RESOLVER, "53", "5000000", "not-dns"])
        .stdout(Stdio::null())
        .spawn()
        .expect("flood");
    wait_until(
        "the flood to reach the forwarder",
        Duration::from_secs(10),
        || dns_counts(&env, "junk").3 > 1000,
    );
    let out = other.run(&[
        "resolve",
        RESOLVER,
        "53",
        "api.agentwatch.test",
        "A",
        "udp",
        "20",
    ]);
    assert!(
        flood.try_wait().expect("flood").is_none(),
        "the flood ended before the lookups did: nothing was shown"
    );
    let _ = flood.kill();
    let _ = flood.wait();
    let lookups = parse_lookups(&out.stdout);
    assert_eq!(lookups.len(), 20);
    for l in &lookups {
        assert_answer(l, &["127.0.20.51"], from);
    }
    assert_answer(
        &junk.resolve("api.agentwatch.test", "A"),
        &["127.0.20.51"],
        from,
    );
    let (allowed, denied, failed, malformed, _) = dns_counts(&env, "other");
    assert_eq!((allowed, denied, failed, malformed), (21, 0, 0, 0));
    let malformed = dns_counts(&env, "junk").3;
    println!(
        "junk datagrams counted malformed during the flood: {}",
        malformed - 4
    );
    assert!(malformed > 4, "the flood was not counted");
}

#[test]
fn with_the_daemon_killed_learned_addresses_last_their_ttl_and_lookups_fail_closed() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.20.61", "127.0.20.62"]);
    let server = TestDnsServer::start([
        a("api.agentwatch.test", [127, 0, 20, 61], 10),
        a("new.agentwatch.test", [127, 0, 20, 62], 60),
    ]);
    let mut env = start_daemon(
        &server,
        &agent("orphan", &[format!("tcp *.agentwatch.test {port}")]),
    );
    let l = Agent::launched(&env, "orphan").resolve("api.agentwatch.test", "A");
    let t0 = Instant::now();
    assert_answer(&l, &["127.0.20.61"], "10.53.0.1:53");
    assert_eq!(l.ttls, [10]);

    env.stop_with(libc::SIGKILL);
    let orphan = Agent::direct(&env, "orphan");
    orphan.assert_connects("127.0.20.61", port, "learned, daemon dead, TTL left");
    server.clear_queries();
    for (resolver, mode) in [
        (RESOLVER, "udp"),
        (RESOLVER, "udp-connected"),
        (RESOLVER, "tcp"),
        ("fd00::53", "udp"),
    ] {
        let l = orphan.resolve_at(resolver, "new.agentwatch.test", "A", mode);
        assert!(
            l.rcode.is_none()
                && [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EAGAIN].contains(&l.errno),
            "{resolver} over {mode}: no answer without the daemon: {l:?}"
        );
    }
    assert_eq!(server.queries(), [], "nothing reached the upstream");
    orphan.assert_eperm("127.0.20.62", port, "never resolved: nothing new opens");
    // Still inside the 10 s TTL (the failed lookups took up to 2 s each).
    assert!(
        t0.elapsed() < Duration::from_millis(9000),
        "too slow to judge"
    );
    orphan.assert_connects("127.0.20.61", port, "learned, still inside its TTL");

    sleep_until(t0 + Duration::from_millis(11_500));
    orphan.assert_eperm("127.0.20.61", port, "expired with no daemon to remove it");
}

#[test]
fn glibcs_own_resolver_in_the_agent_goes_through_the_forwarder() {
    privileged!();
    let nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    assert!(
        nsswitch
            .lines()
            .any(|l| l.starts_with("hosts:") && l.split_whitespace().any(|w| w == "dns")),
        "this test needs `dns` on the hosts line of /etc/nsswitch.conf:\n{nsswitch}"
    );
    // getent asks getaddrinfo with AI_ADDRCONFIG: glibc skips the IPv4 lookup altogether
    // unless the host has an IPv4 address other than 127.0.0.1.
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    assert!(
        String::from_utf8_lossy(&addrs.stdout)
            .lines()
            .any(|l| !l.contains(" 127.0.0.1/")),
        "this test needs an IPv4 address other than 127.0.0.1 on the host (AI_ADDRCONFIG)"
    );
    let (_l, port) = listen_all(&["127.0.20.71"]);
    let (_o, other) = listen_all(&["127.0.20.71"]);
    let server = TestDnsServer::start([
        a("api.agentwatch.test", [127, 0, 20, 71], 60),
        a("evil.agentwatch.test", [127, 0, 20, 72], 60),
    ]);
    let env = start_daemon(
        &server,
        &agent("libc", &[format!("tcp api.agentwatch.test {port}")]),
    );
    let resolv = env.dir.0.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.53.0.1\noptions timeout:2 attempts:1\n",
    )
    .expect("resolv.conf");
    let getent = |name: &str| {
        Command::new(probe_bin())
            .arg("--cgroup")
            .arg(env.agent_cgroup("libc"))
            .arg("with-resolv-conf")
            .arg(&resolv)
            .args(["getent", "ahostsv4", name])
            .output()
            .expect("running aw-probe with-resolv-conf getent")
    };
    let libc_agent = Agent::launched(&env, "libc");
    libc_agent.assert_eperm("127.0.20.71", port, "before the lookup");

    let out = getent("api.agentwatch.test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.split_whitespace().next(),
        Some("127.0.20.71"),
        "{stdout}"
    );
    assert_eq!(server.queries(), [q("api.agentwatch.test", RecordType::A)]);
    libc_agent.assert_connects("127.0.20.71", port, "after glibc resolved the name");
    libc_agent.assert_eperm("127.0.20.71", other, "another port");

    // A denied name: glibc gets REFUSED and getent finds nothing (exit 2).
    let out = getent("evil.agentwatch.test");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // (glibc may also try the host's search domain: only the name itself is counted here.)
    let denied: Vec<_> = env
        .wait_audit("dns_denied", 1)
        .into_iter()
        .filter(|l| l["name"] == "evil.agentwatch.test")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(
        (denied[0]["agent"].as_str(), denied[0]["qtype"].as_str()),
        (Some("libc"), Some("A"))
    );
    assert_eq!(server.queries_for("evil.agentwatch.test"), 0);
    libc_agent.assert_eperm("127.0.20.72", port, "the denied name's address");
}

/// Writes `agents` as the config and applies it with `agentwatch reload`.
fn reload(env: &DaemonEnv, agents: &str) {
    env.write_config(agents);
    let out = env.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reload keeps exactly what rules still configured admitted: a removed rule's addresses and
/// a changed rule's old ports go at once, not when their TTL runs out. A restarted daemon keeps
/// what the previous one learned (the kernel entries name their rule) and answers through new
/// forwarder sockets. An agent left with no hostname rule is no longer redirected at all.
#[test]
fn reloads_and_restarts_keep_exactly_what_configured_rules_admitted() {
    privileged!();
    let (_l, [p1, p2]) = {
        let (l1, p1) = listen_all(&["127.0.21.1", "127.0.21.2"]);
        let (l2, p2) = listen_all(&["127.0.21.1", "127.0.21.2"]);
        ((l1, l2), [p1, p2])
    };
    let server = TestDnsServer::start([
        a("api.agentwatch.test", [127, 0, 21, 1], 600),
        a("other.agentwatch.test", [127, 0, 21, 2], 600),
    ]);
    let config = |rules: &[String]| agent("bot", rules);
    let mut env = start_daemon(
        &server,
        &config(&[
            format!("tcp api.agentwatch.test {p1}"),
            format!("tcp other.agentwatch.test {p1}"),
        ]),
    );
    let bot = Agent::launched(&env, "bot");
    assert_answer(
        &bot.resolve("api.agentwatch.test", "A"),
        &["127.0.21.1"],
        "10.53.0.1:53",
    );
    assert_answer(
        &bot.resolve("other.agentwatch.test", "A"),
        &["127.0.21.2"],
        "10.53.0.1:53",
    );
    bot.assert_connects("127.0.21.1", p1, "api learned");
    bot.assert_connects("127.0.21.2", p1, "other learned");

    // The `other` rule goes and `api` moves to another port.
    reload(&env, &config(&[format!("tcp api.agentwatch.test {p2}")]));
    bot.assert_eperm(
        "127.0.21.2",
        p1,
        "its rule was removed: its address goes with it",
    );
    bot.assert_eperm("127.0.21.1", p1, "the rule that admitted port p1 is gone");
    bot.assert_eperm("127.0.21.1", p2, "not learned under the new rule yet");
    assert_eq!(dns_counts(&env, "bot").4, 0, "nothing learned is left");
    assert_refused(&bot.resolve("other.agentwatch.test", "A"), "10.53.0.1:53");
    assert_answer(
        &bot.resolve("api.agentwatch.test", "A"),
        &["127.0.21.1"],
        "10.53.0.1:53",
    );
    bot.assert_connects("127.0.21.1", p2, "learned under the new rule");

    // Restart: what was learned stays allowed while no daemon runs and after it is back.
    assert_eq!(env.stop_with(libc::SIGTERM), Some(0), "{}", env.log());
    let direct = Agent::direct(&env, "bot");
    direct.assert_connects("127.0.21.1", p2, "daemon stopped: learned entry holds");
    env.start();
    let bot = Agent::launched(&env, "bot");
    bot.assert_connects("127.0.21.1", p2, "re-adopted: learned entry kept");
    assert_eq!(
        dns_counts(&env, "bot").4,
        1,
        "the entry learned before the restart"
    );
    bot.assert_eperm("127.0.21.1", p1, "still only the rule's port");
    let before = server.queries_for("api.agentwatch.test");
    assert_answer(
        &bot.resolve_at("127.0.0.53", "api.agentwatch.test", "A", "udp-connected"),
        &["127.0.21.1"],
        "127.0.0.53:53",
    );
    assert_eq!(server.queries_for("api.agentwatch.test"), before + 1);
    // An AF_INET6 socket naming an IPv4 resolver (v4-mapped) goes the same way.
    assert_answer(
        &bot.resolve_at("::ffff:10.53.0.9", "api.agentwatch.test", "A", "udp"),
        &["127.0.21.1"],
        "[::ffff:10.53.0.9]:53",
    );
    assert_eq!(server.queries_for("api.agentwatch.test"), before + 2);

    // No hostname rule left: DNS is judged by the address rules like any other traffic.
    reload(&env, &config(&[format!("tcp 127.0.21.2 {p1}")]));
    bot.assert_eperm(
        "127.0.21.1",
        p2,
        "hostname rules gone: learned addresses gone",
    );
    bot.assert_connects("127.0.21.2", p1, "the address rule");
    let l = bot.resolve("api.agentwatch.test", "A");
    assert_eq!(
        l.errno, EPERM,
        "no redirect any more: 10.53.0.1:53 is not allowed: {l:?}"
    );
    assert_eq!(server.queries_for("api.agentwatch.test"), before + 2);
}

/// A flood of refused names is not a flood of audit lines: beyond `audit_rate` a second they
/// are counted and summarised (`dns_denied_summary`, busiest names first), and lines plus
/// summaries account for every refusal.
#[test]
fn a_flood_of_refused_names_is_summarised_and_every_refusal_accounted_for() {
    privileged!();
    let server = TestDnsServer::start([a("api.agentwatch.test", [127, 0, 22, 1], 60)]);
    let env = start_daemon(
        &server,
        &agent("noisy", &["tcp api.agentwatch.test 443".into()]),
    );
    let noisy = Agent::launched(&env, "noisy");
    let started = Instant::now();
    let out = noisy.run(&["resolve", RESOLVER, "53", "x.evil.test", "A", "udp", "300"]);
    let elapsed = started.elapsed();
    let lookups = parse_lookups(&out.stdout);
    assert_eq!(lookups.len(), 300);
    assert!(
        lookups
            .iter()
            .all(|l| l.rcode.as_deref() == Some("Refused")),
        "{:?}",
        lookups
            .iter()
            .find(|l| l.rcode.as_deref() != Some("Refused"))
    );
    assert_eq!(dns_counts(&env, "noisy").1, 300);
    let (mut lines, mut summarised) = (0, 0);
    wait_until("every refusal in the trail", Duration::from_secs(5), || {
        let trail = env.audit_lines();
        lines = trail.iter().filter(|l| l["kind"] == "dns_denied").count() as u64;
        summarised = trail
            .iter()
            .filter(|l| l["kind"] == "dns_denied_summary")
            .map(|l| {
                assert_eq!(l["agent"], "noisy");
                assert_eq!(l["names"][0]["name"], "x.evil.test", "{l}");
                assert_eq!(l["names"][0]["count"], l["count"], "{l}");
                l["count"].as_u64().expect("count")
            })
            .sum();
        lines + summarised == 300
    });
    // At most audit_rate (100) lines in each second the flood touched.
    let seconds = elapsed.as_secs() + 2;
    assert!(lines <= 100 * seconds, "{lines} lines in {elapsed:?}");
    assert!(
        summarised >= 300 - 100 * seconds.min(3),
        "{summarised} summarised in {elapsed:?}"
    );
    assert_eq!(server.queries_for("x.evil.test"), 0);
}

/// `Udp: NoPorts` of /proc/net/snmp: datagrams the kernel found no socket to take (this
/// network namespace, every socket).
fn udp_no_ports() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").expect("/proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (
        udp.next().expect("Udp names"),
        udp.next().expect("Udp values"),
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .expect("NoPorts");
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("the NoPorts value")
}

/// The peers of the IPv4 UDP sockets bound to local port `port` (0.0.0.0:0 for one not
/// connected), from /proc/net/udp.
fn udp_peers(port: u16) -> Vec<SocketAddr> {
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    // `ADDR:PORT` in hex: the address as the kernel holds it (network order) printed as a
    // native-endian u32, the port as a number.
    let endpoint = |s: &str| -> SocketAddr {
        let (ip, port) = s.split_once(':').expect("ADDR:PORT");
        let ip = u32::from_str_radix(ip, 16).expect("hex address");
        let port = u16::from_str_radix(port, 16).expect("hex port");
        SocketAddr::from((Ipv4Addr::from(ip.to_ne_bytes()), port))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            let (local, remote) = (endpoint(fields.next()?), endpoint(fields.next()?));
            (local.port() == port).then_some(remote)
        })
        .collect()
}

/// The kernel's ephemeral port range.
fn ephemeral_ports() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("ip_local_port_range");
    let mut it = text.split_whitespace().map(|p| p.parse().expect("a port"));
    (it.next().expect("low"), it.next().expect("high"))
}

/// 64 values nobody could have predicted from the ones before: at least 60 distinct, not an
/// arithmetic sequence (a counter), and not huddled within 1,000 of each other (a counter with
/// gaps, or the kernel's old sequential port choice).
#[track_caller]
fn assert_unpredictable(what: &str, values: &[u16]) {
    assert_eq!(values.len(), 64, "{what}: {values:?}");
    let distinct: std::collections::HashSet<u16> = values.iter().copied().collect();
    assert!(distinct.len() >= 60, "{what}: repeats: {values:?}");
    let steps: std::collections::HashSet<u16> =
        values.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert!(
        steps.len() > 1,
        "{what}: an arithmetic sequence: {values:?}"
    );
    let (min, max) = (
        values.iter().min().expect("values"),
        values.iter().max().expect("values"),
    );
    assert!(
        max - min > 1000,
        "{what}: all within {min}..={max}: {values:?}"
    );
}

/// The forwarder asks upstream under query ids and from source ports drawn at random, from a
/// socket connected to the upstream: a forged answer from any other address or port never
/// reaches it, even one carrying every possible id and the right question, while the real
/// answer is held back. The agent gets the real address; the forged one stays closed.
#[test]
fn upstream_queries_are_unpredictable_and_forged_answers_never_reach_the_forwarder() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.23.1", "127.0.23.66"]);
    let name = "api.agentwatch.test";
    let (real, forged) = ("127.0.23.1", Ipv4Addr::new(127, 0, 23, 66));
    let server = TestDnsServer::start([a(name, [127, 0, 23, 1], 60)]);
    let env = start_daemon(&server, &agent("spoofed", &[format!("tcp {name} {port}")]));
    let spoofed = Agent::launched(&env, "spoofed");
    let from = "10.53.0.1:53";

    // 64 lookups, 64 upstream queries: their ids and source ports.
    let out = spoofed.run(&["resolve", RESOLVER, "53", name, "A", "udp", "64"]);
    let lookups = parse_lookups(&out.stdout);
    assert_eq!(lookups.len(), 64);
    for l in &lookups {
        assert_answer(l, &[real], from);
    }
    let exchanges = server.exchanges();
    assert_eq!(exchanges.len(), 64, "{exchanges:?}");
    assert!(
        exchanges
            .iter()
            .all(|e| e.udp && e.name == name && e.from.ip() == Ipv4Addr::LOCALHOST),
        "{exchanges:?}"
    );
    let ids: Vec<u16> = exchanges.iter().map(|e| e.id).collect();
    let ports: Vec<u16> = exchanges.iter().map(|e| e.from.port()).collect();
    assert_unpredictable("query ids", &ids);
    assert_unpredictable("source ports", &ports);
    let (lo, hi) = ephemeral_ports();
    assert!(
        ports.iter().all(|p| (lo..=hi).contains(p)),
        "outside {lo}-{hi}: {ports:?}"
    );

    // The forged answer: the right question, an address of the attacker's, every id in turn.
    let mut answer = Message::response(0, OpCode::Query);
    answer.metadata.recursion_desired = true;
    answer.metadata.recursion_available = true;
    let qname = Name::from_ascii(format!("{name}.")).expect("name");
    answer.add_query(HickoryQuery::query(qname.clone(), RecordType::A));
    answer.add_answer(Record::from_rdata(qname, 3600, RData::A(A(forged))));
    let mut forgery = answer.to_vec().expect("encoding the forged answer");
    if skipped_under_tcg(
        "65,536 forged datagrams take longer under emulation than the agent's 2 s DNS timeout",
    ) {
        return;
    }

    server.clear_queries();
    server.hold_udp();
    let no_ports = udp_no_ports();
    let (l, upstream_port, took) = std::thread::scope(|s| {
        let lookup = s.spawn(|| spoofed.resolve(name, "A"));
        let mut asked = None;
        wait_until(
            "the forwarder's query at the upstream",
            Duration::from_secs(10),
            || {
                asked = server.exchanges().pop();
                asked.is_some()
            },
        );
        let asked = asked.expect("waited for");
        // The forged answers go where the real one will: the forwarder's socket for this
        // query, which only the upstream's address and port can reach.
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, asked.from.port()));
        assert_eq!(
            udp_peers(target.port()),
            [server.addr()],
            "the forwarder's upstream socket, connected to the upstream"
        );
        // On loopback, the upstream's own address, another port. Every id, the query's own
        // first: a blind spoofer would not know it, but sent into the forwarder's empty receive
        // buffer it cannot be lost to that buffer filling up with the other 65,535 (which an
        // unconnected socket would also have taken in, and dropped for want of room).
        let spoofer = std::net::UdpSocket::bind("127.0.0.1:0").expect("spoofer");
        let started = Instant::now();
        for k in 0..=u16::MAX {
            let id = asked.id.wrapping_add(k);
            forgery[..2].copy_from_slice(&id.to_be_bytes());
            spoofer
                .send_to(&forgery, target)
                .expect("sending a forged answer");
        }
        let took = started.elapsed();
        assert_eq!(server.release_udp(), 1, "the real answer, held until now");
        (
            lookup.join().expect("the agent's lookup"),
            target.port(),
            took,
        )
    });
    assert_answer(&l, &[real], from);
    println!("65,536 forged answers to port {upstream_port} in {took:?}");
    // The kernel found no socket for any of them: none was ever read by the forwarder.
    let dropped = udp_no_ports() - no_ports;
    assert!(
        dropped >= 65_536,
        "only {dropped} forged answers had no taker"
    );

    spoofed.assert_connects(real, port, "the real answer's address");
    spoofed.assert_eperm(&forged.to_string(), port, "the forged answer's address");
    assert_eq!(dns_counts(&env, "spoofed"), (65, 0, 0, 0, 1));
    assert_eq!(server.exchanges().len(), 1);
}

/// Issue 22: names are judged on their wire labels. The query for the two labels `evil.wild`
/// and `test` (text `evil\.wild.test`) is not below `wild.test`: refused, never asked upstream,
/// audited under its escaped text; `evil.wild.test` in three labels is answered.
#[test]
fn a_dot_inside_a_label_is_refused_by_a_wildcard_over_the_text_it_reads_as() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.23.2"]);
    let server = TestDnsServer::start([a("evil.wild.test", [127, 0, 23, 2], 60)]);
    let env = start_daemon(
        &server,
        &agent("labels", &[format!("tcp *.wild.test {port}")]),
    );
    let labels = Agent::launched(&env, "labels");
    let mut dotted = Name::from_labels([&b"evil.wild"[..], b"test"]).expect("labels");
    dotted.set_fqdn(true);
    let mut query = Message::query();
    query.metadata.id = 0x2222;
    query.metadata.recursion_desired = true;
    query.add_query(HickoryQuery::query(dotted, RecordType::A));
    for tcp in [false, true] {
        let r = labels.raw(RESOLVER, &query.to_vec().expect("query"), tcp);
        assert_eq!(
            (r.errno, r.rcode.as_deref(), r.id),
            (0, Some("Refused"), Some(0x2222)),
            "tcp {tcp}: {r:?}"
        );
    }
    assert_eq!(server.queries(), [], "a refused name is never forwarded");
    let lines = env.wait_audit("dns_denied", 2);
    assert!(
        lines.iter().all(|l| l["name"] == r"evil\.wild.test"),
        "{lines:#?}"
    );
    assert_eq!(dns_counts(&env, "labels"), (0, 2, 0, 0, 0));
    labels.assert_eperm("127.0.23.2", port, "nothing was learned");
    assert_answer(
        &labels.resolve("evil.wild.test", "A"),
        &["127.0.23.2"],
        "10.53.0.1:53",
    );
    labels.assert_connects("127.0.23.2", port, "the name in three labels");
}

/// The names of agent `name`'s pinned links, sorted.
fn pinned_links(env: &DaemonEnv, name: &str) -> Vec<String> {
    let mut links: Vec<String> = fs::read_dir(env.agent_link_dir(name))
        .expect("agent links")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    links.sort();
    links
}

/// The DNS hooks run on every receive and close of an agent's sockets, so only agents with
/// hostname rules have them. A reload that gives an agent its first hostname rule attaches
/// them before the new rules are live (the first lookup is answered as from the resolver
/// asked); one that takes its last away leaves them attached (a socket redirected just before
/// still needs them), and its DNS is judged by its rules again.
#[test]
fn only_agents_with_hostname_rules_have_the_dns_hooks_and_a_reload_attaches_them() {
    privileged!();
    let (_l, port) = listen_all(&["127.0.22.1"]);
    let server = TestDnsServer::start([a("late.agentwatch.test", [127, 0, 22, 1], 600)]);
    let plain = |rules: &[String]| {
        format!(
            "{}{}",
            agent("plain", rules),
            agent("named", &[format!("tcp late.agentwatch.test {port}")])
        )
    };
    let addresses = [format!("tcp 127.0.22.2 {port}")];
    let env = start_daemon(&server, &plain(&addresses));
    let dns_hooks = [
        "dns_getpeername4",
        "dns_getpeername6",
        "dns_recvmsg4",
        "dns_recvmsg6",
        "dns_release",
    ];
    let without = [
        "bytes_egress",
        "egress_connect4",
        "egress_connect6",
        "egress_sendmsg4",
        "egress_sendmsg6",
        "sockets_create",
    ];
    let mut with: Vec<&str> = without.iter().chain(&dns_hooks).copied().collect();
    with.sort_unstable();
    assert_eq!(pinned_links(&env, "plain"), without);
    assert_eq!(pinned_links(&env, "named"), with);
    let bot = Agent::launched(&env, "plain");
    // Not redirected: DNS is a call like any other, and no rule admits it.
    for mode in ["udp", "udp-connected", "tcp"] {
        let l = bot.resolve_at(RESOLVER, "late.agentwatch.test", "A", mode);
        assert_eq!(l.errno, EPERM, "{mode}: {l:?}");
    }

    reload(&env, &plain(&[format!("tcp late.agentwatch.test {port}")]));
    assert_eq!(pinned_links(&env, "plain"), with);
    for mode in ["udp", "udp-connected", "tcp"] {
        let l = bot.resolve_at(RESOLVER, "late.agentwatch.test", "A", mode);
        assert_answer(&l, &["127.0.22.1"], "10.53.0.1:53");
    }
    bot.assert_connects("127.0.22.1", port, "learned after the reload");

    reload(&env, &plain(&addresses));
    assert_eq!(pinned_links(&env, "plain"), with, "kept once attached");
    let l = bot.resolve("late.agentwatch.test", "A");
    assert_eq!(l.errno, EPERM, "judged by its rules again: {l:?}");
    assert_eq!(
        agentwatch_tests::pinned_entries(&env.pin_dir, "DNS_ORIG"),
        Some(0)
    );
}
