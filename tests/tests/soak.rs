//! The soak: one real daemon guarding four agents under mixed load for a set time, sampled
//! every second. `cargo xtask soak --minutes N` runs it (release build) and turns the samples
//! into a plot and a verdict; this test only drives the load and writes what it saw.
//!
//! Load, all on loopback: `steady` connects and sends to an allowed and a denied port through
//! a fresh `agentwatch launch` each time, and is frozen and thawed every 10 s; `resolver` looks
//! up allowed names (each a different address, so learned addresses come and go with their
//! TTL) and a refused one, then connects to what it was given and to an address it was not;
//! `bursty` ramps up until its breaker freezes it, then is approved; `victim` runs a process
//! that is killed with the kill switch, then approved. Every 5 s the config alternates between
//! two policies that agree on every verdict the load checks, so any unexpected verdict is a
//! wrong one.
//!
//! Output (AGENTWATCH_SOAK_OUT, default the temp dir): `soak.csv`, one row a second (daemon
//! RSS, CPU, fds, threads, learned DNS addresses from /metrics, entries of every pinned hash
//! map: `map_entries`/`map_NAME` for hash maps, `lru_entries`/`lru_NAME` for LRU maps, which
//! evict when full), and `load.json` with what the load did and every unexpected outcome.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agentwatch::cgroup::Cgroup;
use agentwatch_tests::{
    DaemonEnv, EPERM, accepting, count_entries,
    dns::{Rdata, TestDnsServer, parse_lookups, rec},
    parse_attempts, privileged, sleep_until, tcp_listener,
};
use aya::maps::{MapInfo, MapType};

/// Names the resolver cycles through, each resolving to its own address.
const NAMES: u8 = 64;

/// Set by SIGINT/SIGTERM: the load stops and the daemon, its cgroups and pins are cleaned up
/// by the usual Drop path (a signal's default action would skip every Drop).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// What the load did, and what went wrong, shared by the load threads.
#[derive(Default)]
struct Tally {
    launches: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    lookups: AtomicU64,
    refused: AtomicU64,
    trips: AtomicU64,
    kills: AtomicU64,
    reloads: AtomicU64,
    freezes: AtomicU64,
    wrong: AtomicU64,
    /// Unexpected outcomes other than verdicts (a breaker that did not trip, a failed
    /// command), with what happened, capped so a broken run does not fill memory.
    problems: Mutex<Vec<String>>,
}

impl Tally {
    fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn problem(&self, what: String) {
        eprintln!("soak: {what}");
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < 100 {
            p.push(what);
        }
    }

    fn wrong(&self, what: String) {
        self.add(&self.wrong, 1);
        self.problem(format!("wrong verdict: {what}"));
    }
}

/// Stops every load thread when it is dropped during a panic, so one failing thread ends the
/// run (and the scope can join) instead of the others running on to the deadline.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

struct Ports {
    good: u16,
    bad: u16,
    only_b: u16,
}

fn config(p: &Ports, policy_b: bool) -> String {
    let Ports {
        good,
        bad: _,
        only_b,
    } = p;
    // Both policies allow `good` (TCP and UDP) and the resolver's names, and deny the rest the
    // load tries; B writes them differently and adds rules, so each reload really changes
    // the kernel's rules.
    let (steady, resolver_extra) = if policy_b {
        (
            format!("\"any 127.0.0.1 {good}\", \"tcp 127.0.0.1 {only_b}\""),
            format!(", \"tcp other.soak.agentwatch.test {only_b}\""),
        )
    } else {
        (
            format!("\"tcp 127.0.0.1 {good}\", \"udp 127.0.0.1 {good}\""),
            String::new(),
        )
    };
    format!(
        "[[agents]]\nname = \"steady\"\negress = [{steady}]\n\
         [[agents]]\nname = \"resolver\"\n\
         egress = [\"tcp soak.agentwatch.test {good}\", \"tcp *.w.soak.agentwatch.test {good}\"{resolver_extra}]\n\
         [[agents]]\nname = \"bursty\"\negress = [\"tcp 127.0.0.1 {good}\"]\n\
         [agents.breaker]\nwarmup = \"2s\"\nwindow = \"500ms\"\ntrip_factor = 5.0\n\
         min_rate = 20.0\naction = \"freeze\"\nrequire_approval = true\n\
         [[agents]]\nname = \"victim\"\negress = [\"tcp 127.0.0.1 {good}\"]\n"
    )
}

/// Runs `body` every `period` until `stop`, or once more than `period` late (the load
/// may block on a frozen agent).
fn every(stop: &AtomicBool, deadline: Instant, period: Duration, mut body: impl FnMut(u64)) {
    let _guard = StopOnPanic(stop);
    let mut next = Instant::now();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        body(i);
        i += 1;
        next += period;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        // Sleep in slices, so a stop is seen within 100 ms.
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100).min(next - Instant::now()));
        }
    }
}

/// One `launch` of aw-probe in `agent`; its attempts as (ok, errno).
fn attempts(env: &DaemonEnv, t: &Tally, agent: &str, args: &[&str]) -> Vec<(bool, i32)> {
    t.add(&t.launches, 1);
    let out = env.launch_probe(agent, args);
    let a: Vec<_> = parse_attempts(&out.stdout)
        .into_iter()
        .map(|a| (a.ok, a.errno))
        .collect();
    if a.is_empty() {
        t.problem(format!(
            "{agent} {args:?}: no attempt ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    a
}

/// Checks that every attempt got the expected verdict: allowed (success, or `ECONNREFUSED`
/// from a port nobody listens on) or denied (`EPERM`).
fn expect(t: &Tally, what: &str, got: &[(bool, i32)], allowed: bool) {
    for &(ok, errno) in got {
        let was_allowed = ok || errno == libc::ECONNREFUSED;
        if was_allowed && allowed {
            t.add(&t.allowed, 1);
        } else if !ok && errno == EPERM && !allowed {
            t.add(&t.denied, 1);
        } else {
            t.wrong(format!(
                "{what}: ok {ok} errno {errno}, expected allowed={allowed}"
            ));
        }
    }
}

fn steady(env: &DaemonEnv, t: &Tally, p: &Ports) {
    let (good, bad) = (p.good.to_string(), p.bad.to_string());
    let a = attempts(
        env,
        t,
        "steady",
        &["connect", "tcp", "127.0.0.1", &good, "3"],
    );
    expect(t, "steady tcp good", &a, true);
    let a = attempts(
        env,
        t,
        "steady",
        &["connect", "tcp", "127.0.0.1", &bad, "2"],
    );
    expect(t, "steady tcp bad", &a, false);
    let a = attempts(env, t, "steady", &["sendto", "127.0.0.1", &good, "3"]);
    expect(t, "steady udp good", &a, true);
    let a = attempts(env, t, "steady", &["sendto", "127.0.0.1", &bad, "2"]);
    expect(t, "steady udp bad", &a, false);
}

fn resolver(env: &DaemonEnv, t: &Tally, p: &Ports, i: u64) {
    let n = i % u64::from(NAMES);
    let name = format!("n{n}.w.soak.agentwatch.test");
    t.add(&t.launches, 1);
    let out = env.launch_probe(
        "resolver",
        &["resolve", "10.53.0.1", "53", &name, "A", "udp"],
    );
    let lookups = parse_lookups(&out.stdout);
    t.add(&t.lookups, 1);
    let addr = match lookups.first() {
        Some(l) if l.rcode.as_deref() == Some("NoError") && l.addrs.len() == 1 => {
            l.addrs[0].clone()
        }
        other => {
            t.problem(format!("lookup of {name}: {other:?}"));
            return;
        }
    };
    let good = p.good.to_string();
    // Nobody listens on these addresses: ECONNREFUSED is the allowed verdict.
    let a = attempts(env, t, "resolver", &["connect", "tcp", &addr, &good]);
    expect(t, "resolver learned address", &a, true);
    if i.is_multiple_of(4) {
        t.add(&t.launches, 1);
        let out = env.launch_probe(
            "resolver",
            &[
                "resolve",
                "10.53.0.1",
                "53",
                "refused.example.test",
                "A",
                "udp",
            ],
        );
        match parse_lookups(&out.stdout).first() {
            Some(l) if l.rcode.as_deref() == Some("Refused") => t.add(&t.refused, 1),
            other => t.wrong(format!("refused.example.test answered {other:?}")),
        }
        // An address no lookup returned.
        let a = attempts(env, t, "resolver", &["connect", "tcp", "127.0.2.1", &good]);
        expect(t, "resolver unresolved address", &a, false);
    }
}

fn bursty(env: &DaemonEnv, t: &Tally, p: &Ports, stop: &AtomicBool) {
    let Ok(cg) = Cgroup::open(env.agent_cgroup("bursty")) else {
        t.problem("bursty: no cgroup".into());
        return;
    };
    let marks = env.scratch().join("marks-bursty");
    t.add(&t.launches, 1);
    let child = env
        .probe_command("bursty")
        .arg("pace")
        .arg(&marks)
        .args(["tcp", "127.0.0.1", &p.good.to_string(), "10:4", "300:4"])
        .stdout(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        t.problem("bursty: spawning pace".into());
        return;
    };
    let start = Instant::now();
    let mut frozen = false;
    while start.elapsed() < Duration::from_secs(15) && !stop.load(Ordering::SeqCst) {
        if cg.frozen().unwrap_or(false) {
            frozen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A frozen process still dies of SIGKILL.
    let _ = child.kill();
    let _ = child.wait();
    if frozen {
        t.add(&t.trips, 1);
        let out = env.cli(&["approve", "bursty"]);
        if !out.status.success() {
            t.problem(format!(
                "approve bursty: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    } else if !stop.load(Ordering::SeqCst) {
        t.problem("bursty: the burst did not trip the breaker within 15 s".into());
    }
}

fn victim(env: &DaemonEnv, t: &Tally, stop: &AtomicBool) {
    t.add(&t.launches, 1);
    let Ok(mut child) = env
        .probe_command("victim")
        .args(["exec", "/bin/sleep", "600"])
        .stdout(Stdio::null())
        .spawn()
    else {
        t.problem("victim: spawning".into());
        return;
    };
    let procs = env.agent_cgroup("victim").join("cgroup.procs");
    let start = Instant::now();
    while fs::read_to_string(&procs)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        if start.elapsed() > Duration::from_secs(10) || stop.load(Ordering::SeqCst) {
            t.problem("victim: never started".into());
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = env.cli(&["kill", "victim"]);
    if !out.status.success() {
        t.problem(format!(
            "kill victim: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            t.problem("victim: outlived the kill switch".into());
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    t.add(&t.kills, 1);
    let out = env.cli(&["approve", "victim"]);
    if !out.status.success() {
        t.problem(format!(
            "approve victim: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

fn reload(env: &DaemonEnv, t: &Tally, p: &Ports, i: u64) {
    env.write_config(&config(p, i % 2 == 1));
    let out = env.cli(&["reload"]);
    if out.status.success() {
        t.add(&t.reloads, 1);
    } else {
        t.problem(format!(
            "reload: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

fn freeze_thaw(env: &DaemonEnv, t: &Tally) {
    for (cmd, wait) in [("freeze", 1000), ("thaw", 0)] {
        let out = env.cli(&[cmd, "steady"]);
        if !out.status.success() {
            t.problem(format!(
                "{cmd} steady: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(wait));
    }
    t.add(&t.freezes, 1);
}

/// The daemon's figures at one instant.
struct Proc {
    rss_kib: u64,
    cpu_ticks: u64,
    threads: u64,
    fds: u64,
}

fn read_proc(pid: u32) -> Option<Proc> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses): utime and stime
    // are fields 14 and 15 of the line, 12 and 13 after ") ".
    let after = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let cpu_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Proc {
        rss_kib: field("VmRSS:")?,
        cpu_ticks,
        threads: field("Threads:")?,
        fds,
    })
}

/// Map types whose entries come and go (arrays always hold max_entries; ring buffers have no
/// keys).
fn keyed(t: MapType) -> bool {
    matches!(
        t,
        MapType::Hash
            | MapType::LruHash
            | MapType::PerCpuHash
            | MapType::LruPerCpuHash
            | MapType::LpmTrie
    )
}

/// LRU maps evict their oldest entries when full: growth there is bounded by max_entries,
/// so the report judges them apart from the maps whose growth would be a leak.
fn lru(t: MapType) -> bool {
    matches!(t, MapType::LruHash | MapType::LruPerCpuHash)
}

/// Entries of every keyed map pinned under `pin_dir/maps`, by column name: `lru_NAME` for an
/// LRU map, `map_NAME` for the others.
fn map_entries(pin_dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(pin_dir.join("maps")) else {
        return out;
    };
    for e in dir.filter_map(Result::ok) {
        let Ok(info) = MapInfo::from_pin(e.path()) else {
            continue;
        };
        let Ok(t) = info.map_type() else {
            continue;
        };
        if keyed(t)
            && let Some(n) = count_entries(&info)
        {
            let prefix = if lru(t) { "lru" } else { "map" };
            out.insert(format!("{prefix}_{}", e.file_name().to_string_lossy()), n);
        }
    }
    out
}

fn out_dir() -> PathBuf {
    std::env::var_os("AGENTWATCH_SOAK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("agentwatch-soak"))
}

#[test]
#[ignore = "long: run with `cargo xtask soak --minutes N`"]
fn soak() {
    privileged!();
    let minutes: f64 = std::env::var("AGENTWATCH_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1.0);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let out = out_dir();
    fs::create_dir_all(&out).expect("output folder");

    // Accepting: thousands of connects must not fill a backlog.
    let good = accepting();
    let udp_good = UdpSocket::bind(("127.0.0.1", good)).expect("udp good");
    let (_bad_l, bad) = tcp_listener("127.0.0.1:0");
    let _udp_bad = UdpSocket::bind(("127.0.0.1", bad)).expect("udp bad");
    let (_only_b_l, only_b) = tcp_listener("127.0.0.1:0");
    let p = Ports { good, bad, only_b };
    // Drain the allowed UDP port, as a real peer would (a full buffer drops silently anyway).
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while udp_good.recv(&mut buf).is_ok() {}
    });
    // Each name its own address, with a 2 s TTL: the learned-address map fills and empties
    // all the time, which is what must not leak.
    let dns = TestDnsServer::start((0..NAMES).map(|n| {
        rec(
            &format!("n{n}.w.soak.agentwatch.test"),
            Rdata::A(Ipv4Addr::new(127, 0, 1, n + 1)),
            2,
        )
    }));
    let mut env = DaemonEnv::new();
    env.set_daemon_extra(&format!(
        "dns_upstream = \"{}\"\ndns_min_ttl = \"1s\"\ndns_max_ttl = \"2s\"\n",
        dns.addr()
    ));
    env.write_config(&config(&p, false));
    env.start();
    let pid = env.pid().expect("daemon pid");
    eprintln!(
        "soak: {minutes} min, daemon pid {pid}, cgroups {}, pins {}, output {}",
        env.cgroup_parent.display(),
        env.pin_dir.display(),
        out.display()
    );

    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(minutes * 60.0);
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    };
    let mut csv = fs::File::create(out.join("soak.csv")).expect("soak.csv");
    let map_names: Vec<String> = map_entries(&env.pin_dir).into_keys().collect();
    let mut header =
        "t_s,rss_kib,cpu_pct,fds,threads,dns_learned,map_entries,lru_entries".to_owned();
    for m in &map_names {
        let _ = write!(header, ",{m}");
    }
    writeln!(csv, "{header}").expect("csv");

    std::thread::scope(|s| {
        let (env, t, p, stop) = (&env, &tally, &p, &stop);
        s.spawn(move || {
            every(stop, deadline, Duration::from_millis(500), |_| {
                steady(env, t, p)
            })
        });
        s.spawn(move || {
            every(stop, deadline, Duration::from_millis(500), |i| {
                resolver(env, t, p, i)
            })
        });
        s.spawn(move || {
            every(stop, deadline, Duration::from_secs(12), |_| {
                bursty(env, t, p, stop)
            })
        });
        s.spawn(move || {
            every(stop, deadline, Duration::from_secs(15), |_| {
                victim(env, t, stop)
            })
        });
        s.spawn(move || {
            every(stop, deadline, Duration::from_secs(5), |i| {
                reload(env, t, p, i)
            })
        });
        s.spawn(move || {
            every(stop, deadline, Duration::from_secs(10), |_| {
                freeze_thaw(env, t)
            })
        });

        // The sampler, on this thread: once a second, on the second.
        let _guard = StopOnPanic(stop);
        let mut prev: Option<(Instant, u64)> = None;
        let mut tick = 0u32;
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!("soak: interrupted; stopping the load and cleaning up");
                stop.store(true, Ordering::SeqCst);
            }
            if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                stop.store(true, Ordering::SeqCst);
                break;
            }
            sleep_until(started + Duration::from_secs(u64::from(tick)));
            tick += 1;
            let Some(now) = read_proc(pid) else {
                t.problem(format!("the daemon (pid {pid}) is gone:\n{}", env.log()));
                stop.store(true, Ordering::SeqCst);
                break;
            };
            let at = Instant::now();
            let cpu_pct = prev.map_or(0.0, |(t0, c0)| {
                let secs = at.duration_since(t0).as_secs_f64();
                (now.cpu_ticks.saturating_sub(c0) as f64 / ticks_per_s) / secs * 100.0
            });
            prev = Some((at, now.cpu_ticks));
            let learned: f64 = env
                .metrics()
                .lines()
                .filter(|l| l.starts_with("agentwatch_dns_learned_addresses{"))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum();
            let maps = map_entries(&env.pin_dir);
            let total = |prefix: &str| -> u64 {
                maps.iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(_, v)| v)
                    .sum()
            };
            let (total, lru_total) = (total("map_"), total("lru_"));
            let mut row = format!(
                "{:.1},{},{:.1},{},{},{},{},{}",
                at.duration_since(started).as_secs_f64(),
                now.rss_kib,
                cpu_pct,
                now.fds,
                now.threads,
                learned,
                total,
                lru_total
            );
            for m in &map_names {
                let _ = write!(row, ",{}", maps.get(m).copied().unwrap_or(0));
            }
            writeln!(csv, "{row}").expect("csv");
            if tick.is_multiple_of(60) {
                eprintln!(
                    "soak: {} s: rss {} KiB, fds {}, threads {}, map entries {total}, launches {}, wrong {}",
                    tick,
                    now.rss_kib,
                    now.fds,
                    now.threads,
                    t.launches.load(Ordering::Relaxed),
                    t.wrong.load(Ordering::Relaxed)
                );
            }
        }
    });
    csv.flush().expect("csv");

    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let t = &tally;
    let problems = t.problems.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let summary = serde_json::json!({
        "minutes": minutes,
        "seconds": started.elapsed().as_secs_f64(),
        "interrupted": INTERRUPTED.load(Ordering::SeqCst),
        "launches": n(&t.launches),
        "allowed": n(&t.allowed),
        "denied": n(&t.denied),
        "dns_lookups": n(&t.lookups),
        "dns_refused": n(&t.refused),
        "breaker_trips": n(&t.trips),
        "kills": n(&t.kills),
        "reloads": n(&t.reloads),
        "freezes": n(&t.freezes),
        "wrong_verdicts": n(&t.wrong),
        "problems": problems,
    });
    fs::write(
        out.join("load.json"),
        serde_json::to_string_pretty(&summary).expect("json"),
    )
    .expect("load.json");
    println!("soak: {summary}");
    drop(dns);
    assert!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    assert_eq!(n(&t.wrong), 0, "wrong verdicts: {summary}");
}
