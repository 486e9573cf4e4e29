//! Egress leases: an agent's egress ends at its deadline, in the kernel (also while no daemon
//! runs), `agentwatch extend` reopens it, `lease_action` freezes or kills the agent, and a
//! reload that changes the lease starts it again.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use agentwatch_tests::{DaemonEnv, EPERM, one, parse_attempts, privileged, probe};
use agentwatch_tests::{scaled, scaled_toml, sleep_until, tcp_listener, wait_until};

/// `agentwatch launch` a TCP connect to 127.0.0.1:`port` in `agent`: (ok, errno).
fn connect(env: &DaemonEnv, agent: &str, port: u16) -> (bool, i32) {
    let out = env.launch_probe(agent, &["connect", "tcp", "127.0.0.1", &port.to_string()]);
    let a = one(parse_attempts(&out.stdout));
    (a.ok, a.errno)
}

/// The same from a root process put straight into the agent's cgroup (no daemon needed).
fn connect_direct(cgroup: &Path, port: u16) -> (bool, i32) {
    let a = one(probe(
        Some(cgroup),
        &["connect", "tcp", "127.0.0.1", &port.to_string()],
    ));
    (a.ok, a.errno)
}

#[test]
fn a_lease_ends_egress_in_the_kernel_even_with_the_daemon_down_and_extend_reopens_it() {
    privileged!();
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    // The leases, the extension and the sleeps are stretched alike by the time scale (see
    // `scaled`; 3 s, 30 s and 2 s on the host): under TCG a launched connect, a status and a
    // scrape take longer than 3 s, and the lease must still be open when the daemon dies.
    let lease = scaled(Duration::from_secs(3)).as_secs_f64();
    env.write_config(&format!(
        "[[agents]]\nname = \"worker\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"{}\"\n",
        scaled_toml(Duration::from_secs(3))
    ));
    env.start();
    assert_eq!(connect(&env, "worker", port), (true, 0), "inside the lease");
    let row = &env.status()["worker"]["lease"];
    assert_eq!(row["action"], "deny");
    assert_eq!(row["expired"], false);
    let left = row["seconds_left"].as_f64().expect("seconds_left");
    assert!(left > 0.0 && left <= lease, "{row}");
    // The lease runs from when the daemon guarded the agent, which a loaded machine may take a
    // while to get to after start: time the expiry from the deadline the daemon reports, not
    // from before the start. (Read after the status was computed, so never early by more than
    // its rounding.)
    let ends = Instant::now() + Duration::from_secs_f64(left);
    let metric = env
        .metric("agentwatch_lease_seconds_left{agent=\"worker\"}")
        .expect("lease metric");
    assert!(metric > 0.0 && metric <= lease, "{metric}");

    // The daemon dies; the kernel ends the lease on time by itself.
    env.stop_with(libc::SIGKILL);
    let cgroup = env.agent_cgroup("worker");
    sleep_until(ends + Duration::from_millis(500));
    assert_eq!(
        connect_direct(&cgroup, port),
        (false, EPERM),
        "lease over, no daemon"
    );

    // A new daemon keeps the lease it finds (it does not start again), and audits its end.
    env.start();
    assert_eq!(connect(&env, "worker", port), (false, EPERM), "still over");
    let expired = env.wait_audit("lease_expired", 1);
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["action"], "deny");
    assert_eq!(env.status()["worker"]["lease"]["expired"], true);

    let extension = scaled(Duration::from_secs(30)).as_secs();
    let out = env.cli(&["extend", "worker", &format!("{extension}s")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("egress lease open until "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(connect(&env, "worker", port), (true, 0), "extended");
    let extended = env.wait_audit("lease_extended", 1);
    assert_eq!(extended.len(), 1, "{extended:?}");
    assert_eq!(extended[0]["actor_uid"], 0);
    assert_eq!(extended[0]["seconds"], extension);
    assert!(
        extended[0]["until"]
            .as_str()
            .is_some_and(|u| u.ends_with('Z')),
        "{extended:?}"
    );
    let left = env.status()["worker"]["lease"]["seconds_left"]
        .as_f64()
        .expect("seconds_left");
    assert!(
        left > scaled(Duration::from_secs(28)).as_secs_f64() && left <= extension as f64,
        "{left}"
    );

    // Refusals say why.
    let out = env.cli(&["extend", "nobody", "1m"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown agent `nobody`"));
    let out = env.cli(&["extend", "worker", "0s"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1s"));

    // A reload that changes the lease starts it again from now; one that removes it, ends it.
    env.write_config(&format!(
        "[[agents]]\nname = \"worker\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"{}\"\n",
        scaled_toml(Duration::from_secs(2))
    ));
    assert!(env.cli(&["reload"]).status.success());
    let reloaded = Instant::now();
    assert_eq!(connect(&env, "worker", port), (true, 0));
    sleep_until(reloaded + scaled(Duration::from_millis(2500)));
    assert_eq!(
        connect(&env, "worker", port),
        (false, EPERM),
        "the new 2s lease ended"
    );
    env.write_config(&format!(
        "[[agents]]\nname = \"worker\"\negress = [\"tcp 127.0.0.1 {port}\"]\n"
    ));
    assert!(env.cli(&["reload"]).status.success());
    assert_eq!(
        connect(&env, "worker", port),
        (true, 0),
        "no lease any more"
    );
    assert!(env.status()["worker"]["lease"].is_null());
    let out = env.cli(&["extend", "worker", "1m"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no lease"));
}

#[test]
fn lease_action_freeze_and_kill_stop_the_agent_and_extend_thaws_a_frozen_one() {
    privileged!();
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"frz\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"2s\"\n\
         lease_action = \"freeze\"\n\n\
         [[agents]]\nname = \"kll\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"2s\"\n\
         lease_action = \"kill\"\n"
    ));
    env.start();
    let spin = |agent: &str| {
        let file = env.scratch().join(format!("{agent}.count"));
        env.probe_command(agent)
            .args(["spin", file.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .spawn()
            .expect("spin")
    };
    let mut spinners = [spin("frz"), spin("kll")];
    wait_until("both leases acted on", Duration::from_secs(10), || {
        env.audit_lines()
            .iter()
            .filter(|l| l["kind"] == "lease_expired")
            .count()
            == 2
    });
    let status = env.status();
    assert_eq!(status["frz"]["state"], "frozen");
    assert_eq!(status["frz"]["processes"], 1);
    assert_eq!(status["kll"]["state"], "killed");
    assert_eq!(status["kll"]["processes"], 0);
    let actions: Vec<_> = env
        .audit_lines()
        .into_iter()
        .filter(|l| l["kind"] == "lease_expired")
        .map(|l| (l["agent"].clone(), l["action"].clone()))
        .collect();
    assert!(
        actions.contains(&("frz".into(), "freeze".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("kll".into(), "kill".into())),
        "{actions:?}"
    );

    // Extending thaws the frozen agent and reopens its egress.
    assert!(env.cli(&["extend", "frz", "1m"]).status.success());
    assert_eq!(env.status()["frz"]["state"], "running");
    assert_eq!(connect(&env, "frz", port), (true, 0));
    // A killed agent stays killed until a human approves it, extended or not.
    assert!(env.cli(&["extend", "kll", "1m"]).status.success());
    assert_eq!(env.status()["kll"]["state"], "killed");
    for s in &mut spinners {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// The `lease_expired` lines of `agent` in the trail.
fn expiries(env: &DaemonEnv, agent: &str) -> usize {
    env.audit_lines()
        .iter()
        .filter(|l| l["kind"] == "lease_expired" && l["agent"] == agent)
        .count()
}

/// Waits until `agent` has `n` `lease_expired` lines (a sweep of the running daemon ran).
fn wait_expiries(env: &DaemonEnv, agent: &str, n: usize) {
    wait_until(
        &format!("{n} lease_expired line(s) of {agent}"),
        Duration::from_secs(10),
        || expiries(env, agent) >= n,
    );
}

/// Which expiry was audited is kept in the kernel beside the deadline: a daemon restarted after
/// an expiry it audited (SIGTERM or SIGKILL) does not audit it again, one that expired while no
/// daemon ran is audited once by the next, and an extended lease's next expiry is a new one.
#[test]
fn each_lease_expiry_is_audited_exactly_once_across_restarts() {
    privileged!();
    let (_l, port) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"early\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"1s\"\n\n\
         [[agents]]\nname = \"late\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"5s\"\n"
    ));
    env.start();
    let left = env.status()["late"]["lease"]["seconds_left"]
        .as_f64()
        .expect("seconds_left");
    let late_ends = Instant::now() + Duration::from_secs_f64(left);
    wait_expiries(&env, "early", 1);
    assert_eq!(expiries(&env, "late"), 0, "late's lease still runs");

    // Down over late's deadline (SIGTERM): the next daemon audits late's expiry, once, and
    // not early's again.
    env.stop_with(libc::SIGTERM);
    sleep_until(late_ends + Duration::from_millis(500));
    assert_eq!(expiries(&env, "late"), 0, "no daemon to audit it");
    env.start();
    wait_expiries(&env, "late", 1);
    assert_eq!(
        connect(&env, "late", port),
        (false, EPERM),
        "late's lease over"
    );
    assert_eq!((expiries(&env, "early"), expiries(&env, "late")), (1, 1));

    // SIGKILL, then a restart: both expiries are on record in the kernel; nothing repeats.
    // Extending late gives it a new expiry, audited once: proof that sweeps ran meanwhile.
    env.stop_with(libc::SIGKILL);
    env.start();
    assert!(env.cli(&["extend", "late", "1s"]).status.success());
    wait_expiries(&env, "late", 2);
    assert_eq!((expiries(&env, "early"), expiries(&env, "late")), (1, 2));

    // Once more with SIGTERM, given a few sweeps to repeat anything they would.
    env.stop_with(libc::SIGTERM);
    env.start();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!((expiries(&env, "early"), expiries(&env, "late")), (1, 2));
    assert_eq!(env.status()["early"]["lease"]["expired"], true);
    assert_eq!(env.status()["late"]["lease"]["expired"], true);
    env.verify_audit();
}
