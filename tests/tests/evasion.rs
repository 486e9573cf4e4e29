//! Other ways out through the same hooks: connected UDP, sendmmsg, TCP Fast Open, an io_uring
//! connect, a new network namespace, IPv4-compatible and IPv4-mapped IPv6 forms, and the
//! "any" addresses 0.0.0.0 and :: (which Linux delivers to the local host). Each is made by a
//! root process with every capability inside an agent whose only rule allows one loopback
//! port; each must get exactly the verdict the rules give.

use std::{
    net::{TcpListener, UdpSocket},
    time::Duration,
};

use agentwatch::{agent::Agents, egress::compile};
use agentwatch_common::{PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED, VERDICT_DENIED, egress_slot};
use agentwatch_tests::{EPERM, TestCgroup, one, parse_attempts, privileged, probe, run_probe};

/// A guarded agent (the test's own cgroup) allowing `udp 127.0.0.1 UDP` and `tcp 127.0.0.1 TCP`.
struct Setup {
    cg: TestCgroup,
    agents: Agents,
    udp: UdpSocket,
    udp_port: String,
    _tcp: TcpListener,
    tcp_port: String,
    /// A TCP listener on a port the rules do not allow.
    _other: TcpListener,
    other_port: String,
}

fn setup() -> Setup {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = TcpListener::bind("0.0.0.0:0").expect("bind");
    let udp_port = udp.local_addr().expect("addr").port().to_string();
    let tcp_port = tcp.local_addr().expect("addr").port().to_string();
    let other_port = other.local_addr().expect("addr").port().to_string();
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    let rules = [
        format!("udp 127.0.0.1 {udp_port}").parse().expect("rule"),
        format!("tcp 127.0.0.1 {tcp_port}").parse().expect("rule"),
    ];
    agents
        .guard("ev", cg.cgroup().clone(), compile(&rules).expect("compile"))
        .expect("guard");
    Setup {
        cg,
        agents,
        udp,
        udp_port,
        _tcp: tcp,
        tcp_port,
        _other: other,
        other_port,
    }
}

/// aw-probe's report of one sendmmsg() of 5 datagrams to 127.0.0.1:`port` from `cgroup`.
fn sendmmsg(cgroup: &std::path::Path, port: &str) -> serde_json::Value {
    let out = run_probe(Some(cgroup), &["sendmmsg", "127.0.0.1", port, "5"]);
    let line = out.stdout.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice(line).expect("aw-probe JSON")
}

fn received(s: &UdpSocket) -> usize {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while s.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn connected_udp_is_judged_at_connect_and_sendmmsg_per_datagram() {
    privileged!();
    let s = setup();
    let p = s.cg.path();
    // Connected UDP: connect is the judged call; to a port not on the list it is refused.
    let r = one(probe(
        Some(p),
        &["connect", "udp", "127.0.0.1", &s.udp_port],
    ));
    assert!(r.ok, "{r:?}");
    let r = one(probe(Some(p), &["connect", "udp", "127.0.0.1", "9"]));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    // sendmmsg: every datagram passes the sendmsg hook. 5 allowed ones arrive ...
    let v = sendmmsg(p, &s.udp_port);
    assert_eq!(v["sent"], 5, "{v}");
    assert_eq!(received(&s.udp), 5);
    // ... and the first denied one stops the batch with EPERM.
    let v = sendmmsg(p, "9");
    assert_eq!(
        (v["sent"].as_i64(), v["errno"].as_i64()),
        (Some(-1), Some(i64::from(EPERM))),
        "{v}"
    );
    let c = s.agents.counters("ev").expect("counters");
    assert_eq!(c.egress[egress_slot(PROTO_UDP, VERDICT_ALLOWED)], 6);
    assert_eq!(c.egress[egress_slot(PROTO_UDP, VERDICT_DENIED)], 2);
}

#[test]
fn tcp_fast_open_and_io_uring_connect_pass_the_same_hook() {
    privileged!();
    let s = setup();
    let p = s.cg.path();
    // MSG_FASTOPEN connects inside sendto(): the connect hook still judges it.
    let r = one(probe(Some(p), &["fastopen", "127.0.0.1", &s.other_port]));
    assert_eq!(
        (r.ok, r.errno),
        (false, EPERM),
        "fastopen to an unlisted port: {r:?}"
    );
    let r = one(probe(Some(p), &["fastopen", "127.0.0.1", &s.tcp_port]));
    assert!(r.ok, "fastopen to the allowed port: {r:?}");
    // IORING_OP_CONNECT makes no connect() syscall; the hook sits below it.
    let r = one(probe(
        Some(p),
        &["uring-connect", "127.0.0.1", &s.other_port],
    ));
    if r.errno == libc::ENOSYS {
        eprintln!("this kernel has no io_uring: the io_uring connect is not tested");
    } else {
        assert_eq!((r.ok, r.errno), (false, EPERM), "io_uring connect: {r:?}");
        let r = one(probe(Some(p), &["uring-connect", "127.0.0.1", &s.tcp_port]));
        assert!(r.ok, "io_uring connect to the allowed port: {r:?}");
    }
    let c = s.agents.counters("ev").expect("counters");
    assert_eq!(c.egress[egress_slot(PROTO_TCP, VERDICT_DENIED)], 2);
    assert_eq!(c.egress[egress_slot(PROTO_TCP, VERDICT_ALLOWED)], 2);
}

#[test]
fn a_new_network_namespace_does_not_leave_the_cgroup_hooks_behind() {
    privileged!();
    let s = setup();
    let a = parse_attempts(
        &run_probe(
            Some(s.cg.path()),
            &["unshare-net-connect", "127.0.0.1", "9"],
        )
        .stdout,
    );
    assert_eq!(a.len(), 2, "{a:?}");
    assert!(a[0].ok, "unshare as root: {a:?}");
    // The hooks belong to the cgroup, not to a network namespace.
    assert_eq!((a[1].ok, a[1].errno), (false, EPERM), "{a:?}");
}

#[test]
fn other_spellings_of_an_address_get_the_verdict_of_what_they_reach() {
    privileged!();
    let s = setup();
    let p = s.cg.path();
    // IPv4-mapped: the IPv4 host the rules allow.
    let r = one(probe(Some(p), &["sendto", "::ffff:127.0.0.1", &s.udp_port]));
    assert!(r.ok, "{r:?}");
    assert_eq!(received(&s.udp), 1);
    // IPv4-compatible (::127.0.0.1) is an IPv6 address: no IPv6 rule, denied.
    let r = one(probe(Some(p), &["sendto", "::127.0.0.1", &s.udp_port]));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
    // 0.0.0.0 and :: reach the local host on Linux: not what the rule names, denied.
    for any in ["0.0.0.0", "::"] {
        let r = one(probe(Some(p), &["sendto", any, &s.udp_port]));
        assert_eq!((r.ok, r.errno), (false, EPERM), "{any}: {r:?}");
        let r = one(probe(Some(p), &["connect", "tcp", any, &s.other_port]));
        assert_eq!((r.ok, r.errno), (false, EPERM), "{any}: {r:?}");
    }
    assert_eq!(received(&s.udp), 0, "a denied datagram arrived");
}

/// The other ways out the issue tried that already held, kept as tests: UDP-Lite, MPTCP, the
/// NAT64 well-known prefix, and sendto with another address on a connected UDP socket. Each
/// from Python inside the agent (root, every capability), `NAME ERRNO` per attempt.
const HELD: &str = r#"
import socket, sys
udp, other = int(sys.argv[1]), int(sys.argv[2])
def attempt(name, f):
    try:
        f()
        print(name, 0)
    except OSError as e:
        print(name, e.errno)
def udplite():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)
    s.sendto(b"lite", ("127.0.0.1", udp))
def mptcp():
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    except OSError as e:
        # No MPTCP in this kernel (or switched off): nothing to get around.
        print("mptcp_unavailable", e.errno)
        return
    s.settimeout(2)
    s.connect(("127.0.0.1", other))
def nat64():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.sendto(b"nat64", ("64:ff9b::7f00:1", udp))
def connected_sendto():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", udp))
    s.send(b"connected")
    s.sendto(b"elsewhere", ("127.0.0.1", other))
attempt("udplite", udplite)
attempt("mptcp", mptcp)
attempt("nat64", nat64)
attempt("connected_sendto", connected_sendto)
"#;

#[test]
fn what_already_held_stays_held() {
    privileged!();
    let s = setup();
    let out = run_probe(
        Some(s.cg.path()),
        &["exec", "python3", "-c", HELD, &s.udp_port, &s.other_port],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    let got: std::collections::HashMap<&str, i32> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    // UDP-Lite is not UDP: a `udp` rule does not admit it.
    assert_eq!(got.get("udplite"), Some(&EPERM), "{text}");
    // MPTCP to a port no rule allows: the hooks see its subflow's connect.
    if got.contains_key("mptcp_unavailable") {
        println!("no MPTCP in this kernel");
    } else {
        assert_eq!(got.get("mptcp"), Some(&EPERM), "{text}");
    }
    // 64:ff9b::/96 is an IPv6 destination like any other: no rule, denied.
    assert_eq!(got.get("nat64"), Some(&EPERM), "{text}");
    // sendto names its own destination even on a connected socket: judged on it.
    assert_eq!(got.get("connected_sendto"), Some(&EPERM), "{text}");
    // Only the connected send to the allowed port arrived.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(received(&s.udp), 1);
}
