//! Benchmarks: measurements, not tests. Run by `cargo xtask bench` (ignored in the test suite:
//! they take minutes and their numbers are reported as ratios within one run, not asserted).
//!
//! - the breaker's time from the start of a burst to the agent being frozen, over 20 trials;
//! - the cost of the egress hooks per UDP send: a bare cgroup against an agent with 1 rule and
//!   with 100,000 rules, interleaved, in one run;
//! - the latency a hostname rule adds to a lookup (through the daemon's DNS forwarder against
//!   the upstream asked directly), and the cost of a connect with 10,000 learned addresses
//!   against 1;
//! - the per-run cost of the sendmsg4 hook and of the byte counter, as the kernel measures it.

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
use agentwatch_tests::{
    DaemonEnv, TestCgroup,
    dns::{Rdata, TestDnsServer, parse_lookups, rec, start_daemon},
    monotonic_ns, privileged, probe_bin,
};

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

/// Median and 99th percentile of `v` (sorted in place).
fn median_p99(v: &mut [u64]) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[(v.len() * 99).div_ceil(100) - 1])
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn dns_lookup_latency_through_the_forwarder() {
    privileged!();
    let server = TestDnsServer::start([rec(
        "api.agentwatch.test",
        Rdata::A(std::net::Ipv4Addr::new(127, 0, 20, 1)),
        3600,
    )]);
    let env = start_daemon(
        &server,
        "[[agents]]\nname = \"bench\"\negress = [\"tcp api.agentwatch.test 443\"]\n",
    );
    let outside = TestCgroup::new();
    let upstream_port = server.addr().port().to_string();
    // Each run: 1,000 lookups, one process, a new UDP socket per lookup (as a stub resolver).
    let through = |n: &str| {
        let out = env
            .probe_command("bench")
            .args([
                "resolve",
                "10.53.0.1",
                "53",
                "api.agentwatch.test",
                "A",
                "udp",
                n,
            ])
            .output()
            .expect("probe");
        parse_lookups(&out.stdout)
    };
    let direct = |n: &str| {
        let out = Command::new(probe_bin())
            .arg("--cgroup")
            .arg(outside.path())
            .args([
                "resolve",
                "127.0.0.1",
                &upstream_port,
                "api.agentwatch.test",
                "A",
                "udp",
                n,
            ])
            .output()
            .expect("probe");
        parse_lookups(&out.stdout)
    };
    // Warm-up (page cache, the daemon's first allocations), not counted.
    through("100");
    direct("100");
    let (mut f, mut d) = (Vec::new(), Vec::new());
    for (runs, out) in [(through("1000"), &mut f), (direct("1000"), &mut d)] {
        assert_eq!(runs.len(), 1000);
        for l in runs {
            assert_eq!(
                (l.errno, l.rcode.as_deref(), l.addrs.len()),
                (0, Some("NoError"), 1),
                "{l:?}"
            );
            out.push(l.us);
        }
    }
    let ((fm, f99), (dm, d99)) = (median_p99(&mut f), median_p99(&mut d));
    println!(
        "DNS lookup over UDP, 1,000 each: through the forwarder (agent asks 10.53.0.1:53, \
         hostname rule) median {fm} us, p99 {f99} us; the upstream asked directly from outside \
         every agent median {dm} us, p99 {d99} us; added: median +{} us, p99 +{} us",
        fm.saturating_sub(dm),
        f99.saturating_sub(d99)
    );
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn connect_cost_with_10000_learned_addresses() {
    privileged!();
    // A port nothing listens on: a connect the hooks let through is refused at once.
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // 100 names x 100 addresses, all in 127.64.0.0/10 (local: a connect is refused, not lost).
    let mut zone: Vec<_> = (0..100u8)
        .flat_map(|i| {
            (1..=100u8).map(move |j| {
                rec(
                    &format!("n{i}.many.agentwatch.test"),
                    Rdata::A(std::net::Ipv4Addr::new(127, 64, i, j)),
                    3600,
                )
            })
        })
        .collect();
    zone.push(rec(
        "one.agentwatch.test",
        Rdata::A(std::net::Ipv4Addr::new(127, 65, 0, 1)),
        3600,
    ));
    let server = TestDnsServer::start(zone);
    let env = start_daemon(
        &server,
        &format!(
            "[[agents]]\nname = \"many\"\negress = [\"tcp *.many.agentwatch.test {closed}\"]\n\n\
             [[agents]]\nname = \"one\"\negress = [\"tcp one.agentwatch.test {closed}\"]\n"
        ),
    );
    let learn = |agent: &str, name: &str, n: usize| {
        // Over TCP: 100 A records do not fit a 512-byte UDP answer.
        let out = env
            .probe_command(agent)
            .args(["resolve", "10.53.0.1", "53", name, "A", "tcp"])
            .output()
            .expect("probe");
        let l = parse_lookups(&out.stdout);
        assert_eq!(l.len(), 1, "{name}: {l:?}");
        assert_eq!(l[0].addrs.len(), n, "{name}: {:?}", l[0]);
    };
    let t = Instant::now();
    for i in 0..100 {
        learn("many", &format!("n{i}.many.agentwatch.test"), 100);
    }
    let learn_ms = t.elapsed().as_millis();
    learn("one", "one.agentwatch.test", 1);
    let status = env.status();
    assert_eq!(
        status["many"]["dns"]["learned"], 10_000,
        "{}",
        status["many"]
    );
    assert_eq!(status["one"]["dns"]["learned"], 1, "{}", status["one"]);
    let measure = |agent: &str, ip: &str| -> f64 {
        let o = Command::new(probe_bin())
            .arg("--cgroup")
            .arg(env.agent_cgroup(agent))
            .args(["time-connect", ip, &closed.to_string(), "20000"])
            .output()
            .expect("probe");
        assert!(o.status.success(), "{agent}: {o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["ns_per_call"].as_f64().expect("ns")
    };
    let (mut m, mut o) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        m.push(measure("many", "127.64.50.51"));
        o.push(measure("one", "127.65.0.1"));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, o) = (median(&mut m), median(&mut o));
    println!(
        "TCP connect to an allowed closed port (socket + connect + close, median of 5 \
         interleaved runs of 20,000): agent with 1 learned address {o:.0} ns; with 10,000 learned \
         addresses {m:.0} ns (x{:.2}); learning 10,000 addresses (100 lookups of 100 A records \
         each, over TCP, one process each) took {learn_ms} ms",
        m / o
    );
}

/// What each egress program costs per run, as the kernel measures it (`bpf_stats_enabled`:
/// run time and count per program, read from the program's fdinfo), for 200,000 UDP sends of an
/// agent: the sendmsg4 allow-list hook and the byte counter (cgroup_skb, once per packet).
#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn per_packet_cost_of_the_egress_programs() {
    privileged!();
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    /// Puts the host's setting back, however the bench ends.
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = fs::write(STATS, &self.0);
        }
    }
    let _restore = Restore(fs::read_to_string(STATS).expect("bpf_stats_enabled"));
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = rx.local_addr().expect("addr").port();
    let cg = TestCgroup::new();
    let mut agents = Agents::load().expect("load");
    let rules = compile(&[format!("udp 127.0.0.1 {port}")
        .parse::<Rule>()
        .expect("rule")])
    .expect("compile");
    agents
        .guard("cost", cg.cgroup().clone(), rules)
        .expect("guard");
    let ours = agents.kernel().program_ids();
    // (run time ns, runs) of our program `name`, from its fdinfo.
    let stats = |name: &str| -> (u64, u64) {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| ours.contains(&p.id()) && p.name_as_str() == Some(name))
            .unwrap_or_else(|| panic!("program {name} not loaded"));
        let fd = info.fd().expect("program fd");
        let raw = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&fd));
        let text = fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).expect("fdinfo");
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field("run_time_ns:"), field("run_cnt:"))
    };
    fs::write(STATS, "1").expect("enabling bpf_stats");
    let before = [stats("egress_sendmsg4"), stats("bytes_egress")];
    let o = Command::new(probe_bin())
        .arg("--cgroup")
        .arg(cg.path())
        .args(["time-sendto", "127.0.0.1", &port.to_string(), "200000"])
        .output()
        .expect("probe");
    assert!(o.status.success());
    let after = [stats("egress_sendmsg4"), stats("bytes_egress")];
    let per = |i: usize| {
        let (t, n) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
        (t as f64 / n.max(1) as f64, n)
    };
    let ((hook_ns, hook_runs), (bytes_ns, bytes_runs)) = (per(0), per(1));
    println!(
        "per-run cost measured by the kernel (bpf_stats) over 200,000 UDP sends: the sendmsg4 \
         allow-list hook {hook_ns:.0} ns per call ({hook_runs} runs); the byte counter \
         {bytes_ns:.0} ns per packet ({bytes_runs} runs)"
    );
}
