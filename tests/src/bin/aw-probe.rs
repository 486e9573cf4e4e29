//! Test workload for agentwatch's privileged tests.
//!
//! `aw-probe [--cgroup DIR] COMMAND...` first moves itself into DIR (as `agentwatch launch`
//! does), then runs COMMAND and prints one JSON line per attempt on stdout:
//!
//! - `connect tcp|udp ADDR PORT [COUNT]`: connect (TCP: full handshake, 2 s timeout)
//! - `sendto ADDR PORT [COUNT] [PAYLOAD]`: one UDP datagram per attempt
//! - `exec PROGRAM [ARGS...]`: replace itself with PROGRAM
//! - `exit CODE`: exit with CODE (to check exit-status passthrough)
//! - `spin FILE`: increment a counter in FILE forever (for freeze tests)
//! - `alternate GOOD_ADDR GOOD_PORT BAD_ADDR BAD_PORT STOP_FILE`: until STOP_FILE exists (60 s
//!   at most), UDP-send and TCP-connect to GOOD (must succeed) and BAD (must get EPERM), and
//!   print one summary line `{"attempts":N,"wrong":K,"first_wrong":...}`
//! - `pace MARKS tcp|udp ADDR PORT RATE:SECS...`: connects (tcp) or sends (udp) at RATE per
//!   second for SECS, phase after phase; appends each phase's start (CLOCK_MONOTONIC ns) to
//!   MARKS; prints `{"ok":N,"eperm":M,"other":K,"elapsed":SECS}` at the end
//! - `fork-loop`: fork a child every 5 ms, forever; each child sleeps until killed
//! - `spawn-each PROGRAM...`: fork+exec each program (no arguments, stdin closed), print one
//!   line per child: `{"program":P,"exit":CODE,"signal":SIG}`
//! - `getppid N`: call getppid() N times
//! - `time-sendto ADDR PORT N`: N UDP sends in batches of 1000; prints the median batch's
//!   nanoseconds per send as `{"ns_per_call":X}`
//! - `fork-tree CHILDREN GRANDCHILDREN`: fork CHILDREN children that each fork GRANDCHILDREN
//!   grandchildren; everyone then sleeps until killed

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    process::{Command, ExitCode},
    time::Duration,
};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--cgroup") {
        if args.len() < 2 {
            return usage("--cgroup needs a directory");
        }
        let dir = args.remove(1);
        args.remove(0);
        if let Err(e) = std::fs::write(format!("{dir}/cgroup.procs"), "0") {
            eprintln!("aw-probe: joining {dir}: {e}");
            return ExitCode::from(100);
        }
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["connect", proto, addr, port, rest @ ..] => {
            let Some(dest) = dest(addr, port) else {
                return usage("bad ADDR PORT");
            };
            let count = rest.first().and_then(|c| c.parse().ok()).unwrap_or(1);
            for _ in 0..count {
                let r = match *proto {
                    "tcp" => TcpStream::connect_timeout(&dest, Duration::from_secs(2)).map(drop),
                    "udp" => udp_socket(&dest).and_then(|s| s.connect(dest)),
                    _ => return usage("proto must be tcp or udp"),
                };
                report("connect", proto, &dest, r);
            }
            ExitCode::SUCCESS
        }
        ["sendto", addr, port, rest @ ..] => {
            let Some(dest) = dest(addr, port) else {
                return usage("bad ADDR PORT");
            };
            let count = rest.first().and_then(|c| c.parse().ok()).unwrap_or(1);
            let payload = rest.get(1).copied().unwrap_or("aw-probe");
            let socket = match udp_socket(&dest) {
                Ok(s) => s,
                Err(e) => {
                    report("sendto", "udp", &dest, Err(e));
                    return ExitCode::from(101);
                }
            };
            for _ in 0..count {
                let r = socket.send_to(payload.as_bytes(), dest).map(drop);
                report("sendto", "udp", &dest, r);
            }
            ExitCode::SUCCESS
        }
        ["exec", program, rest @ ..] => {
            let err = Command::new(program).args(rest).exec();
            eprintln!("aw-probe: exec {program}: {err}");
            ExitCode::from(127)
        }
        ["alternate", good_addr, good_port, bad_addr, bad_port, stop] => {
            let (Some(good), Some(bad)) = (dest(good_addr, good_port), dest(bad_addr, bad_port))
            else {
                return usage("bad ADDR PORT");
            };
            alternate(good, bad, stop)
        }
        ["fork-tree", children, grandchildren] => {
            let (Ok(c), Ok(g)) = (children.parse::<u32>(), grandchildren.parse::<u32>()) else {
                return usage("bad counts");
            };
            fork_tree(c, g)
        }
        ["pace", marks, proto, addr, port, phases @ ..] => {
            let Some(dest) = dest(addr, port) else {
                return usage("bad ADDR PORT");
            };
            let mut parsed = Vec::new();
            for p in phases {
                let Some((r, secs)) = p.split_once(':') else {
                    return usage("phase is RATE:SECS");
                };
                let (Ok(r), Ok(secs)) = (r.parse::<f64>(), secs.parse::<f64>()) else {
                    return usage("phase is RATE:SECS");
                };
                parsed.push((r, secs));
            }
            pace(marks, proto == &"udp", dest, &parsed)
        }
        ["fork-loop"] => loop {
            // SAFETY: single-threaded process; the child only sleeps.
            if unsafe { libc::fork() } == 0 {
                sleep_forever();
            }
            std::thread::sleep(Duration::from_millis(5));
        },
        ["spawn-each", programs @ ..] => {
            for program in programs {
                let status = Command::new(program)
                    .stdin(std::process::Stdio::null())
                    .status();
                let (code, signal) = match status {
                    Ok(s) => (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)),
                    Err(_) => (None, None),
                };
                println!(
                    "{}",
                    serde_json::json!({"program": program, "exit": code, "signal": signal})
                );
            }
            ExitCode::SUCCESS
        }
        ["getppid", n] => {
            let Ok(n) = n.parse::<u64>() else {
                return usage("bad count");
            };
            for _ in 0..n {
                // SAFETY: getppid has no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
            ExitCode::SUCCESS
        }
        ["time-sendto", addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<usize>()) else {
                return usage("bad ADDR PORT N");
            };
            let Ok(socket) = udp_socket(&dest) else {
                return ExitCode::from(101);
            };
            let mut batches = Vec::new();
            for _ in 0..n.div_ceil(1000) {
                let t = std::time::Instant::now();
                for _ in 0..1000 {
                    if socket.send_to(b"t", dest).is_err() {
                        return ExitCode::from(103);
                    }
                }
                batches.push(t.elapsed().as_nanos() as f64 / 1000.0);
            }
            batches.sort_by(f64::total_cmp);
            let median = batches.get(batches.len() / 2).copied().unwrap_or(0.0);
            println!("{}", serde_json::json!({"ns_per_call": median}));
            ExitCode::SUCCESS
        }
        ["exit", code] => code
            .parse::<u8>()
            .map_or_else(|_| usage("bad exit code"), ExitCode::from),
        ["spin", file] => {
            let mut n: u64 = 0;
            loop {
                n += 1;
                if n.is_multiple_of(1000) {
                    let _ = std::fs::write(file, n.to_string());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        _ => usage("unknown command"),
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("aw-probe: {why}; see the source for usage");
    ExitCode::from(2)
}

fn dest(addr: &str, port: &str) -> Option<SocketAddr> {
    Some(SocketAddr::new(addr.parse().ok()?, port.parse().ok()?))
}

/// An unbound UDP socket of the destination's family (an AF_INET6 one for `::ffff:a.b.c.d`).
fn udp_socket(dest: &SocketAddr) -> std::io::Result<UdpSocket> {
    if dest.is_ipv6() {
        UdpSocket::bind("[::]:0")
    } else {
        UdpSocket::bind("0.0.0.0:0")
    }
}

fn report(op: &str, proto: &str, dest: &SocketAddr, r: std::io::Result<()>) {
    let errno = r
        .as_ref()
        .err()
        .map_or(0, |e| e.raw_os_error().unwrap_or(-1));
    let line = serde_json::json!({
        "op": op,
        "proto": proto,
        "dest": dest.to_string(),
        "ok": r.is_ok(),
        "errno": errno,
        "pid": std::process::id(),
        // SAFETY: getppid has no preconditions.
        "ppid": unsafe { libc::getppid() },
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

fn alternate(good: SocketAddr, bad: SocketAddr, stop: &str) -> ExitCode {
    let start = std::time::Instant::now();
    let (mut attempts, mut wrong) = (0u64, 0u64);
    let mut first_wrong = String::new();
    let Ok(udp) = udp_socket(&good) else {
        return ExitCode::from(101);
    };
    while !std::path::Path::new(stop).exists() && start.elapsed() < Duration::from_secs(60) {
        let checks = [
            ("udp good", udp.send_to(b"x", good).map(drop), true),
            ("udp bad", udp.send_to(b"x", bad).map(drop), false),
            (
                "tcp good",
                TcpStream::connect_timeout(&good, Duration::from_secs(2)).map(drop),
                true,
            ),
            (
                "tcp bad",
                TcpStream::connect_timeout(&bad, Duration::from_secs(2)).map(drop),
                false,
            ),
        ];
        for (what, r, should_pass) in checks {
            attempts += 1;
            let right = if should_pass {
                r.is_ok()
            } else {
                r.as_ref().err().and_then(std::io::Error::raw_os_error) == Some(libc::EPERM)
            };
            if !right {
                wrong += 1;
                if first_wrong.is_empty() {
                    first_wrong = format!("{what}: {r:?}");
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"attempts": attempts, "wrong": wrong, "first_wrong": first_wrong})
    );
    ExitCode::SUCCESS
}

fn fork_tree(children: u32, grandchildren: u32) -> ExitCode {
    for _ in 0..children {
        // SAFETY: single-threaded process; the child only forks and pauses.
        match unsafe { libc::fork() } {
            0 => {
                for _ in 0..grandchildren {
                    // SAFETY: as above.
                    if unsafe { libc::fork() } == 0 {
                        sleep_forever();
                    }
                }
                sleep_forever();
            }
            -1 => return ExitCode::from(102),
            _ => {}
        }
    }
    println!(
        "{}",
        serde_json::json!({"tree": 1 + children + children * grandchildren})
    );
    let _ = std::io::stdout().flush();
    sleep_forever()
}

fn sleep_forever() -> ! {
    loop {
        // SAFETY: pause has no preconditions; it returns only when a signal is handled.
        unsafe { libc::pause() };
    }
}

fn pace(marks: &str, udp: bool, dest: SocketAddr, phases: &[(f64, f64)]) -> ExitCode {
    let (mut ok, mut eperm, mut other) = (0u64, 0u64, 0u64);
    let began = std::time::Instant::now();
    let Ok(socket) = udp_socket(&dest) else {
        return ExitCode::from(101);
    };
    for &(rate, secs) in phases {
        let start = std::time::Instant::now();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(marks)
        {
            let _ = writeln!(f, "{}", agentwatch_tests::monotonic_ns());
        }
        let total = (rate * secs).round() as u64;
        for i in 0..total {
            // Absolute schedule: call i is due at i / rate seconds into the phase.
            let due = Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            let r = if udp {
                socket.send_to(b"p", dest).map(drop)
            } else {
                TcpStream::connect_timeout(&dest, Duration::from_secs(2)).map(drop)
            };
            match r {
                Ok(()) => ok += 1,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                Err(_) => other += 1,
            }
        }
        if let Some(rest) = Duration::from_secs_f64(secs).checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"ok": ok, "eperm": eperm, "other": other, "elapsed": elapsed})
    );
    ExitCode::SUCCESS
}
