//! Faults around the daemon: a full disk under the audit trail, an agent's cgroup removed from
//! under it, a configured cgroup that already has foreign programs, a metrics port that is
//! taken. Each gets a clear error or a logged recovery; enforcement never stops and nothing is
//! lost without being counted.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agentwatch_tests::{
    DaemonEnv, EPERM, agentwatch_bin, holds_within, one, parse_attempts, privileged, tcp_listener,
    wait_until,
};

/// A small tmpfs the test mounted; unmounted on drop, also when the test fails.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Self {
        fs::create_dir_all(at).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs at {}", at.display());
        Self(at.to_owned())
    }

    /// Fills what is left with a file of its own; returns it.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        // dd stops at ENOSPC and says so: that is the point.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4096"])
            .arg(format!("of={}", filler.display()))
            .output()
            .expect("dd");
        // And any page left over by the large writes.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1"])
            .arg(format!("of={}", self.0.join("filler-tail").display()))
            .output()
            .expect("dd");
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn denied_connect(env: &DaemonEnv, port: u16) {
    let r = one(parse_attempts(
        &env.launch_probe("a", &["connect", "tcp", "127.0.0.1", &port.to_string()])
            .stdout,
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "{r:?}");
}

#[test]
fn a_full_disk_loses_audit_lines_counted_and_the_trail_marks_the_gap() {
    privileged!();
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    let small = SmallFs::mount(&env.dir.0.join("auditfs"), "1m");
    env.audit = small.0.join("audit.jsonl");
    env.write_config("[[agents]]\nname = \"a\"\negress = []\n");
    env.start();
    denied_connect(&env, port);
    env.wait_audit("egress_denied", 1);

    let filler = small.fill();
    let lost = || {
        env.metric("agentwatch_audit_lines_lost_total")
            .unwrap_or(0.0) as usize
    };
    // The trail's last page may still have room for a few lines: use it up first.
    let mut launched = 1;
    while lost() == 0 {
        assert!(launched < 50, "the trail never filled: {}", env.log());
        denied_connect(&env, port);
        launched += 1;
    }
    // A launched probe runs as root with every capability: one that lives until the daemon's
    // sweep sees it (seconds under TCG, rarely on the host) also gets a `privileged_process`
    // line, and the daemon logs each of those.
    let privileged = || env.log().matches("holds dangerous capabilities").count();
    // Let the last launch's lines reach the writer, then count from here.
    std::thread::sleep(Duration::from_millis(500));
    let (lost_before, lines_before, privileged_before) =
        (lost(), env.audit_lines().len(), privileged());
    for _ in 0..10 {
        denied_connect(&env, port);
    }
    launched += 10;
    // Enforcement went on; each launch's two lines (`exec`, `egress_denied`) are counted as
    // lost, none silently gone, and so is each `privileged_process` line.
    let expected = || lost_before + 20 + (privileged() - privileged_before);
    // On timeout the assertion below says by how much.
    let _ = holds_within(Duration::from_secs(10), || lost() == expected());
    assert_eq!(lost(), expected(), "{}", env.log());
    assert_eq!(env.audit_lines().len(), lines_before);
    let lost_lines = lost();
    assert_eq!(env.status()["a"]["denied"], launched);

    let errors = env
        .log()
        .lines()
        .filter(|l| l.contains("writing the audit trail"))
        .count();
    assert_eq!(
        errors,
        1,
        "logged once per gap, not per line:\n{}",
        env.log()
    );

    // Space again: the next line is preceded by one that says what is missing.
    fs::remove_file(&filler).expect("rm filler");
    fs::remove_file(small.0.join("filler-tail")).expect("rm filler");
    let denials = env
        .audit_lines()
        .iter()
        .filter(|l| l["kind"] == "egress_denied")
        .count();
    denied_connect(&env, port);
    env.wait_audit("egress_denied", denials + 1);
    let all = env.audit_lines();
    let gaps: Vec<usize> = (0..all.len())
        .filter(|&i| all[i]["kind"] == "audit_lines_lost")
        .collect();
    assert_eq!(gaps.len(), 1, "one gap");
    let gap = gaps[0];
    assert_eq!(
        gap, lines_before,
        "the gap line follows the last line written"
    );
    assert_eq!(all[gap]["count"], lost_lines, "{}", all[gap]);
    assert!(
        all[gap]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space")),
        "{}",
        all[gap]
    );
    let after: Vec<_> = all[gap + 1..]
        .iter()
        .filter(|l| l["kind"] != "privileged_process")
        .collect();
    assert_eq!(after[0]["kind"], "exec", "{after:?}");
    assert_eq!(after[1]["kind"], "egress_denied", "{after:?}");
    assert!(
        env.log().contains("the audit trail is writable again"),
        "{}",
        env.log()
    );
    // The chain is intact across the gap.
    env.verify_audit();
}

#[test]
fn a_metrics_port_in_use_is_a_clear_error_before_anything_is_guarded() {
    privileged!();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let env = DaemonEnv::new();
    let config = env.daemon_section().replace(
        "metrics_listen = \"127.0.0.1:0\"",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    );
    fs::write(
        &env.config,
        format!("{config}[[agents]]\nname = \"a\"\negress = []\n"),
    )
    .expect("config");
    let out = Command::new("timeout")
        .arg("20")
        .arg(agentwatch_bin())
        .args(["run", "--config"])
        .arg(&env.config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("binding metrics_listen 127.0.0.1:{port}"))
            && stderr.contains("Address already in use"),
        "{stderr}"
    );
    assert!(!env.agent_cgroup("a").exists(), "nothing was guarded");
    assert!(!env.pin_dir.exists(), "nothing was pinned");
}

#[test]
fn an_agent_whose_cgroup_is_removed_from_under_the_daemon_is_guarded_again() {
    privileged!();
    let (_l, allowed) = tcp_listener("127.0.0.1:0");
    let (_u, unlisted) = tcp_listener("127.0.0.1:0");
    // The adopted cgroup stands for a service's: systemd removes it when the service stops and
    // makes a new one when it starts.
    let svc = agentwatch_tests::TestCgroup::new();
    let mount = agentwatch::cgroup::cgroup2_mount().expect("mount");
    let rel = svc.path().strip_prefix(&mount).expect("below the mount");
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"made\"\negress = [\"tcp 127.0.0.1 {allowed}\"]\n\
         [[agents]]\nname = \"svc\"\ncgroup = \"{}\"\negress = [\"tcp 127.0.0.1 {allowed}\"]\n",
        rel.display()
    ));
    env.start();
    let verdict = |cgroup: &Path, port: u16| {
        let a = one(agentwatch_tests::probe(
            Some(cgroup),
            &["connect", "tcp", "127.0.0.1", &port.to_string()],
        ));
        (a.ok, a.errno)
    };
    let guarded_again = |name: &str, n: usize| {
        env.wait_audit("agent_guarded", n)
            .into_iter()
            .filter(|l| l["agent"] == name && l["again"] == true)
            .count()
    };

    // A cgroup agentwatch made is made again and guarded at once.
    fs::remove_dir(env.agent_cgroup("made")).expect("rmdir made");
    let removed = env.wait_audit("agent_cgroup_removed", 1);
    assert_eq!(removed[0]["agent"], "made", "{removed:?}");
    wait_until("made to be guarded again", Duration::from_secs(10), || {
        guarded_again("made", 3) == 1
    });
    assert_eq!(verdict(&env.agent_cgroup("made"), allowed), (true, 0));
    assert_eq!(verdict(&env.agent_cgroup("made"), unlisted), (false, EPERM));

    // An adopted one is guarded again as soon as it exists again.
    fs::remove_dir(svc.path()).expect("rmdir svc");
    let removed = env.wait_audit("agent_cgroup_removed", 2);
    assert_eq!(removed[1]["agent"], "svc", "{removed:?}");
    assert!(!env.status().contains_key("svc"), "not guarded while gone");
    fs::create_dir(svc.path()).expect("mkdir svc");
    wait_until("svc to be guarded again", Duration::from_secs(10), || {
        guarded_again("svc", 4) == 1
    });
    assert_eq!(verdict(svc.path(), allowed), (true, 0));
    assert_eq!(verdict(svc.path(), unlisted), (false, EPERM));
    assert_eq!(env.status()["svc"]["state"], "running");

    // A restart: removed and made again within one sweep, so the path never goes missing when
    // the daemon looks. The new cgroup is another cgroup (another id, none of the old links):
    // it is guarded again all the same.
    let old_id = agentwatch::cgroup::Cgroup::open(svc.path())
        .and_then(|c| c.id())
        .expect("id");
    fs::remove_dir(svc.path()).expect("rmdir svc");
    fs::create_dir(svc.path()).expect("mkdir svc");
    let new_id = agentwatch::cgroup::Cgroup::open(svc.path())
        .and_then(|c| c.id())
        .expect("id");
    assert_ne!(old_id, new_id);
    let removed = env.wait_audit("agent_cgroup_removed", 3);
    assert_eq!(removed.len(), 3, "the restart is seen: {removed:?}");
    assert_eq!(removed[2]["agent"], "svc", "{removed:?}");
    wait_until(
        "svc to be guarded after its restart",
        Duration::from_secs(10),
        || guarded_again("svc", 5) == 2,
    );
    assert_eq!(verdict(svc.path(), allowed), (true, 0));
    assert_eq!(verdict(svc.path(), unlisted), (false, EPERM));
    assert_eq!(env.status()["svc"]["state"], "running");
}

/// The daemon's resident memory (KiB) and open descriptors.
fn footprint(pid: u32) -> (u64, usize) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    (rss, fds)
}

/// The daemon's footprint with what its allocator holds free left out: the smallest RSS seen
/// over one whole period of its allocator trim (every 10 sweeps, so 10 s; sampled over 12 s),
/// and the descriptors at the end. A single sample lands anywhere in that cycle: in the 6.1
/// guest two samples 100 launches apart differed by 3.4 MiB of freed but untrimmed memory
/// (22.4 -> 25.8 MiB), while the next run's were 16 KiB apart. A leak raises the minimum.
fn settled_footprint(pid: u32) -> (u64, usize) {
    let end = std::time::Instant::now() + Duration::from_secs(12);
    let mut least = u64::MAX;
    loop {
        let (rss, fds) = footprint(pid);
        least = least.min(rss);
        if std::time::Instant::now() >= end {
            return (least, fds);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Launches `launches` processes into one agent and reloads its config `reloads` times (after
/// a warm-up of a fifth of each), and asserts the daemon's descriptors are exactly as many
/// after as before and its settled RSS grew by at most 2 MiB. Prints both footprints and the
/// time.
fn assert_flat_over(launches: usize, reloads: u16) {
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    let config = |n: u16| {
        format!(
            "[[agents]]\nname = \"a\"\negress = [\"tcp 127.0.0.1 {port}\", \"udp 127.0.0.1 {n}\"]\n"
        )
    };
    env.write_config(&config(1));
    env.start();
    let pid = env.pid().expect("daemon pid");
    let work = |launches: usize, reloads: u16| {
        for i in 0..launches {
            let out = Command::new(agentwatch_bin())
                .arg("--socket")
                .arg(&env.socket)
                .args(["launch", "--agent", "a", "--", "/bin/true"])
                .output()
                .expect("launch");
            assert!(
                out.status.success(),
                "launch {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for i in 0..reloads {
            env.write_config(&config(2 + i % 2));
            assert!(env.cli(&["reload"]).status.success(), "reload {i}");
        }
    };
    // Warm up: allocator pools, the runtime's threads (each new blocking thread may bring a
    // malloc arena of its own), first-use tables.
    work(launches / 5, reloads / 5);
    let before = settled_footprint(pid);
    let t0 = std::time::Instant::now();
    work(launches, reloads);
    let took = t0.elapsed();
    let after = settled_footprint(pid);
    println!(
        "daemon footprint (RSS KiB, fds): {before:?} -> {after:?} over {launches} launches and \
         {reloads} reloads in {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(
        after.1, before.1,
        "descriptors leaked: {before:?} -> {after:?}"
    );
    assert!(
        after.0 <= before.0 + 2048,
        "resident memory grew by more than 2 MiB: {before:?} -> {after:?}"
    );
}

#[test]
fn memory_and_descriptors_stay_flat_across_launches_and_reloads() {
    privileged!();
    // A leak of one descriptor per launch or reload shows at any count; a guest under TCG
    // takes 0.3-0.6 s per launch (14 min for the host's count in the 6.1 guest), so it makes
    // the host's count divided by the time scale. The long run is `cargo xtask soak`.
    let scale = agentwatch_tests::time_scale();
    assert_flat_over(1000 / scale as usize, 200 / scale as u16);
}

/// The full figure (about 10 minutes): `cargo xtask soak --launches 10000 --reloads
/// 1000` runs it in a release build (AGENTWATCH_FLAT_LAUNCHES / AGENTWATCH_FLAT_RELOADS).
#[test]
#[ignore = "long: run with `cargo xtask soak --launches 10000 --reloads 1000`"]
fn memory_and_descriptors_stay_flat_across_10000_launches_and_1000_reloads() {
    privileged!();
    let var = |name: &str, default: u16| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let launches = var("AGENTWATCH_FLAT_LAUNCHES", 10_000);
    let reloads = var("AGENTWATCH_FLAT_RELOADS", 1_000);
    assert_flat_over(usize::from(launches), reloads);
}

/// Loads `r0 = 1; exit` as a cgroup connect4 program (it allows everything) and attaches it to
/// `cgroup` the old way, exclusively (no BPF_F_ALLOW_MULTI), as some other tool might have.
/// Returns the program's fd (attached as long as the cgroup lives or it is detached).
fn attach_foreign_exclusive(cgroup: &Path) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    let prog = agentwatch_tests::bench::load_trivial(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        1,
    );
    let dir = fs::File::open(cgroup).expect("cgroup dir");
    #[repr(C)]
    struct Attach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }
    let attach = Attach {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        // No BPF_F_ALLOW_MULTI: exclusive.
        attach_flags: 0,
    };
    agentwatch_tests::bench::bpf_op(
        BPF_PROG_ATTACH,
        (&raw const attach).cast(),
        std::mem::size_of::<Attach>(),
    )
    .expect("attaching the foreign program");
    prog
}

#[test]
fn a_cgroup_with_foreign_exclusive_programs_is_refused_with_a_clear_error() {
    privileged!();
    let svc = agentwatch_tests::TestCgroup::new();
    let _foreign = attach_foreign_exclusive(svc.path());
    let mount = agentwatch::cgroup::cgroup2_mount().expect("mount");
    let rel = svc.path().strip_prefix(&mount).expect("below the mount");
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"ok\"\negress = []\n");
    env.start();
    env.write_config(&format!(
        "[[agents]]\nname = \"ok\"\negress = []\n[[agents]]\nname = \"svc\"\ncgroup = \"{}\"\negress = []\n",
        rel.display()
    ));
    let out = env.cli(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    println!("reload refused: {stderr}");
    assert!(
        stderr.contains("svc") && stderr.contains(&svc.path().display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains("Operation not permitted")
            && stderr.contains("another program is attached to this cgroup"),
        "{stderr}"
    );
    let rejected = env.wait_audit("policy_rejected", 1);
    assert!(
        rejected[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("another program"))
    );
    // The agent in force is untouched; the daemon serves on.
    assert_eq!(env.status().len(), 1);
    assert_eq!(env.status()["ok"]["state"], "running");
}

#[test]
fn pins_that_vanish_under_a_running_daemon_are_reported_and_pinned_again_when_bpffs_returns() {
    privileged!();
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    // A bpffs of the test's own: unmounting /sys/fs/bpf would take everyone's pins.
    let fs_dir = env.dir.0.join("bpffs");
    fs::create_dir_all(&fs_dir).expect("mkdir");
    assert!(
        Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&fs_dir)
            .status()
            .expect("mount")
            .success()
    );
    let _mounted = SmallFs(fs_dir.clone());
    env.pin_dir = fs_dir.join("agentwatch");
    env.write_config("[[agents]]\nname = \"a\"\negress = []\n");
    env.start();
    denied_connect(&env, port);
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&fs_dir)
            .status()
            .expect("umount")
            .success()
    );
    let lost = env.wait_audit("pins_lost", 1);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(
        env.log().contains("the pinned programs and maps are gone"),
        "{}",
        env.log()
    );
    // The daemon still holds its links: enforcement goes on while it runs.
    denied_connect(&env, port);
    assert_eq!(env.status()["a"]["denied"], 2);

    // bpffs comes back (a new, empty instance): the daemon pins everything it holds again.
    assert!(
        Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&fs_dir)
            .status()
            .expect("mount")
            .success()
    );
    let restored = env.wait_audit("pins_restored", 1);
    assert_eq!(restored.len(), 1, "{restored:?}");
    // Every map of the object; the host-wide links (2 exec/fork, 3 socket guards, the clone
    // raw tracepoint, and with BPF LSM its exec, packet-socket, clone and five tamper-guard
    // programs) and the agent's 6 (4 egress, sock_create, bytes; no hostname rules, so no DNS
    // hooks).
    assert_eq!(restored[0]["maps"], 40, "{restored:?}");
    let lsm_links = if agentwatch_tests::bpf_lsm() { 8 } else { 0 };
    assert_eq!(restored[0]["links"], 12 + lsm_links, "{restored:?}");
    assert_eq!(
        env.audit_lines()
            .iter()
            .filter(|l| l["kind"] == "pins_lost")
            .count(),
        1
    );
    assert!(env.pin_dir.join("maps").join("AGENTS").exists());
    assert!(env.pin_dir.join("links").join("_host").is_dir());
    let agent_links: Vec<_> = fs::read_dir(env.pin_dir.join("links"))
        .expect("links")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("a@"))
        .map(|e| fs::read_dir(e.path()).expect("agent links").count())
        .collect();
    assert_eq!(agent_links, [6]);

    // The pins hold enforcement again: with the daemon SIGKILLed, a process put in the
    // agent's cgroup is still refused, and a new daemon adopts the pins (counters kept).
    let cgroup = env.agent_cgroup("a");
    env.stop_with(libc::SIGKILL);
    let r = one(agentwatch_tests::probe(
        Some(&cgroup),
        &["connect", "tcp", "127.0.0.1", &port.to_string()],
    ));
    assert_eq!((r.ok, r.errno), (false, EPERM), "no daemon: {r:?}");
    env.start();
    assert_eq!(env.status()["a"]["denied"], 3);
    denied_connect(&env, port);
    assert_eq!(env.status()["a"]["denied"], 4);
    assert_eq!(
        env.audit_lines()
            .iter()
            .filter(|l| l["kind"] == "pins_restored")
            .count(),
        1
    );
}
