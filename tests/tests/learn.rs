//! Learn mode: an agent's calls are judged as usual but nothing the allow-list would deny is
//! denied: it goes through, counted (`verdict="would_deny"`) and audited
//! (`egress_would_deny`); DNS names no rule allows are answered and audited (`dns_would_deny`).
//! Caps, the exec allow-list, the escape guards and the kill switch still hold.

use std::{fs, net::Ipv4Addr};

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
    agentwatch_tests::assert_exec_denied(&spawned);
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

/// Calls of agent `agent` (`aw-probe` ARGS through `launch`) that all succeeded.
fn all_ok(env: &DaemonEnv, agent: &str, args: &[&str]) -> usize {
    let out = env.launch_probe(agent, args);
    let attempts = parse_attempts(&out.stdout);
    assert!(
        !attempts.is_empty() && attempts.iter().all(|a| a.ok),
        "{args:?}: {attempts:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    attempts.len()
}

#[test]
fn rule_hits_are_exact_for_overlapping_rules() {
    privileged!();
    let (_l, port) = tcp_listener("0.0.0.0:0");
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"counted\"\negress = [\"tcp 127.0.0.0/8 {port}\", \
         \"tcp 127.0.0.2 {port}\", \"tcp  127.0.0.2/32   {port}\", \"udp 127.0.0.1 9\"]\n"
    ));
    env.start();
    let p = port.to_string();
    assert_eq!(
        all_ok(&env, "counted", &["connect", "tcp", "127.0.0.2", &p, "3"]),
        3
    );
    assert_eq!(
        all_ok(&env, "counted", &["connect", "tcp", "127.0.0.3", &p, "5"]),
        5
    );
    let out = env.cli(&["status", "counted", "--rules", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rules: Vec<(String, u64)> = v["agents"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().expect("rule").to_owned(),
                r["hits"].as_u64().expect("hits"),
            )
        })
        .collect();
    // The /32 counts the calls to its address, the /8 the others; the same /32 written twice
    // is one rule, shown as first written.
    assert_eq!(
        rules,
        [
            (format!("tcp 127.0.0.0/8 {port}"), 5),
            (format!("tcp 127.0.0.2 {port}"), 3),
            ("udp 127.0.0.1 9".to_owned(), 0),
        ]
    );
    assert_eq!(
        env.metric(&format!(
            "agentwatch_rule_hits_total{{agent=\"counted\",rule=\"tcp 127.0.0.0/8 {port}\"}}"
        )),
        Some(5.0)
    );
    assert_eq!(
        env.metric(&format!(
            "agentwatch_rule_hits_total{{agent=\"counted\",rule=\"tcp 127.0.0.2 {port}\"}}"
        )),
        Some(3.0)
    );
    assert_eq!(
        env.metric("agentwatch_rule_hits_total{agent=\"counted\",rule=\"udp 127.0.0.1 9\"}"),
        Some(0.0)
    );
    let text = env.cli(&["status", "counted", "--rules"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("udp 127.0.0.1 9") && l.trim_end().ends_with("0  unused")),
        "{text}"
    );

    // A reload that keeps a rule keeps its count; a removed rule's count goes.
    env.write_config(&format!(
        "[[agents]]\nname = \"counted\"\negress = [\"tcp 127.0.0.2 {port}\", \"udp 127.0.0.1 9\"]\n"
    ));
    assert!(env.cli(&["reload"]).status.success());
    assert_eq!(
        all_ok(&env, "counted", &["connect", "tcp", "127.0.0.2", &p, "2"]),
        2
    );
    assert_eq!(
        env.metric(&format!(
            "agentwatch_rule_hits_total{{agent=\"counted\",rule=\"tcp 127.0.0.2 {port}\"}}"
        )),
        Some(5.0)
    );
    assert!(
        !env.metrics()
            .contains(&format!("rule=\"tcp 127.0.0.0/8 {port}\"")),
        "removed rule's series gone"
    );
}

#[test]
fn learn_proposes_a_policy_that_admits_exactly_what_the_agent_did() {
    privileged!();
    let (_a, by_address) = tcp_listener("127.0.0.1:0");
    let (_b, by_name) = tcp_listener("127.0.23.1:0");
    let (_c, other) = tcp_listener("127.0.0.1:0");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let udp_port = udp.local_addr().expect("addr").port();
    let server = TestDnsServer::start([
        rec("api.learn.test", Rdata::A(Ipv4Addr::new(127, 0, 23, 1)), 60),
        rec(
            "else.learn.test",
            Rdata::A(Ipv4Addr::new(127, 0, 23, 2)),
            60,
        ),
    ]);
    let probe_path = probe_bin();
    let probe_path = probe_path.to_str().expect("utf8");
    let mut env = start_daemon(
        &server,
        "[[agents]]\nname = \"learner\"\nmode = \"learn\"\nlease = \"2h\"\n\
         egress = [\"tcp 127.0.0.9 1\"]\n[agents.limits]\nconnects_per_second = 500\n",
    );
    let work = |env: &DaemonEnv| {
        let out = env.launch_probe(
            "learner",
            &["resolve", "10.53.0.1", "53", "api.learn.test", "A", "udp"],
        );
        let l = parse_lookups(&out.stdout);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].addrs, ["127.0.23.1"], "{:?}", l[0]);
        all_ok(
            env,
            "learner",
            &["connect", "tcp", "127.0.23.1", &by_name.to_string()],
        );
        all_ok(
            env,
            "learner",
            &["connect", "tcp", "127.0.0.1", &by_address.to_string(), "2"],
        );
        all_ok(
            env,
            "learner",
            &["sendto", "127.0.0.1", &udp_port.to_string(), "3"],
        );
    };
    work(&env);
    let learn = |env: &DaemonEnv| {
        let out = env.cli(&["learn", "learner"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let proposal = learn(&env);
    let line = |needle: &str| {
        proposal
            .lines()
            .find(|l| l.trim_start().starts_with(needle))
            .unwrap_or_else(|| panic!("no line starting with {needle}:\n{proposal}"))
            .to_owned()
    };
    assert!(
        line(&format!("\"tcp api.learn.test {by_name}\","))
            .contains("# 1 call (1 not allowed by the current rules), last ")
    );
    assert!(line(&format!("\"tcp 127.0.0.1 {by_address}\",")).contains("# 2 calls (2 not allowed"));
    assert!(line(&format!("\"udp 127.0.0.1 {udp_port}\",")).contains("# 3 calls"));
    // The resolver the agent asked needs no rule: with hostname rules, its DNS goes to the
    // forwarder whatever resolver it names.
    assert!(proposal.contains(
        "# DNS to \"udp 10.53.0.1 53\" (1 call) goes to agentwatch's forwarder with the hostname rules: no rule needed"
    ), "{proposal}");
    assert!(line(&format!("\"{probe_path}\",")).contains("# 4 execs"));
    assert!(
        line("#   \"tcp 127.0.0.9 1\"").starts_with('#'),
        "unused rule listed"
    );
    assert!(proposal.contains("lease = \"2h\""), "{proposal}");
    assert!(
        proposal.contains("[agents.limits]\nconnects_per_second = 500"),
        "{proposal}"
    );
    assert!(!proposal.contains("mode ="), "{proposal}");
    let json = env.cli(&["learn", "learner", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(json["egress"].as_array().map(Vec::len), Some(3), "{json}");
    assert_eq!(json["unused_rules"], serde_json::json!(["tcp 127.0.0.9 1"]));
    assert_eq!(json["lost"], 0);

    // What was learned survives a daemon restart (the times, to the second, may round
    // differently: compare the rest).
    let rules_of = |v: &serde_json::Value| {
        v["egress"]
            .as_array()
            .expect("egress")
            .iter()
            .map(|r| {
                (
                    r["rule"].clone(),
                    r["calls"].clone(),
                    r["would_deny"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    env.stop_with(libc::SIGTERM);
    env.start();
    let again = env.cli(&["learn", "learner", "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(
        rules_of(&again),
        rules_of(&json),
        "same proposal after a restart"
    );
    assert_eq!(again["exec_allow"][0]["execs"], 4, "{again}");

    // Applied: the agent does the same work, enforced, and nothing else gets out.
    fs::write(
        env.dir.0.join("proposal.toml"),
        format!("{}{proposal}", env.daemon_section()),
    )
    .expect("write");
    let check = env.cli(&[
        "check",
        "--config",
        env.dir.0.join("proposal.toml").to_str().expect("utf8"),
    ]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    env.write_config(&proposal);
    let reload = env.cli(&["reload"]);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    assert_eq!(env.status()["learner"]["mode"], "enforce");
    work(&env);
    let r = one(parse_attempts(
        &env.launch_probe(
            "learner",
            &["connect", "tcp", "127.0.0.1", &other.to_string()],
        )
        .stdout,
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "not seen: denied {r:?}");
    let out = env.launch_probe(
        "learner",
        &["resolve", "10.53.0.1", "53", "else.learn.test", "A", "udp"],
    );
    let l = parse_lookups(&out.stdout);
    assert_eq!(l[0].rcode.as_deref(), Some("Refused"), "{:?}", l[0]);
    let out = env.launch_probe("learner", &["spawn-each", "/bin/true"]);
    let spawned: serde_json::Value = serde_json::from_slice(&out.stdout).expect("spawn-each line");
    agentwatch_tests::assert_exec_denied(&spawned);
    let row = &env.status()["learner"];
    assert_eq!(row["denied"], 1, "{row}");
    assert_eq!(
        row["would_deny"], 6,
        "the learn-mode calls, and none since: {row}"
    );
}

#[test]
fn one_agent_filling_its_learn_quota_costs_no_other_agent_a_record() {
    privileged!();
    let (sink, port) = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().expect("addr").port();
        (s, port)
    };
    let mut env = DaemonEnv::new();
    env.set_daemon_extra("learn_quota = 64\n");
    env.write_config(
        "[[agents]]\nname = \"greedy\"\nmode = \"learn\"\negress = []\n\
         [[agents]]\nname = \"modest\"\nmode = \"learn\"\negress = []\n",
    );
    env.start();
    // 200 destinations (10 addresses x 20 ports), each called once: 64 fit its share.
    let out = env.launch_probe("greedy", &["sendto-spread", "127.1.0.1", "10", "20"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"sent\":200"),
        "{out:?}"
    );
    all_ok(
        &env,
        "modest",
        &["sendto", "127.0.0.1", &port.to_string(), "1"],
    );
    drop(sink);
    let learn = |agent: &str| {
        let out = env.cli(&["learn", agent, "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let greedy = learn("greedy");
    assert_eq!(greedy["lost"], 200 - 64, "{greedy}");
    let modest = learn("modest");
    assert_eq!(modest["lost"], 0, "{modest}");
    let rules: Vec<&str> = modest["egress"]
        .as_array()
        .expect("egress")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert_eq!(
        rules,
        [format!("udp 127.0.0.1 {port}").as_str()],
        "{modest}"
    );
    // The proposal says it is partial, and why.
    let text = String::from_utf8(env.cli(&["learn", "greedy"]).stdout).expect("utf8");
    assert!(text.contains("# WARNING: 136 call(s) or exec(s)"), "{text}");
    assert!(text.contains("learn_quota"), "{text}");
}

#[test]
fn learn_quotas_that_do_not_fit_the_kernels_maps_are_refused_whole() {
    privileged!();
    let mut env = DaemonEnv::new();
    env.set_daemon_extra("learn_quota = 1048576\n");
    env.write_config(
        "[[agents]]\nname = \"l0\"\nmode = \"learn\"\n[[agents]]\nname = \"l1\"\nmode = \"learn\"\n",
    );
    let out = std::process::Command::new(agentwatch_tests::agentwatch_bin())
        .args(["check", "--config"])
        .arg(&env.config)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 agents in learn mode with daemon.learn_quota = 1048576 need 2097152 learn records, more than the kernel's 1048576: lower learn_quota to at most 524288"),
        "{err}"
    );
}
