//! An agent that tries to get out: raw sockets, packet sockets, leaving its cgroup (itself, by
//! another of its processes, into another agent). Each attempt is made as the strongest agent
//! there is: a root process with every capability (an adopted agent's, or one not launched
//! through `agentwatch launch`), which joins the agent's cgroup the way launch does. Every
//! outcome is exact: this errno, this signal, this counter, this audit line.

use std::{
    net::UdpSocket,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use agentwatch_tests::wait_until;
use agentwatch_tests::{DaemonEnv, EPERM, TestCgroup, parse_attempts, privileged, probe_bin};

/// aw-probe moved into `cgroup` running `args`, to completion, whatever its exit.
fn probe_in(cgroup: &Path, args: &[&str]) -> Output {
    Command::new(probe_bin())
        .arg("--cgroup")
        .arg(cgroup)
        .args(args)
        .output()
        .expect("running aw-probe")
}

fn udp_sink() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_nonblocking(true).expect("nonblocking");
    let port = s.local_addr().expect("addr").port();
    (s, port)
}

/// How many datagrams are waiting on `s`.
fn drain(s: &UdpSocket) -> usize {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while s.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// aw-probe moved into `cgroup` running `args` in the background, once it is in the cgroup.
fn spawn_in(cgroup: &Path, args: &[&str]) -> Child {
    let child = Command::new(probe_bin())
        .arg("--cgroup")
        .arg(cgroup)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning aw-probe");
    let pid = child.id().to_string();
    wait_until("aw-probe in its cgroup", Duration::from_secs(5), || {
        std::fs::read_to_string(cgroup.join("cgroup.procs"))
            .is_ok_and(|p| p.lines().any(|l| l == pid))
    });
    child
}

/// Waits (5 s at most, stretched under emulation) for `child` to die; returns how.
fn wait_dead(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(
            start.elapsed() < agentwatch_tests::patience(Duration::from_secs(5)),
            "the moved process lives on"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn one_agent(name: &str, port: u16) -> String {
    format!("[[agents]]\nname = \"{name}\"\negress = [\"udp 127.0.0.1 {port}\"]\n")
}

fn of_kind(env: &DaemonEnv, kind: &str, n: usize) -> Vec<serde_json::Value> {
    let lines = env.wait_audit(kind, n);
    assert_eq!(lines.len(), n, "{kind} lines: {lines:#?}");
    lines
}

#[test]
fn raw_sockets_are_refused_in_the_kernel_counted_and_audited() {
    privileged!();
    let (_sink, port) = udp_sink();
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("raw", port));
    env.start();
    let cg = env.agent_cgroup("raw");
    // Control: the same root process outside the agent may open a raw socket.
    let outside = TestCgroup::new();
    let ok = parse_attempts(&probe_in(outside.path(), &["socket", "inet", "raw", "1"]).stdout);
    assert_eq!((ok.len(), ok[0].ok), (1, true), "{ok:?}");

    let mut pids = Vec::new();
    for args in [
        ["socket", "inet", "raw", "1"],
        ["socket", "inet6", "raw", "58"],
    ] {
        let a = parse_attempts(&probe_in(&cg, &args).stdout);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!((a[0].ok, a[0].errno), (false, EPERM), "{args:?}");
        pids.push(a[0].pid);
    }
    // Ordinary sockets are untouched.
    let a = parse_attempts(&probe_in(&cg, &["socket", "inet", "dgram"]).stdout);
    assert!(a[0].ok, "{a:?}");

    let lines = of_kind(&env, "socket_denied", 2);
    for (line, (family, pid)) in lines
        .iter()
        .zip([("AF_INET", pids[0]), ("AF_INET6", pids[1])])
    {
        assert_eq!(line["agent"], "raw");
        assert_eq!(line["family"], family);
        assert_eq!(line["type"], "SOCK_RAW");
        assert_eq!(line["action"], "refused");
        assert_eq!(line["pid"], pid);
        assert_eq!(line["comm"], "aw-probe");
    }
    let s = env.status();
    assert_eq!(s["raw"]["escape_attempts"]["raw_socket"], 2);
    assert_eq!(
        env.metric("agentwatch_escape_attempts_total{agent=\"raw\",kind=\"raw_socket\"}"),
        Some(2.0)
    );
}

/// Where the kernel has BPF LSM (the guests of `cargo xtask vmtest`), `lsm/socket_create`
/// refuses the socket with EPERM and the process lives on; elsewhere the sys_enter_socket
/// tracepoint kills it before socket() returns. Which one to expect comes from the kernel's LSM
/// list, read here.
#[test]
fn a_packet_socket_is_refused_or_costs_the_process_its_life() {
    privileged!();
    let lsm = agentwatch::bpf::load::bpf_lsm_active();
    let (_sink, port) = udp_sink();
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("pkt", port));
    env.start();
    let cg = env.agent_cgroup("pkt");
    // Control: outside the agent the same process gets its packet socket.
    let outside = TestCgroup::new();
    let ok = parse_attempts(&probe_in(outside.path(), &["socket", "packet", "raw"]).stdout);
    assert_eq!((ok.len(), ok[0].ok), (1, true), "{ok:?}");

    // AF_PACKET, and AF_INET + SOCK_PACKET, which the kernel turns into a packet socket.
    for args in [["socket", "packet", "raw"], ["socket", "inet", "packet"]] {
        let out = probe_in(&cg, &args);
        let attempts = parse_attempts(&out.stdout);
        if lsm {
            assert!(out.status.success(), "{args:?}: {out:?}");
            assert_eq!(attempts.len(), 1, "{args:?}: {out:?}");
            assert_eq!(
                (attempts[0].ok, attempts[0].errno),
                (false, EPERM),
                "{args:?}"
            );
        } else {
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGKILL),
                "{args:?}: {out:?}"
            );
            assert!(
                attempts.is_empty(),
                "{args:?}: socket() returned to the process"
            );
        }
    }
    let action = if lsm { "refused" } else { "killed" };
    // socket_create sees what the kernel made of AF_INET + SOCK_PACKET: an AF_PACKET socket
    // (__sock_create rewrites the family first); the tracepoint sees the call's arguments.
    let inet_packet = if lsm { "AF_PACKET" } else { "AF_INET" };
    let lines = of_kind(&env, "socket_denied", 2);
    assert_eq!(
        lines
            .iter()
            .map(|l| (
                l["family"].as_str(),
                l["type"].as_str(),
                l["action"].as_str()
            ))
            .collect::<Vec<_>>(),
        vec![
            (Some("AF_PACKET"), Some("SOCK_RAW"), Some(action)),
            (Some(inet_packet), Some("SOCK_PACKET"), Some(action)),
        ]
    );
    assert_eq!(env.status()["pkt"]["escape_attempts"]["packet_socket"], 2);
    assert_eq!(
        env.metric("agentwatch_escape_attempts_total{agent=\"pkt\",kind=\"packet_socket\"}"),
        Some(2.0)
    );
}

#[test]
fn a_process_that_moves_itself_out_dies_before_its_first_call() {
    privileged!();
    let (sink, port) = udp_sink();
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("mover", port));
    env.start();
    let cg = env.agent_cgroup("mover");
    let outside = TestCgroup::new();
    // Allowed destination: inside the agent these datagrams pass. After the move, none may.
    let a = parse_attempts(&probe_in(&cg, &["sendto", "127.0.0.1", &port.to_string(), "3"]).stdout);
    assert!(a.iter().all(|a| a.ok), "{a:?}");
    assert_eq!(drain(&sink), 3);

    let out = probe_in(
        &cg,
        &[
            "escape",
            outside.path().to_str().expect("utf8"),
            "127.0.0.1",
            &port.to_string(),
            "100",
        ],
    );
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    let after = parse_attempts(&out.stdout);
    // The window: the write of its pid never returned, so it made no call at all.
    println!("calls made after leaving the cgroup: {}", after.len());
    assert!(after.is_empty(), "{after:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(drain(&sink), 0, "a datagram left after the escape");
    let line = &of_kind(&env, "cgroup_escape", 1)[0];
    assert_eq!(line["agent"], "mover");
    assert_eq!(line["action"], "killed");
    assert_eq!(line["pid"], line["writer"]);
    assert_eq!(line["comm"], "aw-probe");
    let to = line["to"].as_str().expect("to");
    assert!(
        outside.path().ends_with(to.trim_start_matches('/')),
        "{to} vs {}",
        outside.path().display()
    );
    assert_eq!(env.status()["mover"]["escape_attempts"]["cgroup_escape"], 1);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("cgroup.procs")).expect("procs"),
        ""
    );
}

#[test]
fn an_agent_process_moving_another_out_dies_and_so_does_the_moved_one() {
    privileged!();
    let (_allowed, port) = udp_sink();
    // The victim sends, in a loop, to a port its agent denies: inside the agent every send gets
    // EPERM, so each datagram that arrives was sent after it left (the window).
    let (window, denied_port) = udp_sink();
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("pair", port));
    env.start();
    let cg = env.agent_cgroup("pair");
    let outside = TestCgroup::new();
    let mut victim = spawn_in(
        &cg,
        &[
            "sendto",
            "127.0.0.1",
            &denied_port.to_string(),
            "1000000000",
        ],
    );
    let victim_pid = victim.id();
    wait_until("the victim's denials", Duration::from_secs(5), || {
        env.status()["pair"]["denied"].as_u64().unwrap_or(0) > 100
    });
    assert_eq!(drain(&window), 0, "a denied datagram arrived");
    let out = probe_in(
        &cg,
        &[
            "move",
            &victim_pid.to_string(),
            outside.path().to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "the mover: {out:?}"
    );
    let status = wait_dead(&mut victim);
    let dead_ns = agentwatch_tests::monotonic_ns();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    std::thread::sleep(Duration::from_millis(100));
    let escaped = drain(&window);
    // The daemon kills it as soon as it reads the escape: a few milliseconds of sends at most
    // (about 3 us each), never seconds.
    assert!(escaped < 5_000, "{escaped} datagrams escaped");
    let line = &of_kind(&env, "cgroup_escape", 1)[0];
    let moved_ns = line["kernel_ts_ns"].as_u64().expect("kernel_ts_ns");
    // Its old sockets stay judged by the agent's hooks (a socket belongs to the cgroup it was
    // made in) and deny it as a task of no agent; a new socket() would kill it in the kernel.
    println!(
        "moved process dead {:.1} ms after the move; {escaped} datagrams left unguarded",
        (dead_ns.saturating_sub(moved_ns)) as f64 / 1e6
    );
    assert_eq!(line["pid"], victim_pid);
    assert_eq!(line["comm"], "aw-probe", "the moved process's name");
    assert_eq!(line["writer_comm"], "aw-probe");
    assert_ne!(line["writer"], victim_pid);
    assert_eq!(line["writer_killed"], true);
    assert_eq!(line["action"], "killed_by_daemon");
}

#[test]
fn moving_into_another_agent_is_an_escape_and_nesting_inside_ones_own_is_not() {
    privileged!();
    let (sink, port) = udp_sink();
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "{}{}",
        one_agent("left", port),
        one_agent("right", port)
    ));
    env.start();
    let left = env.agent_cgroup("left");
    let right = env.agent_cgroup("right");

    // Into another agent: killed, audited against the agent it left.
    let out = probe_in(
        &left,
        &[
            "escape",
            right.to_str().expect("utf8"),
            "127.0.0.1",
            &port.to_string(),
            "5",
        ],
    );
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    assert!(parse_attempts(&out.stdout).is_empty());
    let line = &of_kind(&env, "cgroup_escape", 1)[0];
    assert_eq!(line["agent"], "left");
    assert!(right.ends_with(line["to"].as_str().expect("to").trim_start_matches('/')));

    // A cgroup of its own below the agent's: moving there itself is allowed ...
    let nested = left.join("worker");
    std::fs::create_dir(&nested).expect("mkdir nested");
    let out = probe_in(
        &left,
        &[
            "escape",
            nested.to_str().expect("utf8"),
            "127.0.0.1",
            &port.to_string(),
            "3",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let a = parse_attempts(&out.stdout);
    assert_eq!(a.len(), 4, "{a:?}");
    assert!(a.iter().all(|a| a.ok), "{a:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(drain(&sink), 3);

    // ... and so is moving another of its processes there, once the daemon has seen the
    // nested cgroup (it sweeps once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let mut sleeper = spawn_in(&left, &["fork-tree", "0", "0"]);
    let pid = sleeper.id();
    let out = probe_in(
        &left,
        &["move", &pid.to_string(), nested.to_str().expect("utf8")],
    );
    assert!(out.status.success(), "the mover: {out:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sleeper.try_wait().expect("wait").is_none(),
        "the sleeper died"
    );
    assert_eq!(
        env.wait_audit("cgroup_escape", 2).len(),
        1,
        "one escape only"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    wait_until("the nested cgroup to empty", Duration::from_secs(5), || {
        std::fs::read_to_string(nested.join("cgroup.procs")).is_ok_and(|p| p.is_empty())
    });
    std::fs::remove_dir(&nested).expect("rmdir nested");
}

#[test]
fn an_adopted_agents_privileged_processes_are_shown_audited_once_and_still_caught() {
    privileged!();
    let (_sink, port) = udp_sink();
    // A unit's cgroup with a root process in it before agentwatch starts (not launched, so
    // not hardened).
    let unit = TestCgroup::new();
    let mut early = spawn_in(unit.path(), &["fork-tree", "0", "0"]);
    let early_pid = early.id();
    let mount = agentwatch::cgroup::cgroup2_mount().expect("mount");
    let rel = unit.path().strip_prefix(&mount).expect("below the mount");
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"unit\"\ncgroup = \"{}\"\negress = [\"udp 127.0.0.1 {port}\"]\n",
        rel.display()
    ));
    env.start();
    // Shown in status, with every one of the eight capabilities a root process holds.
    let row = &env.status()["unit"];
    let privileged = row["privileged_processes"].as_array().expect("list");
    assert_eq!(privileged.len(), 1, "{row}");
    assert_eq!(privileged[0]["pid"], early_pid);
    assert_eq!(
        privileged[0]["capabilities"].as_array().map(Vec::len),
        Some(8),
        "{row}"
    );
    // Audited once, however many sweeps see it.
    std::thread::sleep(Duration::from_millis(2500));
    let lines = of_kind(&env, "privileged_process", 1);
    assert_eq!(lines[0]["pid"], early_pid);
    assert_eq!(lines[0]["comm"], "aw-probe");
    // One that arrives later, in a cgroup made below the unit's, is audited too, once, and
    // the first is not again (each process is read once).
    let inner = unit.child("inner");
    let mut late = spawn_in(inner.path(), &["fork-tree", "0", "0"]);
    let late_pid = late.id();
    std::thread::sleep(Duration::from_millis(2500));
    let lines = of_kind(&env, "privileged_process", 2);
    assert_eq!(
        (lines[0]["pid"].as_u64(), lines[1]["pid"].as_u64()),
        (Some(u64::from(early_pid)), Some(u64::from(late_pid)))
    );
    let _ = late.kill();
    let _ = late.wait();
    // It was in the cgroup before the daemon: moving it out is an escape all the same.
    let outside = TestCgroup::new();
    std::fs::write(outside.path().join("cgroup.procs"), early_pid.to_string())
        .expect("moving it out (the test is not an agent process)");
    let status = wait_dead(&mut early);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let line = &of_kind(&env, "cgroup_escape", 1)[0];
    assert_eq!(
        (line["agent"].as_str(), line["pid"].as_u64()),
        (Some("unit"), Some(u64::from(early_pid)))
    );
    assert_eq!(
        line["writer_killed"], false,
        "the writer was no agent process"
    );
}

#[test]
fn a_child_cloned_straight_into_another_cgroup_makes_no_call() {
    privileged!();
    let (sink, port) = udp_sink();
    let mut env = DaemonEnv::new();
    env.write_config(&one_agent("cloner", port));
    env.start();
    let cg = env.agent_cgroup("cloner");
    let outside = TestCgroup::new();
    let out = probe_in(
        &cg,
        &[
            "clone-into",
            outside.path().to_str().expect("utf8"),
            "127.0.0.1",
            &port.to_string(),
            "5",
        ],
    );
    let attempts = parse_attempts(&out.stdout);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(drain(&sink), 0, "a datagram left from outside the agent");
    assert!(
        attempts.iter().all(|a| a.op != "sendto"),
        "the child made calls: {attempts:?}"
    );
    let line = &of_kind(&env, "cgroup_escape", 1)[0];
    assert_eq!(line["agent"], "cloner");
    assert_eq!(line["via"], "clone3");
    assert_eq!(line["writer_comm"], "aw-probe");
    if agentwatch_tests::bpf_lsm() {
        // lsm/task_alloc: the clone fails, nobody left, the caller lives on.
        assert!(out.status.success(), "{out:?}");
        let clone = attempts.iter().find(|a| a.op == "clone3").expect("clone3");
        assert_eq!(clone.errno, EPERM, "{attempts:?}");
        assert!(attempts.iter().all(|a| a.op != "child"), "{attempts:?}");
        assert_eq!(line["action"], "refused");
    } else {
        // The raw tracepoint: the cloning task dies as clone3 returns; the child, which the
        // kernel could not signal, dies at its first socket() (or by the daemon's hand).
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
        assert_eq!(line["writer_killed"], true);
        assert!(
            ["doomed", "killed_by_daemon"].contains(&line["action"].as_str().expect("action")),
            "{line}"
        );
        let to = line["to"].as_str().expect("to");
        assert!(
            outside.path().ends_with(to.trim_start_matches('/')) && !to.is_empty(),
            "{to} vs {}",
            outside.path().display()
        );
        wait_until("the cloned child to die", Duration::from_secs(5), || {
            std::fs::read_to_string(outside.path().join("cgroup.procs")).is_ok_and(|p| p.is_empty())
        });
    }
    assert_eq!(
        env.status()["cloner"]["escape_attempts"]["cgroup_escape"],
        1
    );

    // Into a cgroup nested in its own agent (once the daemon's sweep has seen it): still
    // guarded there, so allowed where the kernel can tell (the tracepoint); BPF LSM refuses
    // the flag before the kernel has resolved the target.
    let nested = cg.join("worker");
    std::fs::create_dir(&nested).expect("mkdir nested");
    std::thread::sleep(Duration::from_millis(1500));
    let out = probe_in(
        &cg,
        &[
            "clone-into",
            nested.to_str().expect("utf8"),
            "127.0.0.1",
            &port.to_string(),
            "3",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let attempts = parse_attempts(&out.stdout);
    std::thread::sleep(Duration::from_millis(100));
    if agentwatch_tests::bpf_lsm() {
        assert_eq!(drain(&sink), 0);
        assert_eq!(env.wait_audit("cgroup_escape", 2).len(), 2);
    } else {
        let sent = attempts.iter().filter(|a| a.op == "sendto" && a.ok).count();
        assert_eq!(sent, 3, "{attempts:?}");
        assert_eq!(drain(&sink), 3);
        assert_eq!(
            env.wait_audit("cgroup_escape", 2).len(),
            1,
            "no escape into its own subtree"
        );
    }
    wait_until("the nested cgroup to empty", Duration::from_secs(5), || {
        std::fs::read_to_string(nested.join("cgroup.procs")).is_ok_and(|p| p.is_empty())
    });
    std::fs::remove_dir(&nested).expect("rmdir nested");
}
