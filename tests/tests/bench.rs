//! Benchmarks: measurements, not tests. Run by `cargo xtask bench` (ignored in the test suite:
//! they take minutes and their numbers are reported as ratios within one run, not asserted).
//!
//! - the breaker's time from the start of a burst to the agent being frozen, over 20 trials;
//! - the cost of the egress hooks per UDP send: a bare cgroup against an agent with 1 rule and
//!   with 100,000 rules, interleaved, in one run.

use std::{
    fs,
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentwatch::{
    agent::Agents,
    cgroup::Cgroup,
    egress::{Rule, compile},
};
use agentwatch_tests::{DaemonEnv, TestCgroup, monotonic_ns, privileged, probe_bin};

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
        let mut child = env
            .probe_command(&format!("trial-{i}"))
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

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn egress_cost_per_udp_send() {
    privileged!();
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = rx.local_addr().expect("addr").port();
    let bare = TestCgroup::new();
    let one = TestCgroup::new();
    let many = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    let rules = |n: u32| {
        let mut list: Vec<Rule> = (0..n)
            .map(|i| {
                format!("udp {} 53", std::net::Ipv4Addr::from(0x0a00_0000 | (i * 7)))
                    .parse()
                    .expect("rule")
            })
            .collect();
        list.push(format!("udp 127.0.0.1 {port}").parse().expect("rule"));
        compile(&list).expect("compile")
    };
    agents
        .guard("one", one.cgroup().clone(), rules(0))
        .expect("guard");
    let t = Instant::now();
    agents
        .guard("many", many.cgroup().clone(), rules(100_000))
        .expect("guard");
    let load_ms = t.elapsed().as_millis();
    let measure = |cg: &TestCgroup| -> f64 {
        let o = Command::new(probe_bin())
            .arg("--cgroup")
            .arg(cg.path())
            .args(["time-sendto", "127.0.0.1", &port.to_string(), "200000"])
            .output()
            .expect("probe");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["ns_per_call"].as_f64().expect("ns")
    };
    let (mut b, mut o, mut m) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        b.push(measure(&bare));
        o.push(measure(&one));
        m.push(measure(&many));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, o, m) = (median(&mut b), median(&mut o), median(&mut m));
    println!(
        "egress cost per UDP sendto (median of 5 interleaved runs of 200,000 sends): bare cgroup \
         {b:.0} ns; agent with 1 rule {o:.0} ns (x{:.2}); agent with 100,000 rules {m:.0} ns (x{:.2}); \
         writing 100,000 rules took {load_ms} ms",
        o / b,
        m / b
    );
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn host_cost_of_the_socket_and_escape_tracepoints() {
    privileged!();
    // The escape guards' tracepoints are host-wide: every process pays them, agent or not
    // (sys_enter_socket runs on every socket(), and while it is attached the kernel takes its
    // slow path for every syscall of every task). Measured from a process outside every agent,
    // with agentwatch loaded (one agent guarded) and not, interleaved.
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = rx.local_addr().expect("addr").port().to_string();
    let outside = TestCgroup::new();
    let agent = TestCgroup::new();
    let measure = |args: &[&str]| -> f64 {
        let o = Command::new(probe_bin())
            .arg("--cgroup")
            .arg(outside.path())
            .args(args)
            .output()
            .expect("probe");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["ns_per_call"].as_f64().expect("ns")
    };
    let socket = ["time-socket", "200000"];
    let sendto = ["time-sendto", "127.0.0.1", &port, "200000"];
    let getppid = ["time-getppid", "2000000"];
    let (mut s0, mut s1, mut u0, mut u1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut g0, mut g1) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        s0.push(measure(&socket));
        u0.push(measure(&sendto));
        g0.push(measure(&getppid));
        let mut agents = Agents::load().expect("load");
        agents
            .guard(
                "one",
                agent.cgroup().clone(),
                compile(&["udp 127.0.0.1 9".parse::<Rule>().expect("rule")]).expect("compile"),
            )
            .expect("guard");
        s1.push(measure(&socket));
        u1.push(measure(&sendto));
        g1.push(measure(&getppid));
        drop(agents);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s0, s1, u0, u1) = (
        median(&mut s0),
        median(&mut s1),
        median(&mut u0),
        median(&mut u1),
    );
    let (g0, g1) = (median(&mut g0), median(&mut g1));
    println!(
        "host-wide tracepoints, process outside every agent (median of 7 interleaved runs): \
         socket()+close() {s0:.0} ns bare, {s1:.0} ns with agentwatch (+{:.0} ns, x{:.2}); \
         UDP sendto {u0:.0} ns bare, {u1:.0} ns with agentwatch (+{:.0} ns, x{:.2}); \
         getppid() {g0:.0} ns bare, {g1:.0} ns with agentwatch (+{:.0} ns, x{:.2})",
        s1 - s0,
        s1 / s0,
        u1 - u0,
        u1 / u0,
        g1 - g0,
        g1 / g0
    );
}
