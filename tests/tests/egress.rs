//! Kernel-enforced egress allow-lists, proven on the real kernel: real processes in real
//! cgroups, real connects and datagrams, exact errnos and counts.

use std::{
    net::{TcpListener, UdpSocket},
    time::Duration,
};

use agentwatch::{
    agent::Agents,
    egress::{CompiledRules, Rule, compile},
};
use agentwatch_common::{
    AgentCounters, PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED, VERDICT_DENIED, egress_slot,
};
use agentwatch_tests::tcp_listener;
use agentwatch_tests::{
    EPERM, NetNsGuard, TestCgroup, one, parse_attempts, privileged, probe, probe_bin, read_events,
    run_probe,
};

fn rules(list: &[&str]) -> CompiledRules {
    let parsed: Vec<Rule> = list.iter().map(|r| r.parse().expect(r)).collect();
    compile(&parsed).expect("compiling rules")
}

fn count(c: &AgentCounters, proto: u8, verdict: u8) -> u64 {
    c.egress[egress_slot(proto, verdict)]
}

fn connect(cg: &TestCgroup, proto: &str, addr: &str, port: u16) -> agentwatch_tests::Attempt {
    one(probe(
        Some(cg.path()),
        &["connect", proto, addr, &port.to_string()],
    ))
}

#[test]
fn allowed_tcp_connect_succeeds_and_unlisted_port_gets_eperm() {
    privileged!();
    let (_a, allowed4) = tcp_listener("127.0.0.1:0");
    let (_b, other4) = tcp_listener("127.0.0.1:0");
    let (_c, allowed6) = tcp_listener("[::1]:0");
    let (_d, other6) = tcp_listener("[::1]:0");
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "t1",
            cg.cgroup().clone(),
            rules(&[
                &format!("tcp 127.0.0.1 {allowed4}"),
                &format!("tcp ::1 {allowed6}"),
            ]),
        )
        .expect("guard");

    let r = connect(&cg, "tcp", "127.0.0.1", allowed4);
    assert!(r.ok, "{r:?}");
    let r = connect(&cg, "tcp", "127.0.0.1", other4);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let r = connect(&cg, "tcp", "::1", allowed6);
    assert!(r.ok, "{r:?}");
    let r = connect(&cg, "tcp", "::1", other6);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");

    let c = agents.counters("t1").expect("counters");
    assert_eq!(count(&c, PROTO_TCP, VERDICT_ALLOWED), 2);
    assert_eq!(count(&c, PROTO_TCP, VERDICT_DENIED), 2);
    assert_eq!(c.connects, 4);
}

#[test]
fn cidr_and_port_range_rules_including_edges() {
    privileged!();
    let ns = NetNsGuard::new();
    ns.local_route("10.20.0.0/16");
    ns.local_route("fd00:20::/64");
    // Dual-stack listeners on the wildcard answer every local address of the namespace.
    let _listeners: Vec<TcpListener> = [7999u16, 8000, 8005, 8010, 8011, 9000, 9001]
        .iter()
        .map(|p| TcpListener::bind(("::", *p)).expect("bind"))
        .collect();
    let ranged = TestCgroup::new();
    let everything = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "ranged",
            ranged.cgroup().clone(),
            rules(&[
                "tcp 10.20.0.0/16 8000-8010",
                "tcp 10.20.5.5/32 9000",
                "tcp fd00:20::/64 8000-8010",
                "tcp fd00:20::7/128 9000",
            ]),
        )
        .expect("guard");
    agents
        .guard(
            "everything",
            everything.cgroup().clone(),
            rules(&["tcp 0.0.0.0/0 9001", "tcp ::/0 9001"]),
        )
        .expect("guard");

    let cases: &[(&TestCgroup, &str, u16, bool)] = &[
        // Range edges, inside a /16.
        (&ranged, "10.20.1.1", 7999, false),
        (&ranged, "10.20.1.1", 8000, true),
        (&ranged, "10.20.1.1", 8005, true),
        (&ranged, "10.20.1.1", 8010, true),
        (&ranged, "10.20.1.1", 8011, false),
        // /32: only that host gets 9000 (it keeps the /16's range too).
        (&ranged, "10.20.5.5", 9000, true),
        (&ranged, "10.20.5.5", 8010, true),
        (&ranged, "10.20.5.6", 9000, false),
        // IPv6 /64 and /128 alike.
        (&ranged, "fd00:20::1", 8000, true),
        (&ranged, "fd00:20::1", 8011, false),
        (&ranged, "fd00:20::7", 9000, true),
        (&ranged, "fd00:20::8", 9000, false),
        // /0 admits every address, but only its port.
        (&everything, "10.20.9.9", 9001, true),
        (&everything, "127.0.0.1", 9001, true),
        (&everything, "10.20.9.9", 9000, false),
        (&everything, "fd00:20::99", 9001, true),
        (&everything, "::1", 9001, true),
        (&everything, "fd00:20::99", 9000, false),
    ];
    for (cg, addr, port, allowed) in cases {
        let r = connect(cg, "tcp", addr, *port);
        if *allowed {
            assert!(r.ok, "{addr} {port} should be allowed: {r:?}");
        } else {
            assert_eq!(
                (r.ok, r.errno),
                (false, EPERM),
                "{addr} {port} should be denied: {r:?}"
            );
        }
    }
    let c = agents.counters("ranged").expect("counters");
    assert_eq!(count(&c, PROTO_TCP, VERDICT_ALLOWED), 7);
    assert_eq!(count(&c, PROTO_TCP, VERDICT_DENIED), 5);
    let c = agents.counters("everything").expect("counters");
    assert_eq!(count(&c, PROTO_TCP, VERDICT_ALLOWED), 4);
    assert_eq!(count(&c, PROTO_TCP, VERDICT_DENIED), 2);
}

#[test]
fn udp_sendto_unlisted_gets_eperm_and_listed_datagram_arrives() {
    privileged!();
    let rx4 = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let rx6 = UdpSocket::bind("[::1]:0").expect("bind");
    let (other4, other6) = (
        UdpSocket::bind("127.0.0.1:0").expect("bind"),
        UdpSocket::bind("[::1]:0").expect("bind"),
    );
    for s in [&rx4, &rx6, &other4, &other6] {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    let port = |s: &UdpSocket| s.local_addr().expect("addr").port().to_string();
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "t3",
            cg.cgroup().clone(),
            rules(&[
                &format!("udp 127.0.0.1 {}", port(&rx4)),
                &format!("udp ::1 {}", port(&rx6)),
            ]),
        )
        .expect("guard");

    let r = one(probe(
        Some(cg.path()),
        &["sendto", "127.0.0.1", &port(&rx4), "1", "hello4"],
    ));
    assert!(r.ok, "{r:?}");
    let r = one(probe(
        Some(cg.path()),
        &["sendto", "::1", &port(&rx6), "1", "hello6"],
    ));
    assert!(r.ok, "{r:?}");
    let r = one(probe(
        Some(cg.path()),
        &["sendto", "127.0.0.1", &port(&other4), "1", "nope"],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let r = one(probe(
        Some(cg.path()),
        &["sendto", "::1", &port(&other6), "1", "nope"],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    // A TCP rule does not admit UDP, and a UDP connect() is judged like a send.
    let r = one(probe(
        Some(cg.path()),
        &["connect", "udp", "127.0.0.1", &port(&other4)],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");

    let mut buf = [0u8; 64];
    let n = rx4.recv(&mut buf).expect("datagram on the allowed v4 port");
    assert_eq!(&buf[..n], b"hello4");
    let n = rx6.recv(&mut buf).expect("datagram on the allowed v6 port");
    assert_eq!(&buf[..n], b"hello6");
    for s in [&other4, &other6] {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        assert!(s.recv(&mut buf).is_err(), "a denied datagram arrived");
    }
    let c = agents.counters("t3").expect("counters");
    assert_eq!(count(&c, PROTO_UDP, VERDICT_ALLOWED), 2);
    assert_eq!(count(&c, PROTO_UDP, VERDICT_DENIED), 3);
    assert_eq!((c.sends, c.connects), (4, 1));
}

#[test]
fn v4_mapped_v6_destinations_are_judged_by_ipv4_rules() {
    privileged!();
    let (_a, allowed) = tcp_listener("[::]:0");
    let (_b, other) = tcp_listener("[::]:0");
    let rx = UdpSocket::bind("[::]:0").expect("bind");
    let udp_port = rx.local_addr().expect("addr").port().to_string();
    let v4_only = TestCgroup::new();
    let v6_all = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "v4only",
            v4_only.cgroup().clone(),
            rules(&[&format!("tcp 127.0.0.1 {allowed}")]),
        )
        .expect("guard");
    // Everything IPv6 is allowed, yet ::ffff:127.0.0.1 is an IPv4 host: no IPv4 rule, no entry.
    agents
        .guard("v6all", v6_all.cgroup().clone(), rules(&["any ::/0 *"]))
        .expect("guard");

    let r = connect(&v4_only, "tcp", "::ffff:127.0.0.1", allowed);
    assert!(r.ok, "{r:?}");
    let r = connect(&v4_only, "tcp", "::ffff:127.0.0.1", other);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let r = connect(&v6_all, "tcp", "::ffff:127.0.0.1", allowed);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let r = one(probe(
        Some(v6_all.path()),
        &["sendto", "::ffff:127.0.0.1", &udp_port],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let r = connect(&v6_all, "tcp", "::1", allowed);
    assert!(r.ok, "{r:?}");

    let mut ring = agents.take_events().expect("events");
    let events = read_events(&mut ring, 3);
    assert_eq!(events.len(), 3, "{events:?}");
    // The audit trail shows the IPv4 destination that was judged.
    assert_eq!(events[0].dest.to_string(), format!("127.0.0.1:{other}"));
    assert_eq!(events[2].dest.to_string(), format!("127.0.0.1:{udp_port}"));
}

#[test]
fn children_grandchildren_and_nested_cgroups_are_bound_by_the_agent_rules() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_b, denied) = tcp_listener("127.0.0.1:0");
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "t5",
            cg.cgroup().clone(),
            rules(&[&format!("tcp 127.0.0.1 {allowed}")]),
        )
        .expect("guard");
    let probe_path = probe_bin();
    let p = probe_path.display();
    // aw-probe joins the cgroup and execs bash (another binary); bash forks children that exec
    // aw-probe, and a second bash whose children are the grandchildren. The trailing `true`s
    // keep bash from exec'ing its last command in place of forking it.
    let script = format!(
        "{p} connect tcp 127.0.0.1 {denied}; {p} connect tcp 127.0.0.1 {allowed}; \
         /bin/bash -c '{p} connect tcp 127.0.0.1 {denied}; {p} connect tcp 127.0.0.1 {allowed}; true'; true"
    );
    let out = run_probe(Some(cg.path()), &["exec", "/bin/bash", "-c", &script]);
    let attempts = parse_attempts(&out.stdout);
    assert_eq!(attempts.len(), 4, "{attempts:?}");
    for (i, a) in attempts.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!((a.ok, a.errno), (false, EPERM), "{a:?}");
        } else {
            assert!(a.ok, "{a:?}");
        }
    }
    // The grandchildren's parent is the inner bash, itself a child of the agent's first process.
    assert_eq!(attempts[0].ppid, attempts[1].ppid);
    assert_eq!(attempts[2].ppid, attempts[3].ppid);
    assert_ne!(attempts[0].ppid, attempts[2].ppid);

    // A process in a cgroup the agent nests below its own is still the agent's.
    let sub = cg.child("sub");
    let nested = sub.child("deeper");
    let r = connect(&nested, "tcp", "127.0.0.1", denied);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let r = connect(&nested, "tcp", "127.0.0.1", allowed);
    assert!(r.ok, "{r:?}");

    let c = agents.counters("t5").expect("counters");
    assert_eq!(count(&c, PROTO_TCP, VERDICT_ALLOWED), 3);
    assert_eq!(count(&c, PROTO_TCP, VERDICT_DENIED), 3);
    let mut ring = agents.take_events().expect("events");
    let events = read_events(&mut ring, 3);
    let pids: Vec<u32> = events.iter().map(|e| e.pid).collect();
    assert_eq!(pids[..2], [attempts[0].pid, attempts[2].pid]);
    assert!(
        events
            .iter()
            .all(|e| e.agent_id == agents.info("t5").expect("info").id)
    );
}

#[test]
fn processes_outside_agent_cgroups_are_never_affected() {
    privileged!();
    let (_a, denied) = tcp_listener("127.0.0.1:0");
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let udp_port = rx.local_addr().expect("addr").port().to_string();
    let agent = TestCgroup::new();
    let bystander = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard("t6", agent.cgroup().clone(), rules(&[]))
        .expect("guard");

    let r = connect(&agent, "tcp", "127.0.0.1", denied);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    // Same destination from the test's own cgroup and from an unguarded sibling cgroup.
    let r = one(probe(
        None,
        &["connect", "tcp", "127.0.0.1", &denied.to_string()],
    ));
    assert!(r.ok, "{r:?}");
    let r = connect(&bystander, "tcp", "127.0.0.1", denied);
    assert!(r.ok, "{r:?}");
    let r = one(probe(
        Some(bystander.path()),
        &["sendto", "127.0.0.1", &udp_port, "1", "free"],
    ));
    assert!(r.ok, "{r:?}");
    let mut buf = [0u8; 16];
    let n = rx.recv(&mut buf).expect("bystander datagram");
    assert_eq!(&buf[..n], b"free");
    let c = agents.counters("t6").expect("counters");
    assert_eq!(count(&c, PROTO_TCP, VERDICT_DENIED), 1);
    assert_eq!(
        count(&c, PROTO_TCP, VERDICT_ALLOWED) + count(&c, PROTO_UDP, VERDICT_ALLOWED),
        0
    );
}

#[test]
fn n_attempts_are_counted_exactly_and_each_denied_one_is_one_event() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_b, denied) = tcp_listener("[::1]:0");
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let udp_ok = rx.local_addr().expect("addr").port();
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "t7",
            cg.cgroup().clone(),
            rules(&[
                &format!("tcp 127.0.0.1 {allowed}"),
                &format!("udp 127.0.0.1 {udp_ok}"),
            ]),
        )
        .expect("guard");
    let mut ring = agents.take_events().expect("events");

    let ok_tcp = probe(
        Some(cg.path()),
        &["connect", "tcp", "127.0.0.1", &allowed.to_string(), "5"],
    );
    let bad_tcp = probe(
        Some(cg.path()),
        &["connect", "tcp", "::1", &denied.to_string(), "7"],
    );
    let ok_udp = probe(
        Some(cg.path()),
        &["sendto", "127.0.0.1", &udp_ok.to_string(), "4"],
    );
    let bad_udp = probe(Some(cg.path()), &["sendto", "127.0.0.2", "5353", "3"]);
    assert!(
        ok_tcp.iter().all(|a| a.ok) && ok_tcp.len() == 5,
        "{ok_tcp:?}"
    );
    assert!(
        ok_udp.iter().all(|a| a.ok) && ok_udp.len() == 4,
        "{ok_udp:?}"
    );
    assert!(
        bad_tcp.iter().all(|a| a.errno == EPERM) && bad_tcp.len() == 7,
        "{bad_tcp:?}"
    );
    assert!(
        bad_udp.iter().all(|a| a.errno == EPERM) && bad_udp.len() == 3,
        "{bad_udp:?}"
    );

    let c = agents.counters("t7").expect("counters");
    assert_eq!(count(&c, PROTO_TCP, VERDICT_ALLOWED), 5);
    assert_eq!(count(&c, PROTO_TCP, VERDICT_DENIED), 7);
    assert_eq!(count(&c, PROTO_UDP, VERDICT_ALLOWED), 4);
    assert_eq!(count(&c, PROTO_UDP, VERDICT_DENIED), 3);
    assert_eq!((c.connects, c.sends), (12, 7));
    assert_eq!(agents.kernel().events_lost().expect("lost"), 0);

    let events = read_events(&mut ring, 10);
    assert_eq!(events.len(), 10, "{events:?}");
    let id = agents.info("t7").expect("info").id;
    for e in &events[..7] {
        assert_eq!(
            (e.kind, e.proto, e.hook),
            ("egress_denied", "tcp", "connect")
        );
        assert_eq!(e.dest.to_string(), format!("[::1]:{denied}"));
        assert_eq!(e.pid, bad_tcp[0].pid);
        assert_eq!(e.tid, bad_tcp[0].pid, "single-threaded probe: tid == pid");
        assert_eq!((e.comm.as_str(), e.agent_id), ("aw-probe", id));
    }
    for e in &events[7..] {
        assert_eq!(
            (e.kind, e.proto, e.hook),
            ("egress_denied", "udp", "sendmsg")
        );
        assert_eq!(e.dest.to_string(), "127.0.0.2:5353");
        assert_eq!(e.pid, bad_udp[0].pid);
        assert_eq!(e.comm, "aw-probe");
    }
    // Kernel timestamps are monotonic in emission order.
    assert!(events.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));
}

#[test]
fn two_agents_do_not_see_each_others_rules() {
    privileged!();
    let (_a, port_x) = tcp_listener("127.0.0.1:0");
    let (_b, port_y) = tcp_listener("127.0.0.1:0");
    let x = TestCgroup::new();
    let y = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard(
            "x",
            x.cgroup().clone(),
            rules(&[&format!("tcp 127.0.0.1 {port_x}")]),
        )
        .expect("guard");
    agents
        .guard(
            "y",
            y.cgroup().clone(),
            rules(&[&format!("tcp 127.0.0.0/8 {port_y}")]),
        )
        .expect("guard");

    assert!(connect(&x, "tcp", "127.0.0.1", port_x).ok);
    assert_eq!(connect(&x, "tcp", "127.0.0.1", port_y).errno, EPERM);
    assert!(connect(&y, "tcp", "127.0.0.1", port_y).ok);
    assert_eq!(connect(&y, "tcp", "127.0.0.1", port_x).errno, EPERM);
    let cx = agents.counters("x").expect("counters");
    let cy = agents.counters("y").expect("counters");
    assert_eq!(
        (
            count(&cx, PROTO_TCP, VERDICT_ALLOWED),
            count(&cx, PROTO_TCP, VERDICT_DENIED)
        ),
        (1, 1)
    );
    assert_eq!(
        (
            count(&cy, PROTO_TCP, VERDICT_ALLOWED),
            count(&cy, PROTO_TCP, VERDICT_DENIED)
        ),
        (1, 1)
    );
}

#[test]
fn every_agents_counters_read_at_once_are_each_agents_own() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let (_b, closed) = tcp_listener("127.0.0.1:0");
    let (cg1, cg2) = (TestCgroup::new(), TestCgroup::new());
    let mut agents = Agents::load().expect("load");
    let allow = [format!("tcp 127.0.0.1 {port}")];
    let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
    agents
        .guard("c1", cg1.cgroup().clone(), rules(&allow))
        .expect("guard");
    agents
        .guard("c2", cg2.cgroup().clone(), rules(&allow))
        .expect("guard");
    for _ in 0..3 {
        assert!(connect(&cg1, "tcp", "127.0.0.1", port).ok);
    }
    assert!(!connect(&cg2, "tcp", "127.0.0.1", closed).ok);
    let all = agents.all_counters().expect("all counters");
    let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["c1", "c2"]);
    for (name, c) in &all {
        assert_eq!(*c, agents.counters(name).expect("counters"), "{name}");
    }
    let (c1, c2) = (all[0].1, all[1].1);
    assert_eq!(
        (count(&c1, PROTO_TCP, VERDICT_ALLOWED), c1.connects),
        (3, 3)
    );
    assert_eq!(
        (
            count(&c2, PROTO_TCP, VERDICT_ALLOWED),
            count(&c2, PROTO_TCP, VERDICT_DENIED),
            c2.connects
        ),
        (0, 1, 1)
    );
}

/// Pins of one test under bpffs, removed (links detached) on Drop.
struct TestPins(agentwatch::kernel::PinDir);

impl TestPins {
    /// A pin folder of this test's own under /sys/fs/bpf.
    fn new() -> Self {
        Self(agentwatch::kernel::PinDir::new(format!(
            "/sys/fs/bpf/agentwatch-test-{}-{}",
            std::process::id(),
            agentwatch_tests::unique_name()
        )))
    }
}

/// The names in pin folder `dir`.
fn pin_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("pin folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Guards agent `name` in `cg` with `policy` (which admits TCP to `port`) and checks that it
/// is guarded as new (nothing of an earlier attempt adopted), holds its 6 links (no hostname
/// rules: no DNS hooks), and is enforced: `port` allowed, another port EPERM. Then unguards
/// it.
fn guarded_anew_and_enforced(
    agents: &mut Agents,
    name: &str,
    cg: &TestCgroup,
    policy: CompiledRules,
    port: u16,
) {
    assert_eq!(
        agents
            .guard(name, cg.cgroup().clone(), policy)
            .expect("guard"),
        agentwatch::agent::Guarding::New
    );
    assert_eq!(agents.link_count(name), 6);
    assert!(connect(cg, "tcp", "127.0.0.1", port).ok);
    let (_b, other) = tcp_listener("127.0.0.1:0");
    let r = connect(cg, "tcp", "127.0.0.1", other);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    agents.unguard(name).expect("unguard");
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = self.0.remove_all() {
            eprintln!("removing {}: {e}", self.0.root().display());
        }
    }
}

#[test]
fn a_guard_that_fails_halfway_leaves_nothing_attached_and_no_state() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let cg = TestCgroup::new();
    let cgroup_id = cg.cgroup().id().expect("cgroup id");
    let pins = TestPins::new();
    // Where the byte counter's link would be pinned, something that is no link (a folder:
    // BPF_OBJ_GET refuses it on every kernel; a map there is the next test's): the egress and
    // sock_create programs attach (fresh) before the byte counter fails to adopt it.
    let agent_links = pins.0.root().join("links").join(format!("t10@{cgroup_id}"));
    std::fs::create_dir_all(agent_links.join("bytes_egress")).expect("the bogus pin");
    let mut agents = Agents::load_pinned(pins.0.clone()).expect("load");
    // This object's programs only: the other tests of this binary run beside this one, each
    // with an object of its own.
    let ours: std::collections::HashSet<u32> = agents.kernel().program_ids().into_iter().collect();
    let host: std::collections::HashSet<u32> = agents.host_link_ids().into_iter().collect();
    let policy = rules(&[&format!("tcp 127.0.0.1 {port}")]);
    let err = agents
        .guard("t10", cg.cgroup().clone(), policy.clone())
        .expect_err("guarding over a bogus pin fails");
    assert!(err.to_string().contains("bytes_egress"), "{err}");
    assert_eq!(agents.link_count("t10"), 0);
    // The links attached before the failure went, pins and all: only the bogus pin is left.
    assert_eq!(pin_names(&agent_links), ["bytes_egress"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let fresh: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .filter(|l| ours.contains(&l.program_id()) && !host.contains(&l.id()))
            .map(|l| l.id())
            .collect();
        if fresh.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "links of the failed guard still loaded: {fresh:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing of the agent stayed in the kernel: once the pin is fixed it is guarded as new
    // (not adopted), and its egress is enforced.
    std::fs::remove_dir(agent_links.join("bytes_egress")).expect("removing the bogus pin");
    guarded_anew_and_enforced(&mut agents, "t10", &cg, policy, port);
}

/// Pins a new one-entry array map at `path` (made and pinned with bpf(2) directly: a map of
/// no object of agentwatch's).
fn pin_a_map(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut create = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: BPF_MAP_CREATE (0) with a valid attr prefix of its own size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &raw mut create, size_of::<MapCreate>()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: u32::try_from(fd).expect("fd"),
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_PIN (6) with a valid attr prefix; `c_path` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, &raw mut pin, size_of::<ObjPin>()) };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own fd; the pin keeps the map.
    unsafe { libc::close(i32::try_from(fd).expect("fd")) };
}

/// A map pinned where an agent's link pin goes (root outside the agents could do it, or an
/// older daemon's bug) is refused, not adopted as the link: on 6.1 aya's `from_pin` took any
/// bpf object, and the map's info read as a link's named a link id that could be live. The
/// guard fails naming the pin, and nothing of it stays attached.
#[test]
fn a_map_pinned_where_a_link_goes_is_refused_not_adopted() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let cg = TestCgroup::new();
    let cgroup_id = cg.cgroup().id().expect("cgroup id");
    let pins = TestPins::new();
    let agent_links = pins.0.root().join("links").join(format!("t11@{cgroup_id}"));
    std::fs::create_dir_all(&agent_links).expect("pin folder");
    let bogus = agent_links.join("bytes_egress");
    pin_a_map(&bogus);
    let mut agents = Agents::load_pinned(pins.0.clone()).expect("load");
    let policy = rules(&[&format!("tcp 127.0.0.1 {port}")]);
    let err = agents
        .guard("t11", cg.cgroup().clone(), policy.clone())
        .expect_err("a map where a link goes is no link");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "{} is not a BPF link (anon_inode:bpf-map)",
            bogus.display()
        )),
        "{text}"
    );
    assert_eq!(agents.link_count("t11"), 0);
    assert_eq!(
        pin_names(&agent_links),
        ["bytes_egress"],
        "only the planted map is left"
    );
    // With the map gone, the agent is guarded as new and enforced.
    std::fs::remove_file(&bogus).expect("removing the map pin");
    guarded_anew_and_enforced(&mut agents, "t11", &cg, policy, port);
}

#[test]
fn a_slot_a_crashed_daemon_left_half_forgotten_is_clean_for_the_next_agent() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let (first, second) = (TestCgroup::new(), TestCgroup::new());
    let pins = TestPins::new();
    let first_id = {
        let mut agents = Agents::load_pinned(pins.0.clone()).expect("load");
        agents
            .guard(
                "first",
                first.cgroup().clone(),
                rules(&[&format!("tcp 127.0.0.1 {port}")]),
            )
            .expect("guard");
        assert!(connect(&first, "tcp", "127.0.0.1", port).ok);
        let info = agents.info("first").expect("info");
        // A daemon killed while forgetting the agent: its state is gone, its rules are not.
        let agents_map =
            aya::maps::MapData::from_pin(pins.0.root().join("maps/AGENTS")).expect("AGENTS pin");
        let mut states: aya::maps::HashMap<_, u64, agentwatch_common::AgentState> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(agents_map)).expect("AGENTS");
        states.remove(&info.cgroup_id).expect("removing the state");
        agents.release("first");
        info.id
    };
    // The next daemon guards a new agent: it gets the free slot, and nothing of the first
    // agent's allow-list.
    let mut agents = Agents::load_pinned(pins.0.clone()).expect("load");
    assert_eq!(
        agents
            .guard("second", second.cgroup().clone(), rules(&[]))
            .expect("guard"),
        agentwatch::agent::Guarding::New
    );
    assert_eq!(agents.info("second").expect("info").id, first_id);
    let r = connect(&second, "tcp", "127.0.0.1", port);
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    let c = agents.counters("second").expect("counters");
    assert_eq!(
        (count(&c, PROTO_TCP, VERDICT_DENIED), c.connects),
        (1, 1),
        "the slot's counters start from nothing"
    );
    agents.unguard("second").expect("unguard");
}

#[test]
fn nothing_the_test_made_remains_afterwards() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let (path, child_path, prog_ids, link_ids) = {
        let cg = TestCgroup::new();
        let child = cg.child("nested");
        let mut agents = Agents::load().expect("load");
        agents
            .guard(
                "t9",
                cg.cgroup().clone(),
                rules(&[&format!("tcp 127.0.0.1 {port}")]),
            )
            .expect("guard");
        assert!(connect(&child, "tcp", "127.0.0.1", port).ok);
        let mut link_ids = agents.link_ids("t9");
        assert_eq!(
            link_ids.len(),
            6,
            "one link per egress hook, one for sock_create, one for the byte counter (no DNS \
             hooks: no hostname rules)"
        );
        let lsm = agentwatch_tests::bpf_lsm();
        let host = agents.host_link_ids();
        assert_eq!(
            host.len(),
            if lsm { 14 } else { 6 },
            "exec and fork tracepoints, 3 socket/escape tracepoints, the clone-into-cgroup raw \
             tracepoint, with BPF LSM its exec, packet-socket, clone and five tamper-guard \
             programs; no sys_enter without monitoring, no file guard without a file list"
        );
        link_ids.extend(host);
        let prog_ids = agents.kernel().program_ids();
        assert_eq!(
            prog_ids.len(),
            if lsm { 28 } else { 26 },
            "4 egress, 4 DNS reply hooks, 1 DNS release hook, 1 byte counter, 2 exec/fork, 5 \
             sockets (one the clone raw tracepoint), 1 sys_enter (loaded, not attached), and \
             with BPF LSM its 10 LSM programs (exec, packet socket, clone, 5 tamper-guard, 2 \
             file guard: loaded, the file guard's not attached), else the file guard's 8 open \
             tracepoints (loaded, not attached)"
        );
        (
            cg.path().to_owned(),
            child.path().to_owned(),
            prog_ids,
            link_ids,
        )
        // agents (programs, links, maps) and then the cgroups drop here
    };
    assert!(!path.exists(), "{} remains", path.display());
    assert!(!child_path.exists(), "{} remains", child_path.display());
    // Programs are freed by the kernel after their last reference goes (RCU): poll briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let live_links: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .filter(|id| link_ids.contains(id))
            .collect();
        let live_progs: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| prog_ids.contains(id))
            .collect();
        if live_links.is_empty() && live_progs.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still loaded: links {live_links:?}, programs {live_progs:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Only this process's: another run of the suite (or of the benchmarks) may be at work.
    let mine = format!("agentwatch-test-{}-", std::process::id());
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "pins left: {pins:?}");
}

#[test]
fn a_hundred_thousand_rules_per_agent_still_judge_exactly() {
    privileged!();
    let ns = NetNsGuard::new();
    ns.local_route("10.0.0.0/8");
    let _l = TcpListener::bind(("0.0.0.0", 7000)).expect("bind");
    // 100,000 distinct /32 hosts spread over 10.0.0.0/8, plus one /16 with another port.
    let host = |i: u32| {
        let a = 0x0a00_0000 | (i.wrapping_mul(2_654_435_761) & 0x00ff_fffe);
        std::net::Ipv4Addr::from(a)
    };
    let mut list: Vec<String> = (0..100_000)
        .map(|i| format!("tcp {} 7000", host(i)))
        .collect();
    list.push("tcp 10.200.0.0/16 7001".into());
    let parsed: Vec<Rule> = list.iter().map(|r| r.parse().expect("rule")).collect();
    let compiled = compile(&parsed).expect("compile");
    assert!(
        compiled.v4.len() >= 99_000,
        "{} distinct prefixes",
        compiled.v4.len()
    );
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard("big", cg.cgroup().clone(), compiled)
        .expect("guard");
    for i in [0, 1, 77_777, 99_999] {
        let r = connect(&cg, "tcp", &host(i).to_string(), 7000);
        assert!(r.ok, "rule {i} ({}) should allow: {r:?}", host(i));
    }
    // Listed hosts, other port; unlisted host (odd addresses are never generated).
    let r = connect(&cg, "tcp", &host(5).to_string(), 7001);
    assert_eq!(r.errno, EPERM);
    let r = connect(&cg, "tcp", "10.1.2.3", 7000);
    assert_eq!(r.errno, EPERM);
    let c = agents.counters("big").expect("counters");
    assert_eq!(
        (
            count(&c, PROTO_TCP, VERDICT_ALLOWED),
            count(&c, PROTO_TCP, VERDICT_DENIED)
        ),
        (4, 2)
    );
}

#[test]
fn a_full_ring_buffer_is_counted_never_silent() {
    privileged!();
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    agents
        .guard("flood", cg.cgroup().clone(), rules(&[]))
        .expect("guard");
    // Nobody reads while 20,000 denials arrive: more than the 1 MiB buffer holds.
    let mut ring = agents.take_events().expect("events");
    let attempts = probe(Some(cg.path()), &["sendto", "127.0.0.1", "9", "20000"]);
    assert_eq!(attempts.len(), 20_000);
    assert!(attempts.iter().all(|a| a.errno == EPERM));
    let lost = agents.kernel().events_lost().expect("lost");
    let mut delivered = 0u64;
    while ring.next().is_some() {
        delivered += 1;
    }
    assert!(lost > 0, "the buffer should have overflowed");
    assert_eq!(
        delivered + lost,
        20_000,
        "every denial is either delivered or counted as lost"
    );
    let c = agents.counters("flood").expect("counters");
    assert_eq!(count(&c, PROTO_UDP, VERDICT_DENIED), 20_000);
}
