//! The `agentwatch` binary end to end: `check`, `run`, `launch`, the audit trail.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentwatch::cgroup::{self, Cgroup};
use agentwatch_tests::{
    EPERM, agentwatch_bin, one, parse_attempts, privileged, probe_bin, unique_name,
};

/// A scratch folder removed on Drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name());
        fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A daemon the test started; killed (and its cgroups removed) on Drop if still there.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    cgroup_parent: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: PathBuf, cgroup_parent: PathBuf) -> Self {
        let child = Command::new(agentwatch_bin())
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting agentwatch run");
        let d = Self {
            child: Some(child),
            log,
            cgroup_parent,
        };
        d.wait_log("agentwatch running");
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no `{needle}` in the daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait; returns the exit code.
    fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: signalling a child this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.cgroup_parent.exists()
            && let Ok(cg) = Cgroup::open(&self.cgroup_parent)
        {
            let _ = cg.kill();
            let _ = cg.wait_empty(Duration::from_secs(5));
            let _ = cg.remove();
        }
    }
}

fn agentwatch(args: &[&str]) -> std::process::Output {
    Command::new(agentwatch_bin())
        .args(args)
        .output()
        .expect("running agentwatch")
}

#[test]
fn check_reports_each_error_with_line_and_column() {
    let dir = TempDir::new();
    let bad = dir.0.join("bad.toml");
    fs::write(
        &bad,
        "[daemon]\nmetrics_listen = \"127.0.0.1:9750\"\n\n[[agents]]\nname = \"a\"\negress = [\n  \"tcp 10.0.0.1 80\",\n  \"tcp 10.0.0.0/33 80\",\n  \"udp api.example.com 53\",\n]\n\n[[agents]]\nname = \"a\"\n",
    )
    .expect("write");
    let out = agentwatch(&["check", "--config", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let p = bad.display();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "{p}:8:3: egress rule `tcp 10.0.0.0/33 80`: bad destination"
        )),
        "{stdout}"
    );
    assert!(lines[1].starts_with(&format!("{p}:9:3: egress rule `udp api.example.com 53`: destination `api.example.com` is a hostname")), "{stdout}");
    assert!(
        lines[2].starts_with(&format!(
            "{p}:13:8: duplicate agent name `a` (first defined on line 5)"
        )),
        "{stdout}"
    );

    let syntax = dir.0.join("syntax.toml");
    fs::write(
        &syntax,
        "[[agents]]\nname = \"a\"\negress = [\"tcp 10.0.0.1 80\"\n",
    )
    .expect("write");
    let out = agentwatch(&["check", "--config", syntax.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{}:3:", syntax.display())));

    let good = dir.0.join("good.toml");
    fs::write(
        &good,
        "[[agents]]\nname = \"a\"\negress = [\"tcp 10.0.0.1 80\"]\n",
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
fn daemon_enforces_launch_runs_in_the_agent_and_denials_are_audited() {
    privileged!();
    let dir = TempDir::new();
    let (_l, allowed) = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        (l, p)
    };
    let (_d, denied) = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        (l, p)
    };
    let parent = unique_name();
    let audit = dir.0.join("audit.jsonl");
    let config = dir.0.join("agentwatch.toml");
    fs::write(
        &config,
        format!(
            "[daemon]\ncgroup_parent = \"{parent}\"\naudit_log = \"{}\"\n\n[[agents]]\nname = \"e2e\"\negress = [\"tcp 127.0.0.1 {allowed}\"]\n",
            audit.display()
        ),
    )
    .expect("write config");
    let config_s = config.to_str().expect("utf8");
    let mount = cgroup::cgroup2_mount().expect("mount");
    let mut daemon = Daemon::start(&config, dir.0.join("daemon.log"), mount.join(&parent));
    let agent_cg = mount.join(&parent).join("e2e");
    assert!(
        agent_cg.join("cgroup.procs").exists(),
        "the daemon created the agent's cgroup"
    );

    let probe = probe_bin();
    let probe_s = probe.to_str().expect("utf8");
    let run = |args: &[&str]| {
        let mut all = vec![
            "launch", "--config", config_s, "--agent", "e2e", "--", probe_s,
        ];
        all.extend_from_slice(args);
        agentwatch(&all)
    };
    let out = run(&["connect", "tcp", "127.0.0.1", &allowed.to_string()]);
    assert!(one(parse_attempts(&out.stdout)).ok);
    let out = run(&["connect", "tcp", "127.0.0.1", &denied.to_string()]);
    let attempt = one(parse_attempts(&out.stdout));
    assert_eq!((attempt.ok, attempt.errno), (false, EPERM));
    // launch's exit status is the command's.
    assert_eq!(run(&["exit", "7"]).status.code(), Some(7));

    let out = agentwatch(&[
        "launch", "--config", config_s, "--agent", "nobody", "--", "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown agent `nobody` (configured: e2e)")
    );

    // The denial is in the audit trail, once, with who and where.
    let start = Instant::now();
    let denied_lines = loop {
        let text = fs::read_to_string(&audit).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .filter(|v: &serde_json::Value| v["kind"] == "egress_denied")
            .collect();
        if !lines.is_empty() || start.elapsed() > Duration::from_secs(5) {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
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

    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    assert!(
        !mount.join(&parent).exists(),
        "the daemon removes the cgroups it made"
    );
    let out = agentwatch(&[
        "launch", "--config", config_s, "--agent", "e2e", "--", "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent `e2e` is not guarded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
