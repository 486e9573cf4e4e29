//! The `agentwatch` daemon end to end, as operators use it: `check`, `run`, the control socket
//! and CLI, live reload, pinned fail-closed enforcement across SIGKILL and restart, and the
//! kill switch. Every test runs its own daemon (own cgroups, pins, socket, metrics port).

use std::{
    fs,
    net::UdpSocket,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentwatch::cgroup::Cgroup;
use agentwatch_tests::{
    DaemonEnv, EPERM, TempDir, agentwatch_bin, one, parse_attempts, privileged, probe, probe_bin,
};
use agentwatch_tests::{holds_within, tcp_listener, wait_until};

fn agentwatch(args: &[&str]) -> std::process::Output {
    Command::new(agentwatch_bin())
        .args(args)
        .output()
        .expect("running agentwatch")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One agent `name` allowed to 127.0.0.1:`port` over TCP.
fn one_agent(name: &str, rules: &[String]) -> String {
    let list: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[[agents]]\nname = \"{name}\"\negress = [{}]\n",
        list.join(", ")
    )
}

#[test]
fn check_reports_each_error_with_line_and_column() {
    let dir = TempDir::new();
    let cases: &[(&str, &[&str])] = &[
        (
            "[daemon]\nmetrics_listen = \"127.0.0.1:9750\"\n\n[[agents]]\nname = \"a\"\negress = [\n  \"tcp 10.0.0.1 80\",\n  \"tcp 10.0.0.0/33 80\",\n  \"udp *.com 53\",\n]\n\n[[agents]]\nname = \"a\"\n",
            &[
                ":8:3: egress rule `tcp 10.0.0.0/33 80`: bad destination",
                ":9:3: egress rule `udp *.com 53`: `*.com` would allow every name under a top-level domain",
                ":13:8: duplicate agent name `a` (first defined on line 5)",
            ],
        ),
        (
            "[[agents]]\nname = \"a\"\negress = [\"tcp 10.0.0.1 80\"\n",
            &[":3:"],
        ),
        (
            "[daemon]\nmetrics_listen = \"localhost\"\n",
            &[":2:18: invalid socket address syntax"],
        ),
        ("[daemon]\nbogus = 1\n", &[":2:1: unknown field `bogus`"]),
        (
            "[[agents]]\nname = \"x\"\ncgroup = \"a/b\"\n[[agents]]\nname = \"y\"\ncgroup = \"a\"\n",
            &[":6:10: cgroup `a` overlaps cgroup `a/b` of the agent on line 3"],
        ),
        (
            "[[agents]]\nname = \"x\"\n[agents.breaker]\nwindow = \"10m\"\nwarmup = \"1s\"\ntrip_factor = 0.5\n",
            &[
                ":6:15: breaker.trip_factor must be a number above 1.0",
                ":3:1: breaker.window must not be longer than breaker.warmup",
            ],
        ),
        (
            "[[agents]]\nname = \"x\"\n[agents.limits]\nconnects_per_second = 0\n",
            &[":3:1: limits of 0 per second"],
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("bad{i}.toml"));
        fs::write(&path, text).expect("write");
        let out = agentwatch(&["check", "--config", path.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(1), "case {i}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), expected.len(), "case {i}: {stdout}");
        for (line, want) in lines.iter().zip(expected.iter()) {
            let want = format!("{}{want}", path.display());
            assert!(
                line.starts_with(&want),
                "case {i}: `{line}` does not start with `{want}`"
            );
        }
    }
    let good = dir.0.join("good.toml");
    fs::write(
        &good,
        "[daemon]\ndns_upstream = \"127.0.0.53\"\ndns_max_ttl = \"10m\"\n\n[[agents]]\nname = \"a\"\n\
         egress = [\"tcp 10.0.0.1 80\", \"tcp api.example.com 443\", \"tcp *.example.org 443\"]\n",
    )
    .expect("write");
    let out = agentwatch(&["check", "--config", good.to_str().expect("utf8")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn launch_runs_in_the_agent_denials_are_audited_and_cleanup_removes_everything() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_b, denied) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("e2e", &[format!("tcp 127.0.0.1 {allowed}")]));
    env.start();
    let socket_mode = fs::metadata(&env.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(socket_mode.ok(), Some(0o600));

    let out = env.launch_probe(
        "e2e",
        &["connect", "tcp", "127.0.0.1", &allowed.to_string()],
    );
    assert!(one(parse_attempts(&out.stdout)).ok, "{}", stderr(&out));
    let out = env.launch_probe("e2e", &["connect", "tcp", "127.0.0.1", &denied.to_string()]);
    let attempt = one(parse_attempts(&out.stdout));
    assert_eq!((attempt.ok, attempt.errno), (false, EPERM));
    assert_eq!(
        env.launch_probe("e2e", &["exit", "7"]).status.code(),
        Some(7),
        "launch exits with the command's status"
    );

    let out = env.cli(&["launch", "--agent", "nobody", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown agent `nobody` (guarded: e2e)"),
        "{}",
        stderr(&out)
    );
    let out = env.cli(&["freeze", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown agent `nobody`"),
        "{}",
        stderr(&out)
    );

    let denied_lines = env.wait_audit("egress_denied", 1);
    assert_eq!(denied_lines.len(), 1, "{denied_lines:?}");
    let d = &denied_lines[0];
    assert_eq!(d["agent"], "e2e");
    assert_eq!(d["pid"], attempt.pid);
    assert_eq!(d["comm"], "aw-probe");
    assert_eq!(d["proto"], "tcp");
    assert_eq!(d["dest"], format!("127.0.0.1:{denied}"));
    assert!(
        d["ts"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 27),
        "{d}"
    );

    let status = env.status();
    assert_eq!(status["e2e"]["allowed"], 1);
    assert_eq!(status["e2e"]["denied"], 1);
    assert_eq!(status["e2e"]["state"], "running");
    assert_eq!(
        env.metric("agentwatch_egress_total{agent=\"e2e\",proto=\"tcp\",verdict=\"denied\"}"),
        Some(1.0)
    );

    // A clean stop leaves enforcement in place (pinned); only --cleanup removes it.
    assert_eq!(env.stop_with(libc::SIGTERM), Some(0), "{}", env.log());
    let cg = env.agent_cgroup("e2e");
    let r = one(probe(
        Some(&cg),
        &["connect", "tcp", "127.0.0.1", &denied.to_string()],
    ));
    assert_eq!(
        (r.ok, r.errno),
        (false, EPERM),
        "still enforced after the daemon stopped"
    );
    let out = env.cli(&["launch", "--agent", "e2e", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the agentwatch daemon"),
        "{}",
        stderr(&out)
    );

    let out = agentwatch(&[
        "run",
        "--cleanup",
        "--config",
        env.config.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The agent's 6 (4 egress hooks, sock_create, the byte counter: no hostname rules, so no
    // DNS hooks) and 6 host-wide; with BPF LSM, its exec, packet-socket, clone and five
    // tamper-guard programs are eight more host-wide links.
    let links = if agentwatch_tests::bpf_lsm() { 20 } else { 12 };
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("detached {links} link(s)")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!env.pin_dir.exists(), "pins removed");
    assert!(!env.cgroup_parent.exists(), "cgroups removed");
}

#[test]
fn reload_under_load_never_gives_a_wrong_verdict() {
    privileged!();
    let (tcp, good) = tcp_listener("127.0.0.1:0");
    // Accept and drop every connection, so the backlog never fills during the run.
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            drop(conn);
        }
    });
    let udp = UdpSocket::bind(("127.0.0.1", good)).expect("udp on the same port");
    let (_b, bad) = tcp_listener("127.0.0.1:0");
    let _udp_bad = UdpSocket::bind(("127.0.0.1", bad)).expect("udp bad");
    let mut env = DaemonEnv::new();
    // Both policies allow `good` and deny `bad`, through differently shaped rules, so a
    // delete-then-insert swap would open a window for each.
    let policy_a = one_agent(
        "prober",
        &[
            format!("tcp 127.0.0.1 {good}"),
            format!("udp 127.0.0.1 {good}"),
            "tcp 10.1.0.0/16 443".into(),
        ],
    );
    let policy_b = one_agent(
        "prober",
        &[
            format!("any 127.0.0.0/8 {}-{}", good.saturating_sub(1), good),
            "udp 10.9.9.9 53".into(),
            "tcp 2001:db8::/32 *".into(),
        ],
    );
    env.write_config(&policy_a);
    env.start();
    let stop = env.dir.0.join("stop");
    let prober = env
        .probe_command("prober")
        .args([
            "alternate",
            "127.0.0.1",
            &good.to_string(),
            "127.0.0.1",
            &bad.to_string(),
        ])
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("prober");
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..100 {
        env.write_config(if i % 2 == 0 { &policy_b } else { &policy_a });
        let started = Instant::now();
        let out = env.cli(&["reload"]);
        let log = env.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        assert!(
            out.status.success(),
            "reload {i} after {:?}: {}\ndaemon log, newest first:\n{}",
            started.elapsed(),
            stderr(&out),
            tail.join("\n")
        );
        println!("reload {i}: {:?}", started.elapsed());
    }
    fs::write(&stop, "").expect("stop file");
    let out = prober.wait_with_output().expect("prober output");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("prober summary");
    assert_eq!(
        summary["wrong"], 0,
        "wrong verdicts during reloads: {summary}"
    );
    let attempts = summary["attempts"].as_u64().expect("attempts");
    assert!(
        attempts >= 400,
        "the prober ran too little to mean anything: {summary}"
    );
    // Every denied attempt (half of them) was counted as denied in the kernel.
    let status = env.status();
    assert_eq!(
        status["prober"]["denied"].as_u64(),
        Some(attempts / 2),
        "{status:?}"
    );
    let ok = env
        .metric("agentwatch_policy_reloads_total{result=\"ok\"}")
        .expect("reload metric");
    assert!(ok >= 100.0, "{ok}");
    assert_eq!(
        env.metric("agentwatch_policy_reloads_total{result=\"rejected\"}"),
        Some(0.0)
    );
    drop(udp);
}

#[test]
fn a_rejected_reload_changes_nothing() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_b, denied) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("steady", &[format!("tcp 127.0.0.1 {allowed}")]));
    env.start();
    let cg = env.agent_cgroup("steady");
    // Valid TOML, invalid policy: a bad rule next to one that would open `denied`.
    env.write_config(&one_agent(
        "steady",
        &[
            format!("tcp 127.0.0.1 {denied}"),
            "tcp 10.0.0.0/33 1".into(),
        ],
    ));
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("egress rule `tcp 10.0.0.0/33 1`: bad destination"),
        "{}",
        stderr(&out)
    );
    assert!(
        one(probe(
            Some(&cg),
            &["connect", "tcp", "127.0.0.1", &allowed.to_string()]
        ))
        .ok
    );
    let r = one(probe(
        Some(&cg),
        &["connect", "tcp", "127.0.0.1", &denied.to_string()],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM));
    let rejected = env.wait_audit("policy_rejected", 1);
    assert!(!rejected.is_empty());
    assert!(
        rejected[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("10.0.0.0/33")),
        "{:?}",
        rejected[0]
    );
    assert!(rejected[0]["agent"].is_null());
    assert!(
        env.metric("agentwatch_policy_reloads_total{result=\"rejected\"}")
            .is_some_and(|v| v >= 1.0)
    );
    // Broken TOML is rejected the same way (here through the file watcher, no command).
    fs::write(&env.config, "[[agents]\nname = ").expect("write");
    assert!(
        holds_within(Duration::from_secs(10), || env
            .wait_audit("policy_rejected", 2)
            .len()
            >= 2),
        "watcher did not reject:\n{}",
        env.log()
    );
    let r = one(probe(
        Some(&cg),
        &["connect", "tcp", "127.0.0.1", &denied.to_string()],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM));
    assert!(
        one(probe(
            Some(&cg),
            &["connect", "tcp", "127.0.0.1", &allowed.to_string()]
        ))
        .ok
    );
}

#[test]
fn reload_adds_and_removes_agents_and_follows_file_edits_and_sighup() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("first", &[]));
    env.start();
    let first = env.agent_cgroup("first");
    // A long-running process of `first`.
    let mut spinner = Command::new(probe_bin())
        .arg("--cgroup")
        .arg(&first)
        .args(["spin", env.scratch().join("spin").to_str().expect("utf8")])
        .spawn()
        .expect("spinner");
    // The probe moves itself into the cgroup: wait for that, or the daemon may remove the
    // still-empty cgroup first (seen under TCG, where starting a process takes seconds).
    let first_cg = Cgroup::open(&first).expect("first cgroup");
    wait_until(
        "the spinner to join `first`",
        Duration::from_secs(5),
        || {
            first_cg
                .all_pids()
                .is_ok_and(|pids| pids.contains(&spinner.id()))
        },
    );
    // The file watcher picks up an edit: `second` appears, `first` goes.
    env.write_config(&one_agent("second", &[format!("tcp 127.0.0.1 {port}")]));
    let removed = env.wait_audit("agent_removed", 1);
    assert_eq!(removed.len(), 1, "{}", env.log());
    assert_eq!(removed[0]["agent"], "first");
    assert_eq!(removed[0]["processes"], 1);
    assert!(
        spinner.try_wait().expect("wait").is_none(),
        "a removed agent's process keeps running"
    );
    // Unguarded now: its connect is no longer judged.
    assert!(one(probe(Some(&first), &["connect", "tcp", "127.0.0.1", "9"])).errno != EPERM);
    let out = env.launch_probe(
        "second",
        &["connect", "tcp", "127.0.0.1", &port.to_string()],
    );
    assert!(one(parse_attempts(&out.stdout)).ok, "{}", stderr(&out));
    let out = env.launch_probe("second", &["connect", "tcp", "127.0.0.1", "9"]);
    assert_eq!(one(parse_attempts(&out.stdout)).errno, EPERM);
    let names: Vec<String> = env.status().into_keys().collect();
    assert_eq!(names, ["second"]);
    // SIGHUP reloads the unchanged file: counted, nothing changes.
    let before = env
        .metric("agentwatch_policy_reloads_total{result=\"ok\"}")
        .expect("metric");
    env.signal(libc::SIGHUP);
    assert!(
        holds_within(Duration::from_secs(10), || env
            .metric("agentwatch_policy_reloads_total{result=\"ok\"}")
            .expect("metric")
            >= before + 1.0),
        "SIGHUP did not reload:\n{}",
        env.log()
    );
    // The watcher reads the file only when its metadata moves, and reloads only when its bytes
    // did: a touch (new mtime, same bytes) reloads nothing...
    let reloads = || {
        env.metric("agentwatch_policy_reloads_total{result=\"ok\"}")
            .expect("metric")
    };
    let settled = reloads();
    let now = fs::File::options()
        .write(true)
        .open(&env.config)
        .expect("config");
    now.set_modified(std::time::SystemTime::now())
        .expect("touch");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(reloads(), settled, "a touch is no change:\n{}", env.log());
    // ...and an edit in place (same inode, same length, written over without truncating, so
    // the watcher can never read half a file) is seen and applied, once.
    let text = fs::read_to_string(&env.config).expect("config");
    let other = if port == 10009 { 10010 } else { 10009 };
    let edited = text.replace(
        &format!("tcp 127.0.0.1 {port}"),
        &format!("tcp 127.0.0.1 {other}"),
    );
    assert!(
        edited != text && edited.len() == text.len(),
        "a 5-digit port: {port}"
    );
    {
        use std::io::Write as _;
        let mut f = fs::File::options()
            .write(true)
            .open(&env.config)
            .expect("config");
        f.write_all(edited.as_bytes())
            .expect("editing the config in place");
    }
    let refused = || {
        let out = env.launch_probe(
            "second",
            &["connect", "tcp", "127.0.0.1", &port.to_string()],
        );
        one(parse_attempts(&out.stdout)).errno == EPERM
    };
    wait_until(
        "the in-place edit applied",
        Duration::from_secs(10),
        refused,
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(reloads(), settled + 1.0, "{}", env.log());
    let _ = spinner.kill();
    let _ = spinner.wait();
    // `first`'s cgroup was agentwatch's; its cgroup goes once empty at the next cleanup.
    drop(env);
    assert!(!first.exists());
}

#[test]
fn sigkill_keeps_enforcement_and_a_restart_readopts_without_a_gap() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_b, denied) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("sturdy", &[format!("tcp 127.0.0.1 {allowed}")]));
    env.start();
    let cg = env.agent_cgroup("sturdy");
    let check = |label: &str| {
        let r = one(probe(
            Some(&cg),
            &["connect", "tcp", "127.0.0.1", &allowed.to_string()],
        ));
        assert!(r.ok, "{label}: allowed destination: {r:?}");
        let r = one(probe(
            Some(&cg),
            &["connect", "tcp", "127.0.0.1", &denied.to_string()],
        ));
        assert_eq!(
            (r.ok, r.errno),
            (false, EPERM),
            "{label}: denied destination"
        );
    };
    check("daemon running");
    let links_before = link_ids(&env.pin_dir);
    assert_eq!(
        links_before.len(),
        if agentwatch_tests::bpf_lsm() { 20 } else { 12 },
        "4 egress hooks + sock_create + the byte counter (no DNS hooks: no hostname rules), \
         exec and fork tracepoints, 3 socket/escape tracepoints, the clone raw tracepoint, \
         with BPF LSM its exec, packet-socket, clone and five tamper-guard programs"
    );

    env.stop_with(libc::SIGKILL);
    check("daemon killed");
    check("daemon still dead");
    assert_eq!(link_ids(&env.pin_dir), links_before);

    env.start();
    assert!(env.log().contains("re-adopting pinned maps and links"));
    check("daemon restarted");
    // The same links stayed attached throughout: nothing was detached and attached again.
    assert_eq!(link_ids(&env.pin_dir), links_before);
    let s = env.status();
    assert_eq!(
        (
            s["sturdy"]["allowed"].as_u64(),
            s["sturdy"]["denied"].as_u64()
        ),
        (Some(4), Some(4)),
        "counters continue"
    );
    // The denials made while no daemon ran were kept in the pinned ring buffer and audited.
    let denials = env.wait_audit("egress_denied", 4);
    assert_eq!(denials.len(), 4, "{denials:?}");
}

/// Kernel ids of the links pinned under `pin_dir`.
fn link_ids(pin_dir: &std::path::Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for agent in fs::read_dir(pin_dir.join("links"))
        .expect("links dir")
        .filter_map(Result::ok)
    {
        for link in fs::read_dir(agent.path())
            .expect("agent links")
            .filter_map(Result::ok)
        {
            let pinned =
                aya::programs::links::PinnedLink::from_pin(link.path()).expect("pinned link");
            let fd: aya::programs::links::FdLink = pinned.into();
            ids.push(fd.info().expect("link info").id());
        }
    }
    ids.sort_unstable();
    ids
}

fn read_counter(path: &std::path::Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn freeze_thaw_and_kill_switch() {
    privileged!();
    let (_a, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("worker", &[format!("tcp 127.0.0.1 {port}")]));
    env.start();
    let counter = env.scratch().join("counter");
    let mut spinner = env
        .probe_command("worker")
        .args(["spin", counter.to_str().expect("utf8")])
        .spawn()
        .expect("spinner");
    let wait_past = |n: u64| {
        wait_until(
            &format!("the counter to pass {n}"),
            Duration::from_secs(10),
            || read_counter(&counter) > n,
        )
    };
    wait_past(2000);

    let out = env.cli(&["freeze", "worker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cg = Cgroup::open(env.agent_cgroup("worker")).expect("cgroup");
    assert!(cg.frozen().expect("events"), "cgroup.events says frozen");
    assert_eq!(env.status()["worker"]["state"], "frozen");
    assert_eq!(
        env.metric("agentwatch_agent_frozen{agent=\"worker\"}"),
        Some(1.0)
    );
    let frozen_at = read_counter(&counter);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_counter(&counter),
        frozen_at,
        "a frozen agent makes no progress"
    );

    let out = env.cli(&["thaw", "worker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Thawed, it continues from where it was: its memory was kept.
    wait_past(frozen_at);
    assert!(read_counter(&counter) < frozen_at + 100_000);
    let _ = spinner.kill();
    let _ = spinner.wait();

    // Kill switch on a tree of 50 processes: 1 + 7 children + 7 x 6 grandchildren.
    let mut tree = env
        .probe_command("worker")
        .args(["fork-tree", "7", "6"])
        .stdout(Stdio::null())
        .spawn()
        .expect("tree");
    wait_until("the tree to grow to 50", Duration::from_secs(10), || {
        cg.all_pids().expect("pids").len() >= 50
    });
    let pids = cg.all_pids().expect("pids");
    assert_eq!(pids.len(), 50);
    let out = env.cli(&["kill", "worker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kill worker: done (50 process(es))"
    );
    assert!(cg.all_pids().expect("pids").is_empty());
    let status = tree.wait().expect("tree status");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    for pid in pids {
        // Gone, or a zombie waiting for its new parent to reap it: either way, dead.
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.chars().next()))
            .flatten();
        assert!(
            matches!(state, None | Some('Z') | Some('X')),
            "pid {pid} of the tree is alive ({state:?})"
        );
    }
    let killed = env.wait_audit("killed", 1);
    assert_eq!(
        (
            killed[0]["processes"].as_u64(),
            killed[0]["actor_uid"].as_u64()
        ),
        (Some(50), Some(0))
    );
    assert_eq!(env.status()["worker"]["state"], "killed");
    // Killed means no egress and no new processes until a human approves.
    let out = env.launch_probe("worker", &["exit", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("was killed; `agentwatch approve worker` first"),
        "{}",
        stderr(&out)
    );
    let r = one(probe(
        Some(&env.agent_cgroup("worker")),
        &["connect", "tcp", "127.0.0.1", &port.to_string()],
    ));
    assert_eq!(r.errno, EPERM, "a killed agent's egress stays denied");
    let out = env.cli(&["approve", "worker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.wait_audit("approved", 1)[0]["actor_uid"], 0);
    let out = env.launch_probe(
        "worker",
        &["connect", "tcp", "127.0.0.1", &port.to_string()],
    );
    assert!(
        one(parse_attempts(&out.stdout)).ok,
        "approved agent calls out again"
    );
    assert_eq!(env.status()["worker"]["state"], "running");
}

#[test]
fn a_non_root_peer_is_refused() {
    privileged!();
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("guarded", &[]));
    env.start();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(agentwatch_bin())
            .arg("--socket")
            .arg(&env.socket)
            .args(args)
            .output()
            .expect("setpriv")
    };
    // The socket itself is root's, mode 0600: the kernel refuses the connection.
    let out = as_nobody(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    // Even if someone loosens the socket's mode, the daemon checks the peer's credentials.
    fs::set_permissions(
        &env.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod");
    fs::set_permissions(
        &env.dir.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod dir");
    for args in [&["status"][..], &["kill", "guarded"][..], &["reload"][..]] {
        let out = as_nobody(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("permission denied: uid 65534 is not root"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(env.log().contains("refused a peer that is not root"));
    assert_eq!(env.status()["guarded"]["state"], "running");
}
