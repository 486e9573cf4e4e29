//! Learn mode: an agent's calls are judged as usual but nothing the allow-list would deny is
//! denied: it goes through, counted (`verdict="would_deny"`) and audited
//! (`egress_would_deny`); DNS names no rule allows are answered and audited (`dns_would_deny`).
//! Caps, the exec allow-list, the escape guards and the kill switch still hold.

use std::net::Ipv4Addr;

use agentwatch_tests::tcp_listener;
use agentwatch_tests::{
    DaemonEnv, EPERM,
    dns::{Rdata, TestDnsServer, parse_lookups, rec, start_daemon},
    one, parse_attempts, privileged, probe, probe_bin,
};

#[test]
fn learn_mode_denies_nothing_the_allow_list_would_and_reports_each() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_b, unlisted) = tcp_listener("127.0.0.1:0");
    let probe_path = probe_bin();
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"learner\"\nmode = \"learn\"\negress = [\"tcp 127.0.0.1 {allowed}\"]\n\
         exec_allow = [\"{}\"]\n",
        probe_path.display()
    ));
    env.start();
    let connect = |port: u16| {
        one(parse_attempts(
            &env.launch_probe(
                "learner",
                &["connect", "tcp", "127.0.0.1", &port.to_string()],
            )
            .stdout,
        ))
    };
    assert!(connect(allowed).ok, "listed: allowed");
    let r = connect(unlisted);
    assert!(r.ok, "unlisted, in learn mode: goes through: {r:?}");
    let lines = env.wait_audit("egress_would_deny", 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["dest"], format!("127.0.0.1:{unlisted}"));
    assert_eq!(lines[0]["proto"], "tcp");
    assert!(
        env.audit_lines()
            .iter()
            .all(|l| l["kind"] != "egress_denied")
    );
    let row = &env.status()["learner"];
    assert_eq!(row["mode"], "learn");
    assert_eq!(
        (
            row["allowed"].as_u64(),
            row["would_deny"].as_u64(),
            row["denied"].as_u64()
        ),
        (Some(1), Some(1), Some(0)),
        "{row}"
    );
    assert_eq!(
        env.metric(
            "agentwatch_egress_total{agent=\"learner\",proto=\"tcp\",verdict=\"would_deny\"}"
        ),
        Some(1.0)
    );

    // Still enforced: the exec allow-list, the escape guards, the kill switch.
    let out = env.cli(&[
        "launch",
        "--agent",
        "learner",
        "--",
        probe_path.to_str().expect("utf8"),
        "spawn-each",
        "/bin/true",
    ]);
    let spawned: serde_json::Value = serde_json::from_slice(&out.stdout).expect("spawn-each line");
    assert_eq!(spawned["signal"], 9, "unlisted exec killed: {spawned}");
    let cgroup = env.agent_cgroup("learner");
    let raw = one(probe(Some(&cgroup), &["socket", "inet", "raw", "1"]));
    assert_eq!(raw.errno, EPERM, "raw socket refused: {raw:?}");
    assert!(env.cli(&["kill", "learner"]).status.success());
    let r = one(probe(
        Some(&cgroup),
        &["connect", "tcp", "127.0.0.1", &allowed.to_string()],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "killed: egress revoked");
    let r = one(probe(
        Some(&cgroup),
        &["connect", "tcp", "127.0.0.1", &unlisted.to_string()],
    ));
    assert_eq!(
        (r.ok, r.errno),
        (false, EPERM),
        "killed: not a would-be denial"
    );
    assert_eq!(env.status()["learner"]["would_deny"], 1);
}

#[test]
fn learn_mode_answers_names_no_rule_allows_and_reports_them() {
    privileged!();
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let server = TestDnsServer::start([
        rec(
            "api.agentwatch.test",
            Rdata::A(Ipv4Addr::new(127, 0, 23, 1)),
            60,
        ),
        rec(
            "other.agentwatch.test",
            Rdata::A(Ipv4Addr::new(127, 0, 23, 2)),
            60,
        ),
    ]);
    let env = start_daemon(
        &server,
        &format!(
            "[[agents]]\nname = \"learner\"\nmode = \"learn\"\n\
             egress = [\"tcp api.agentwatch.test {port}\"]\n"
        ),
    );
    let out = env.launch_probe(
        "learner",
        &[
            "resolve",
            "10.53.0.1",
            "53",
            "other.agentwatch.test",
            "A",
            "udp",
        ],
    );
    let l = parse_lookups(&out.stdout);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].rcode.as_deref(), Some("NoError"), "{:?}", l[0]);
    assert_eq!(l[0].addrs, ["127.0.23.2"]);
    assert_eq!(server.queries_for("other.agentwatch.test"), 1);
    let lines = env.wait_audit("dns_would_deny", 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["name"], "other.agentwatch.test");
    assert_eq!(lines[0]["qtype"], "A");
    let dns = &env.status()["learner"]["dns"];
    assert_eq!(
        (
            dns["would_deny"].as_u64(),
            dns["denied"].as_u64(),
            dns["learned"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{dns}"
    );
}
