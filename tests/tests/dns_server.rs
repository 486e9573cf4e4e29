//! The tests' own DNS server and aw-probe's DNS commands, against each other on loopback: no
//! daemon, no cgroup, no privilege (except the last, which needs root for a mount namespace).
//! The privileged DNS tests trust these two to tell the truth.

use std::net::{Ipv4Addr, Ipv6Addr};

use agentwatch_tests::{
    dns::{
        Exchange, Lookup, Rdata, TestDnsServer, hex, malformed_with_header, oversized_junk,
        parse_lookups, parse_raw, query_bytes, rec,
    },
    run_probe,
};
use hickory_proto::rr::RecordType;

fn zone() -> Vec<agentwatch_tests::dns::ZoneRecord> {
    vec![
        rec(
            "api.agentwatch.test",
            Rdata::A(Ipv4Addr::new(127, 0, 20, 1)),
            60,
        ),
        rec(
            "api.agentwatch.test",
            Rdata::A(Ipv4Addr::new(127, 0, 20, 2)),
            60,
        ),
        rec("v6.agentwatch.test", Rdata::Aaaa(Ipv6Addr::LOCALHOST), 30),
        rec(
            "WWW.AgentWatch.test.",
            Rdata::Cname("edge.agentwatch.test".into()),
            300,
        ),
        rec(
            "edge.agentwatch.test",
            Rdata::Cname("origin.agentwatch.test.".into()),
            200,
        ),
        rec(
            "origin.agentwatch.test",
            Rdata::A(Ipv4Addr::new(127, 0, 20, 3)),
            5,
        ),
    ]
}

fn lookup(server: &TestDnsServer, name: &str, qtype: &str, mode: &str) -> Lookup {
    let out = run_probe(
        None,
        &[
            "resolve",
            &server.addr().ip().to_string(),
            &server.addr().port().to_string(),
            name,
            qtype,
            mode,
        ],
    );
    let mut l = parse_lookups(&out.stdout);
    assert_eq!(l.len(), 1, "{l:?}");
    l.remove(0)
}

#[test]
fn answers_a_aaaa_and_cname_chains_over_udp_and_tcp() {
    let server = TestDnsServer::start(zone());
    let from = server.addr().to_string();
    for mode in ["udp", "udp-connected", "tcp"] {
        let l = lookup(&server, "api.agentwatch.test", "A", mode);
        assert_eq!(l.errno, 0, "{mode}: {l:?}");
        assert_eq!(l.rcode.as_deref(), Some("NoError"), "{mode}");
        assert_eq!(l.addrs, ["127.0.20.1", "127.0.20.2"], "{mode}");
        assert_eq!(l.ttls, [60, 60], "{mode}");
        assert_eq!(l.from.as_deref(), Some(from.as_str()), "{mode}");
        assert!(l.id_ok, "{mode}");

        let l = lookup(&server, "v6.agentwatch.test", "AAAA", mode);
        assert_eq!((l.addrs, l.ttls), (vec!["::1".to_owned()], vec![30]));
        // The chain, then the address at its end; matching ignores case.
        let l = lookup(&server, "www.agentwatch.TEST", "A", mode);
        assert_eq!(l.rcode.as_deref(), Some("NoError"));
        assert_eq!(l.cnames, ["edge.agentwatch.test", "origin.agentwatch.test"]);
        assert_eq!((l.addrs, l.ttls), (vec!["127.0.20.3".to_owned()], vec![5]));
    }
    // A name without records of the type: NODATA; an unknown name: NXDOMAIN.
    let l = lookup(&server, "v6.agentwatch.test", "A", "udp");
    assert_eq!((l.rcode.as_deref(), l.addrs.len()), (Some("NoError"), 0));
    let l = lookup(&server, "api.agentwatch.test", "MX", "udp");
    assert_eq!((l.rcode.as_deref(), l.addrs.len()), (Some("NoError"), 0));
    let l = lookup(&server, "nothing.agentwatch.test", "A", "tcp");
    assert_eq!(l.rcode.as_deref(), Some("NXDomain"));
    assert_eq!(
        server.queries_for("api.agentwatch.test"),
        4,
        "{:?}",
        server.queries()
    );
    assert_eq!(server.queries_for("WWW.agentwatch.test."), 3);
    assert!(
        server
            .queries()
            .contains(&("api.agentwatch.test".to_owned(), RecordType::MX))
    );
}

#[test]
fn several_lookups_per_run_and_a_changed_zone() {
    let server = TestDnsServer::start(zone());
    let out = run_probe(
        None,
        &[
            "resolve",
            "127.0.0.1",
            &server.addr().port().to_string(),
            "api.agentwatch.test",
            "A",
            "udp",
            "5",
        ],
    );
    let l = parse_lookups(&out.stdout);
    assert_eq!(l.len(), 5);
    assert!(l.iter().all(|l| l.errno == 0 && l.id_ok), "{l:?}");
    server.set(vec![rec(
        "api.agentwatch.test",
        Rdata::A(Ipv4Addr::new(127, 0, 20, 9)),
        1,
    )]);
    server.clear_queries();
    let l = lookup(&server, "api.agentwatch.test", "A", "tcp");
    assert_eq!((l.addrs, l.ttls), (vec!["127.0.20.9".to_owned()], vec![1]));
    assert_eq!(
        server.queries(),
        [("api.agentwatch.test".to_owned(), RecordType::A)]
    );
}

#[test]
fn records_ids_and_senders_and_holds_udp_answers_until_released() {
    let server = TestDnsServer::start(zone());
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 512];
    let ask = |id: u16| {
        client
            .send_to(
                &query_bytes(id, "API.agentwatch.test", RecordType::A),
                server.addr(),
            )
            .expect("send");
    };
    ask(0x1111);
    let n = client.recv(&mut buf).expect("an answer at once");
    assert_eq!(buf[..2], [0x11, 0x11], "{:?}", &buf[..n]);
    assert_eq!(
        server.exchanges(),
        [Exchange {
            id: 0x1111,
            from: client.local_addr().expect("addr"),
            name: "api.agentwatch.test".into(),
            qtype: RecordType::A,
            udp: true,
        }]
    );

    // Held: recorded on arrival, answered only on release, from the server's address.
    server.hold_udp();
    ask(0x2222);
    ask(0x3333);
    let e = client.recv(&mut buf).expect_err("no answer while held");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    let ids: Vec<u16> = server.exchanges().iter().map(|e| e.id).collect();
    assert_eq!(ids, [0x1111, 0x2222, 0x3333]);
    assert_eq!(server.release_udp(), 2);
    for id in [0x2222u16, 0x3333] {
        let (n, from) = client.recv_from(&mut buf).expect("the held answer");
        assert_eq!(
            (&buf[..2], from),
            (&id.to_be_bytes()[..], server.addr()),
            "{n}"
        );
    }
    // Released: answered at once again; over TCP the sender is recorded too.
    ask(0x4444);
    client.recv(&mut buf).expect("an answer at once");
    assert_eq!(buf[..2], [0x44, 0x44]);
    let l = lookup(&server, "api.agentwatch.test", "A", "tcp");
    assert_eq!(l.errno, 0, "{l:?}");
    let last = server.exchanges().pop().expect("the TCP question");
    assert!(!last.udp && last.from.ip().is_loopback(), "{last:?}");
    server.clear_queries();
    assert_eq!(server.exchanges(), []);
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let records: Vec<_> = (1..=100u8)
        .map(|i| {
            rec(
                "many.agentwatch.test",
                Rdata::A(Ipv4Addr::new(127, 64, 0, i)),
                60,
            )
        })
        .collect();
    let server = TestDnsServer::start(records);
    let l = lookup(&server, "many.agentwatch.test", "A", "udp");
    assert!(l.truncated, "{l:?}");
    assert!(l.addrs.is_empty());
    let l = lookup(&server, "many.agentwatch.test", "A", "tcp");
    assert!(!l.truncated);
    assert_eq!(l.addrs.len(), 100);
    assert_eq!(l.addrs[99], "127.64.0.100");
}

#[test]
fn junk_gets_formerr_with_its_id_or_no_reply() {
    let server = TestDnsServer::start(zone());
    let port = server.addr().port().to_string();
    let raw = |bytes: &[u8], tcp: bool| {
        let h = hex(bytes);
        let mut args = vec!["dns-raw", "127.0.0.1", &port, &h];
        if tcp {
            args.push("tcp");
        }
        let mut r = parse_raw(&run_probe(None, &args).stdout);
        assert_eq!(r.len(), 1);
        r.remove(0)
    };
    for tcp in [false, true] {
        let r = raw(&malformed_with_header(0xbeef), tcp);
        assert_eq!(
            (r.errno, r.rcode.as_deref(), r.id),
            (0, Some("FormErr"), Some(0xbeef)),
            "tcp {tcp}: {r:?}"
        );
        let r = raw(&oversized_junk(0x1234, 3000), tcp);
        assert_eq!(
            (r.errno, r.rcode.as_deref(), r.id),
            (0, Some("FormErr"), Some(0x1234)),
            "tcp {tcp}: {r:?}"
        );
        let r = raw(&query_bytes(7, "api.agentwatch.test", RecordType::A), tcp);
        assert_eq!((r.rcode.as_deref(), r.id), (Some("NoError"), Some(7)));
    }
    // Shorter than a header: nothing comes back.
    let r = raw(&[1, 2, 3, 4, 5], false);
    assert_eq!((r.errno, r.reply_len), (libc::EAGAIN, 0), "{r:?}");
    assert!(server.queries().len() == 2, "{:?}", server.queries());
}

#[test]
fn with_resolv_conf_shows_the_file_to_the_program_only() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("with-resolv-conf needs root (a mount namespace); skipped");
        return;
    }
    let dir = agentwatch_tests::TempDir::new();
    let file = dir.0.join("resolv.conf");
    std::fs::write(&file, "nameserver 10.53.0.1\n").expect("write");
    let before = std::fs::read_to_string("/etc/resolv.conf").expect("host resolv.conf");
    let out = run_probe(
        None,
        &[
            "with-resolv-conf",
            file.to_str().expect("utf8"),
            "cat",
            "/etc/resolv.conf",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nameserver 10.53.0.1\n"
    );
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").expect("host resolv.conf"),
        before,
        "the host's file is untouched"
    );
}

#[test]
fn glibc_resolves_through_the_test_server() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root (a network and a mount namespace); skipped");
        return;
    }
    // Port 53 of a loopback of our own: glibc's resolver only asks port 53.
    let netns = agentwatch_tests::NetNsGuard::new();
    // getent asks getaddrinfo with AI_ADDRCONFIG: no IPv4 lookup at all unless the namespace
    // has an IPv4 address other than 127.0.0.1. One on lo (TEST-NET-1; it leads nowhere).
    netns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"]);
    let server = TestDnsServer::start_at("127.0.0.1:53".parse().expect("addr"), zone());
    let dir = agentwatch_tests::TempDir::new();
    let file = dir.0.join("resolv.conf");
    std::fs::write(
        &file,
        "nameserver 127.0.0.1\noptions timeout:2 attempts:1\n",
    )
    .expect("write");
    let getent = |name: &str| {
        std::process::Command::new(agentwatch_tests::probe_bin())
            .args(["with-resolv-conf", file.to_str().expect("utf8")])
            .args(["getent", "ahostsv4", name])
            .output()
            .expect("aw-probe with-resolv-conf getent")
    };
    let out = getent("api.agentwatch.test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?} {:?}", server.queries());
    let addrs: std::collections::BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        addrs.into_iter().collect::<Vec<_>>(),
        ["127.0.20.1", "127.0.20.2"]
    );
    let out = getent("www.agentwatch.test");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("127.0.20.3 "),
        "{out:?}"
    );
    assert_eq!(getent("nothing.agentwatch.test").status.code(), Some(2));
    assert_eq!(
        server.queries_for("api.agentwatch.test"),
        1,
        "{:?}",
        server.queries()
    );
}
