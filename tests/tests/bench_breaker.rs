//! Measurement, not a test: time from the start of a burst to the agent being frozen by its
//! breaker, over 20 trials. Run by `cargo xtask bench` (ignored in the test suite: it takes a
//! minute and its numbers are reported, not asserted).

use std::{
    fs,
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentwatch::cgroup::Cgroup;
use agentwatch_tests::{DaemonEnv, agentwatch_bin, privileged, probe_bin};

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn burst_to_frozen_latency() {
    privileged!();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    let mut env = DaemonEnv::new();
    let agent = |i: usize| {
        format!(
            "[[agents]]\nname = \"trial-{i}\"\negress = [\"tcp 127.0.0.1 {port}\"]\n\
             [agents.breaker]\nwarmup = \"1s\"\nwindow = \"1s\"\ntrip_factor = 5.0\nmin_rate = 20.0\n\
             action = \"freeze\"\nrequire_approval = true\n"
        )
    };
    env.write_config("");
    env.start();
    let mut latencies = Vec::new();
    for i in 0..20 {
        env.write_config(&agent(i));
        assert!(env.cli(&["reload"]).status.success());
        let cg = Cgroup::open(env.agent_cgroup(&format!("trial-{i}"))).expect("cgroup");
        let marks = env.dir.0.join(format!("marks-{i}"));
        let mut child = Command::new(agentwatch_bin())
            .arg("--socket")
            .arg(&env.socket)
            .args(["launch", "--agent", &format!("trial-{i}"), "--"])
            .arg(probe_bin())
            .arg("pace")
            .arg(&marks)
            .args(["tcp", "127.0.0.1", &port.to_string(), "10:1.5", "300:5"])
            .stdout(Stdio::null())
            .spawn()
            .expect("pace");
        let start = Instant::now();
        while !cg.frozen().unwrap_or(false) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "trial {i} never froze:\n{}",
                env.log()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        let frozen_at = monotonic_ns();
        let burst_at: u64 = fs::read_to_string(&marks)
            .expect("marks")
            .lines()
            .nth(1)
            .and_then(|l| l.parse().ok())
            .expect("burst mark");
        latencies.push(Duration::from_nanos(frozen_at.saturating_sub(burst_at)));
        let _ = child.kill();
        let _ = child.wait();
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "breaker burst-to-frozen over {} trials (10/s -> 300/s, window 1s, trip_factor 5, min_rate 20, tick 100 ms): \
         min {:.0} ms, median {:.0} ms, worst {:.0} ms; all: {:?}",
        latencies.len(),
        ms(latencies[0]),
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() - 1]),
        latencies
            .iter()
            .map(|d| ms(*d).round() as u64)
            .collect::<Vec<_>>()
    );
}
