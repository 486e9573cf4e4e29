//! `agentwatch demo`, as a new user runs it: it tells the whole story with real figures, exits
//! 0, and leaves nothing behind (no cgroup, pin, socket, folder or process), also when it is
//! interrupted with Ctrl-C in the middle.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agentwatch::cgroup;
use agentwatch_tests::{agentwatch_bin, privileged, skipped_under_tcg};

/// One demo at a time: the process check below looks at the whole host.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Everything a demo with pid `pid` could leave behind.
fn leftovers(pid: u32) -> Vec<PathBuf> {
    let name = format!("agentwatch-demo-{pid}");
    let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
    [
        mount.join(&name),
        Path::new("/sys/fs/bpf").join(&name),
        std::env::temp_dir().join(&name),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect()
}

/// Processes whose command line runs the demo's scripted agent.
fn demo_agents() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"demo-agent"))
        })
        .collect()
}

#[test]
fn the_demo_tells_the_story_and_leaves_nothing_behind() {
    privileged!();
    // The demo is the product's fixed script, not a test's: its breaker (min_rate 20/s over a
    // 1 s window) must see the agent's 2 s burst of HTTP calls to the demo's own model
    // provider. Under TCG the steps before it take seconds, so the baseline learns next to
    // nothing and only min_rate is left, and the burst stayed under it: the demo failed at "the
    // breaker did not freeze the agent" on 6.12 and on 6.1. Its cleanup is still judged in the
    // guest by an_interrupted_demo_cleans_up_too.
    if skipped_under_tcg(
        "the demo's fixed burst (HTTP calls for 2 s) cannot reach its breaker's min_rate of 20 \
         calls/s under emulation",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let start = Instant::now();
    let child = Command::new(agentwatch_bin())
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agentwatch demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    for want in [
        "[1/9] The agent calls its model provider.",
        "5 calls, 5 answered with HTTP 200; the kernel counted 5 allowed connects.",
        "connect(): EPERM (Operation not permitted)",
        "\"kind\":\"egress_denied\"",
        "socket(AF_INET, SOCK_RAW): EPERM (Operation not permitted)",
        "\"kind\":\"socket_denied\"",
        "breaker tripped and froze all 4 processes",
        "\"kind\":\"breaker_tripped\"",
        "0 calls got out in 2 s",
        "thawed: it carries on",
        "4 processes killed at once (cgroup.kill); 0 left.",
        "\"kind\":\"killed\"",
        // The second agent: a phantom token, a refused scope, the api_calls breaker.
        "POST /v1/chat/completions: HTTP 200. The provider received `Authorization: Bearer sk-demo-",
        "\"kind\":\"api_call\"",
        "DELETE /v1/files/demo: HTTP 403, judged by the gateway; the provider still saw 1 request.",
        "The breaker tripped on `api_calls`",
        "1 connect(s) in all",
        "chain intact",
        "cleaned up: detached",
    ] {
        assert!(stdout.contains(want), "missing `{want}` in:\n{stdout}");
    }
    assert_eq!(leftovers(pid), Vec::<PathBuf>::new());
    assert_eq!(demo_agents(), Vec::<u32>::new());
}

#[test]
fn an_interrupted_demo_cleans_up_too() {
    privileged!();
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut child = Command::new(agentwatch_bin())
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agentwatch demo");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Interrupt it while the agent is working at its normal rate (step 4 of 9).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo reached step 4");
        if line.starts_with("[4/9]") {
            break;
        }
    }
    // The demo prints the step, then launches the agent: under TCG that spawn has taken more
    // than the half second this once slept (6.1 guest: "the agent is running" failed once in
    // 2 runs). Wait for the agent itself, loosely bounded.
    agentwatch_tests::wait_until("the agent is running", Duration::from_secs(10), || {
        !demo_agents().is_empty()
    });
    // SAFETY: signalling the demo this test started.
    unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGINT) };
    let mut status = None;
    agentwatch_tests::wait_until("the demo to stop", Duration::from_secs(20), || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    let status = status.expect("stopped");
    assert_eq!(status.code(), Some(130));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l == "interrupted: cleaning up"),
        "{rest:?}"
    );
    assert_eq!(leftovers(pid), Vec::<PathBuf>::new());
    assert_eq!(demo_agents(), Vec::<u32>::new());
}
