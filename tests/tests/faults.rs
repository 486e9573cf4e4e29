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
    DaemonEnv, EPERM, agentwatch_bin, one, parse_attempts, privileged, tcp_listener,
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
    // Let the last launch's lines reach the writer, then count from here.
    std::thread::sleep(Duration::from_millis(500));
    let (lost_before, lines_before) = (lost(), env.audit_lines().len());
    for _ in 0..10 {
        denied_connect(&env, port);
    }
    launched += 10;
    // Enforcement went on; each launch's two lines (`exec`, `egress_denied`) are counted as
    // lost, none silently gone.
    let t = std::time::Instant::now();
    while lost() != lost_before + 20 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lost(), lost_before + 20, "{}", env.log());
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
    assert_eq!(all[gap + 1]["kind"], "exec");
    assert_eq!(all[gap + 2]["kind"], "egress_denied");
    assert!(
        env.log().contains("the audit trail is writable again"),
        "{}",
        env.log()
    );
    // The chain is intact across the gap.
    let out = Command::new(agentwatch_bin())
        .args(["audit", "verify"])
        .arg(&env.audit)
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
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
