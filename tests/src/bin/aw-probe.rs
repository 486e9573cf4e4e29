//! Test workload for agentwatch's privileged tests.
//!
//! `aw-probe [--cgroup DIR] COMMAND...` first moves itself into DIR (as `agentwatch launch`
//! does), then runs COMMAND and prints one JSON line per attempt on stdout:
//!
//! - `connect tcp|udp ADDR PORT [COUNT]`: connect (TCP: full handshake, 2 s timeout)
//! - `sendto ADDR PORT [COUNT] [PAYLOAD]`: one UDP datagram per attempt
//! - `exec PROGRAM [ARGS...]`: replace itself with PROGRAM
//! - `exit CODE`: exit with CODE (to check exit-status passthrough)
//! - `open PATH read|write|create|path|path-read [HOLD_MS] ...`: open PATH (read-only;
//!   write-only; created and truncated; O_PATH; or O_PATH and then its /proc/self/fd link
//!   for reading), keep it open HOLD_MS (default 0), close it; then the next PATH/mode pair.
//!   One line per open: op `open`, `dest` = PATH (or the link)
//! - `symlink TARGET LINK`: create the symlink LINK -> TARGET (op `symlink`)
//! - `hardlink TARGET LINK`: create the hard link LINK to TARGET (op `hardlink`)
//! - `upload ADDR PORT SECS`: one TCP connection, written to as fast as it goes for SECS;
//!   prints `{"op":"upload","bytes":N,"errno":E,"secs":S}` (bytes accepted by the socket)
//! - `upload-paced ADDR PORT BYTES_PER_SEC:SECS...`: one TCP connection written to at each
//!   phase's rate (20 writes a second) for its time; prints `{"op":"upload-paced","bytes":N}`
//! - `spin FILE`: increment a counter in FILE forever (for freeze tests)
//! - `alternate GOOD_ADDR GOOD_PORT BAD_ADDR BAD_PORT STOP_FILE`: until STOP_FILE exists (60 s
//!   at most), UDP-send and TCP-connect to GOOD (must succeed) and BAD (must get EPERM), and
//!   print one summary line `{"attempts":N,"wrong":K,"first_wrong":...}`
//! - `pace MARKS tcp|udp ADDR PORT RATE:SECS...`: connects (tcp) or sends (udp) at RATE per
//!   second for SECS, phase after phase; appends each phase's start (CLOCK_MONOTONIC ns) to
//!   MARKS; prints `{"ok":N,"eperm":M,"other":K,"elapsed":SECS}` at the end
//! - `fork-loop`: fork a child every 5 ms, forever; each child sleeps until killed
//! - `spawn-each PROGRAM...`: fork+exec each program (no arguments, stdin closed), print one
//!   line per child: `{"program":P,"exit":CODE,"signal":SIG,"errno":E}` (errno: the exec's
//!   error, 0 when the program ran)
//! - `getppid N`: call getppid() N times
//! - `time-sendto ADDR PORT N`: N UDP sends in batches of 1000; prints the median batch's
//!   nanoseconds per send as `{"ns_per_call":X,"cpu_ns_per_call":Y}` (every `time-*` command
//!   prints both: wall time, and the CPU time of the calling thread)
//! - `time-open PATH N`: N open(PATH, O_RDONLY)+close() pairs, timed like `time-socket`
//! - `time-socket N`, `time-getppid N`: N socket()+close() pairs / getppid() calls in batches
//!   of 1000; prints the median batch's nanoseconds per call as `{"ns_per_call":X}`
//! - `fork-tree CHILDREN GRANDCHILDREN`: fork CHILDREN children that each fork GRANDCHILDREN
//!   grandchildren; everyone then sleeps until killed
//! - `socket inet|inet6|packet raw|dgram|stream|packet [PROTO]`: one socket() call (op `socket`)
//! - `escape DIR ADDR PORT N`: write its own pid into DIR/cgroup.procs (op `move`), then send N
//!   UDP datagrams to ADDR PORT (op `sendto`): how many calls an escaped process gets
//! - `move PID DIR`: write PID into DIR/cgroup.procs (op `move`)
//! - `sendmmsg ADDR PORT N`: one sendmmsg() of N UDP datagrams (op `sendmmsg`, `sent` = N sent)
//! - `sendto-spread FIRST_IPV4 ADDRS PORTS`: one datagram to each port 1..=PORTS of ADDRS addresses
//!   from FIRST_IPV4, from one socket; prints `{"sent":N,"failed":M}`
//! - `fastopen ADDR PORT`: TCP sendto() with MSG_FASTOPEN (op `fastopen`)
//! - `uring-connect ADDR PORT`: a TCP connect submitted through io_uring (IORING_OP_CONNECT),
//!   reported as op `uring-connect` (errno 38 ENOSYS: the kernel has no io_uring)
//! - `unshare-net-connect ADDR PORT`: enter a new network namespace, then UDP-connect (op
//!   `connect`; op `unshare` first)
//! - `resolve SERVER PORT NAME TYPE MODE [COUNT]`: COUNT (default 1) DNS lookups of NAME (its
//!   case kept on the wire) for TYPE (A, AAAA, MX, TXT, ...), each from a new socket of SERVER's
//!   family, 2 s timeout. MODE `udp`: unconnected sendto + recvfrom, `from` = the reply's
//!   source; `udp-connected`: connect + send + recv, `from` = getpeername (what glibc's resolver
//!   does); `tcp`: connect + one length-prefixed query + its answer, `from` = getpeername. One
//!   line per lookup: `{"op":"resolve","errno":E,"rcode":"NoError"|"Refused"|"NXDomain"|...,
//!   "addrs":[A/AAAA data of the answer section, in order],"ttls":[their TTLs],"cnames":[CNAME
//!   targets, in order],"from":"10.53.0.1:53","id_ok":true,"truncated":false,"us":MICROSECONDS}`;
//!   errno 0 when an answer came back, else the failing call's (11 EAGAIN or 110 ETIMEDOUT: no
//!   answer in 2 s; 104 ECONNRESET: a TCP server closed without answering), with rcode null
//! - `dns-raw SERVER PORT HEX [tcp]`: sends the bytes HEX as one UDP datagram (or one
//!   length-prefixed TCP message), waits 2 s for one reply; prints `{"op":"dns-raw","errno":E,
//!   "reply_len":N,"rcode":R,"id":ID}` (rcode and id null unless the reply has a DNS header)
//! - `with-resolv-conf FILE PROGRAM [ARGS...]`: in a private mount namespace of its own, bind
//!   FILE over /etc/resolv.conf and exec PROGRAM (e.g. `getent ahostsv4 NAME`); needs
//!   CAP_SYS_ADMIN (run it with `--cgroup`, not through `agentwatch launch`). On failure prints
//!   `{"op":"with-resolv-conf","step":S,"errno":E}` and exits 104
//! - `time-connect ADDR PORT N`: N TCP connects to a closed port (each must get ECONNREFUSED)
//!   in batches of 1000; prints the median batch's nanoseconds per connect as `{"ns_per_call":X}`
//! - `time-send ADDR PORT N`: N send() calls on one connected UDP socket, in batches of 1000;
//!   prints the median batch's nanoseconds per send as `{"ns_per_call":X}`
//! - `time-fork-exec PROGRAM N`: N fork + exec of PROGRAM (no arguments) + wait, in batches of
//!   50; prints the median batch's nanoseconds per run as `{"ns_per_call":X}`
//! - `flood ADDR PORT SECS`: UDP sends as fast as they go for SECS; prints
//!   `{"op":"flood","ok":[per second],"eperm":[per second],"other":N}` (second i: calls made
//!   between i and i+1 seconds after the start)

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    process::{Command, ExitCode},
    str::FromStr as _,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Header, Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
    serialize::binary::BinDecodable as _,
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
        ["open", rest @ ..] => open_files(rest),
        ["open-race", real, decoy, n] => match n.parse() {
            Ok(n) => open_race(real, decoy, n),
            Err(_) => usage("open-race REAL DECOY N: N is a count"),
        },
        ["symlink", target, link] => {
            let r = std::os::unix::fs::symlink(target, link);
            report_path("symlink", link, r.map(drop));
            ExitCode::SUCCESS
        }
        ["hardlink", target, link] => {
            report_path("hardlink", link, std::fs::hard_link(target, link));
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
        ["socket", family, kind, rest @ ..] => {
            let family = match *family {
                "inet" => libc::AF_INET,
                "inet6" => libc::AF_INET6,
                "packet" => libc::AF_PACKET,
                _ => return usage("family must be inet, inet6 or packet"),
            };
            let kind = match *kind {
                "raw" => libc::SOCK_RAW,
                "dgram" => libc::SOCK_DGRAM,
                "stream" => libc::SOCK_STREAM,
                // Obsolete, and rewritten by the kernel into a packet socket: an escape route.
                #[allow(deprecated, reason = "the attack this probe makes")]
                "packet" => libc::SOCK_PACKET,
                _ => return usage("type must be raw, dgram, stream or packet"),
            };
            let proto = rest.first().and_then(|p| p.parse().ok()).unwrap_or(0);
            // SAFETY: socket(2) with plain integer arguments.
            let fd = unsafe { libc::socket(family, kind, proto) };
            let r = if fd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                // SAFETY: closing the descriptor just opened.
                unsafe { libc::close(fd) };
                Ok(())
            };
            report("socket", "-", &unspecified(), r);
            ExitCode::SUCCESS
        }
        ["escape", dir, addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<u32>()) else {
                return usage("bad ADDR PORT N");
            };
            let r = std::fs::write(format!("{dir}/cgroup.procs"), "0");
            report("move", "-", &unspecified(), r);
            let Ok(socket) = udp_socket(&dest) else {
                return ExitCode::from(101);
            };
            for _ in 0..n {
                report(
                    "sendto",
                    "udp",
                    &dest,
                    socket.send_to(b"escaped", dest).map(drop),
                );
            }
            ExitCode::SUCCESS
        }
        ["clone-into", dir, addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<u32>()) else {
                return usage("bad ADDR PORT N");
            };
            clone_into(dir, dest, n)
        }
        ["move", pid, dir] => {
            let r = std::fs::write(format!("{dir}/cgroup.procs"), pid);
            report("move", "-", &unspecified(), r);
            ExitCode::SUCCESS
        }
        ["sendto-spread", first, addrs, ports] => {
            let (Ok(first), Ok(addrs), Ok(ports)) = (
                first.parse::<std::net::Ipv4Addr>(),
                addrs.parse::<u32>(),
                ports.parse::<u16>(),
            ) else {
                return usage("sendto-spread FIRST_IPV4 ADDRS PORTS");
            };
            sendto_spread(first, addrs, ports)
        }
        ["sendmmsg", addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<usize>()) else {
                return usage("bad ADDR PORT N");
            };
            sendmmsg(dest, n)
        }
        ["fastopen", addr, port] => {
            let Some(dest) = dest(addr, port) else {
                return usage("bad ADDR PORT");
            };
            fastopen(dest)
        }
        ["unshare-net-connect", addr, port] => {
            let Some(dest) = dest(addr, port) else {
                return usage("bad ADDR PORT");
            };
            // SAFETY: unshare(2) with a flag; affects only this process.
            let r = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            report("unshare", "-", &unspecified(), r);
            let r = udp_socket(&dest).and_then(|s| s.connect(dest));
            report("connect", "udp", &dest, r);
            ExitCode::SUCCESS
        }
        ["resolve", server, port, name, qtype, mode, rest @ ..] => {
            let Some(server) = dest(server, port) else {
                return usage("bad SERVER PORT");
            };
            let Ok(qtype) = RecordType::from_str(&qtype.to_ascii_uppercase()) else {
                return usage("bad TYPE");
            };
            let mode = match *mode {
                "udp" => DnsMode::Udp,
                "udp-connected" => DnsMode::UdpConnected,
                "tcp" => DnsMode::Tcp,
                _ => return usage("MODE must be udp, udp-connected or tcp"),
            };
            let count = rest.first().and_then(|c| c.parse().ok()).unwrap_or(1);
            resolve(server, name, qtype, mode, count)
        }
        ["dns-raw", server, port, hex, rest @ ..] => {
            let Some(server) = dest(server, port) else {
                return usage("bad SERVER PORT");
            };
            let Some(bytes) = unhex(hex) else {
                return usage("bad HEX");
            };
            let tcp = match rest {
                [] => false,
                ["tcp"] => true,
                _ => return usage("dns-raw takes `tcp` or nothing after HEX"),
            };
            dns_raw(server, &bytes, tcp)
        }
        ["with-resolv-conf", file, program, rest @ ..] => with_resolv_conf(file, program, rest),
        ["time-connect", addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<usize>()) else {
                return usage("bad ADDR PORT N");
            };
            time_calls(n, || {
                matches!(
                    TcpStream::connect(dest),
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED)
                )
            })
        }
        ["time-send", addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<usize>()) else {
                return usage("bad ADDR PORT N");
            };
            let Ok(socket) = udp_socket(&dest).and_then(|s| s.connect(dest).map(|()| s)) else {
                return ExitCode::from(101);
            };
            time_calls(n, || socket.send(b"t").is_ok())
        }
        ["time-fork-exec", program, n] => {
            let Ok(n) = n.parse::<usize>() else {
                return usage("bad N");
            };
            time_batches(n, 50, || {
                Command::new(program)
                    .stdin(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        }
        ["flood", addr, port, secs] => {
            let (Some(dest), Ok(secs)) = (dest(addr, port), secs.parse::<u64>()) else {
                return usage("flood ADDR PORT SECS");
            };
            flood(dest, secs)
        }
        ["uring-connect", addr, port] => {
            let Some(dest) = dest(addr, port) else {
                return usage("bad ADDR PORT");
            };
            report("uring-connect", "tcp", &dest, uring_connect(dest));
            ExitCode::SUCCESS
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
                // An exec refused in the kernel (BPF LSM: EPERM) comes back as spawn's error.
                let (code, signal, errno) = match status {
                    Ok(s) => (
                        s.code(),
                        std::os::unix::process::ExitStatusExt::signal(&s),
                        0,
                    ),
                    Err(e) => (None, None, e.raw_os_error().unwrap_or(-1)),
                };
                println!(
                    "{}",
                    serde_json::json!({"program": program, "exit": code, "signal": signal, "errno": errno})
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
        ["time-open", path, n] => {
            let Ok(n) = n.parse::<usize>() else {
                return usage("bad N");
            };
            let Ok(c_path) = std::ffi::CString::new(*path) else {
                return usage("bad PATH");
            };
            time_calls(n, || {
                // SAFETY: open(2) with a NUL-terminated path; close(2) of the fd it returned.
                let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                if fd >= 0 {
                    // SAFETY: as above.
                    unsafe { libc::close(fd) };
                }
                fd >= 0
            })
        }
        ["time-socket", n] => {
            let Ok(n) = n.parse::<usize>() else {
                return usage("bad N");
            };
            time_calls(n, || {
                // SAFETY: socket(2) and close(2) with plain integers.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
                if fd >= 0 {
                    // SAFETY: as above; fd was just opened.
                    unsafe { libc::close(fd) };
                }
                fd >= 0
            })
        }
        ["time-getppid", n] => {
            let Ok(n) = n.parse::<usize>() else {
                return usage("bad N");
            };
            time_calls(n, || {
                // SAFETY: getppid has no preconditions.
                unsafe { libc::getppid() > 0 }
            })
        }
        ["time-sendto", addr, port, n] => {
            let (Some(dest), Ok(n)) = (dest(addr, port), n.parse::<usize>()) else {
                return usage("bad ADDR PORT N");
            };
            let Ok(socket) = udp_socket(&dest) else {
                return ExitCode::from(101);
            };
            time_calls(n, || socket.send_to(b"t", dest).is_ok())
        }
        ["upload", addr, port, secs] => {
            let (Ok(dest), Ok(secs)) = (
                format!("{addr}:{port}").parse::<SocketAddr>(),
                secs.parse::<f64>(),
            ) else {
                return usage("upload ADDR PORT SECS");
            };
            let mut stream = match TcpStream::connect_timeout(&dest, Duration::from_secs(2)) {
                Ok(s) => s,
                Err(e) => {
                    report("upload", "tcp", &dest, Err(e));
                    return ExitCode::SUCCESS;
                }
            };
            let chunk = vec![0x5au8; 65536];
            let start = std::time::Instant::now();
            let mut sent: u64 = 0;
            let mut errno = 0;
            while start.elapsed().as_secs_f64() < secs {
                match stream.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(e) => {
                        errno = e.raw_os_error().unwrap_or(-1);
                        break;
                    }
                }
            }
            println!(
                "{}",
                serde_json::json!({"op": "upload", "bytes": sent, "errno": errno,
                    "secs": start.elapsed().as_secs_f64()})
            );
            ExitCode::SUCCESS
        }
        ["upload-paced", addr, port, phases @ ..] => {
            let Ok(dest) = format!("{addr}:{port}").parse::<SocketAddr>() else {
                return usage("upload-paced ADDR PORT BYTES_PER_SEC:SECS...");
            };
            let mut stream = match TcpStream::connect_timeout(&dest, Duration::from_secs(2)) {
                Ok(s) => s,
                Err(e) => {
                    report("upload-paced", "tcp", &dest, Err(e));
                    return ExitCode::SUCCESS;
                }
            };
            let mut sent: u64 = 0;
            for phase in phases {
                let Some((Ok(rate), Ok(secs))) = phase
                    .split_once(':')
                    .map(|(r, s)| (r.parse::<u64>(), s.parse::<f64>()))
                else {
                    return usage("upload-paced ADDR PORT BYTES_PER_SEC:SECS...");
                };
                // 20 writes a second, each a twentieth of the phase's rate.
                let chunk = vec![0x5au8; usize::try_from(rate / 20).unwrap_or(0).max(1)];
                let start = std::time::Instant::now();
                let mut tick = 0u32;
                while start.elapsed().as_secs_f64() < secs {
                    if stream.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len() as u64;
                    tick += 1;
                    let next = Duration::from_millis(50) * tick;
                    if let Some(wait) = next.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            println!(
                "{}",
                serde_json::json!({"op": "upload-paced", "bytes": sent, "errno": 0})
            );
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

/// Runs `call` `n` times in batches of 1000; prints the median batch's nanoseconds per call as
/// `{"ns_per_call":X}`. A call returning false ends the run with exit code 103.
fn time_calls(n: usize, call: impl FnMut() -> bool) -> ExitCode {
    time_batches(n, 1000, call)
}

/// [`time_calls`] with batches of `batch` calls (slow calls need smaller batches to give a
/// median of several).
fn time_batches(n: usize, batch: usize, mut call: impl FnMut() -> bool) -> ExitCode {
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..n.div_ceil(batch) {
        let (t, c) = (std::time::Instant::now(), thread_cpu_ns());
        for _ in 0..batch {
            if !call() {
                return ExitCode::from(103);
            }
        }
        wall.push(t.elapsed().as_nanos() as f64 / batch as f64);
        cpu.push((thread_cpu_ns() - c) as f64 / batch as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "{}",
        serde_json::json!({ "ns_per_call": median(&mut wall), "cpu_ns_per_call": median(&mut cpu) })
    );
    ExitCode::SUCCESS
}

/// CPU time this thread has used (CLOCK_THREAD_CPUTIME_ID), in ns: unlike wall time, it does
/// not count the time the probe waits while another process of a busy host runs.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// UDP sends to `dest` as fast as they go for `secs` seconds, counted per second by result.
fn flood(dest: SocketAddr, secs: u64) -> ExitCode {
    let Ok(socket) = udp_socket(&dest) else {
        return ExitCode::from(101);
    };
    let slots = usize::try_from(secs).unwrap_or(0);
    let (mut ok, mut eperm, mut other) = (vec![0u64; slots], vec![0u64; slots], 0u64);
    let start = Instant::now();
    loop {
        let r = socket.send_to(b"f", dest);
        let Ok(i) = usize::try_from(start.elapsed().as_secs()) else {
            break;
        };
        if i >= slots {
            break;
        }
        match r {
            Ok(_) => ok[i] += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm[i] += 1,
            Err(_) => other += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"op": "flood", "ok": ok, "eperm": eperm, "other": other})
    );
    ExitCode::SUCCESS
}

/// The "destination" of an attempt that has none (socket, move).
fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// `v4` as the C socket address the raw calls take.
fn sockaddr_in(v4: std::net::SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = v4.port().to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
    sa
}

/// One sendmmsg() of `n` datagrams to `dest`; reports how many the kernel sent.
fn sendmmsg(dest: SocketAddr, n: usize) -> ExitCode {
    use std::os::fd::AsRawFd as _;
    let Ok(socket) = udp_socket(&dest) else {
        return ExitCode::from(101);
    };
    let SocketAddr::V4(v4) = dest else {
        return usage("sendmmsg takes an IPv4 destination");
    };
    let mut sa = sockaddr_in(v4);
    let mut payload = *b"aw-probe";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|_| {
            // SAFETY: a zeroed mmsghdr is valid; name and iov point at live locals below.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&raw mut sa).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs holds n valid headers whose pointers outlive the call.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            u32::try_from(n).unwrap_or(u32::MAX),
            0,
        )
    };
    let r = if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    let errno = r
        .as_ref()
        .err()
        .and_then(std::io::Error::raw_os_error)
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({"op": "sendmmsg", "proto": "udp", "dest": dest.to_string(), "ok": r.is_ok(), "errno": errno, "sent": sent, "pid": std::process::id(), "ppid": 0})
    );
    ExitCode::SUCCESS
}

/// A TCP connect through io_uring: no connect() syscall on the way.
fn uring_connect(dest: SocketAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut ring = io_uring::IoUring::new(4)?;
    let family = if dest.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: socket(2) with plain integer arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned here.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let SocketAddr::V4(v4) = dest else {
        return Err(std::io::Error::other(
            "uring-connect takes an IPv4 destination",
        ));
    };
    let sa = sockaddr_in(v4);
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(socket.as_raw_fd()),
        (&raw const sa).cast(),
        size_of::<libc::sockaddr_in>() as u32,
    )
    .build();
    // SAFETY: sa and the socket outlive the submission, which is waited for below.
    unsafe { ring.submission().push(&op) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

/// A TCP sendto() with MSG_FASTOPEN: connect and data in one call, without connect().
fn fastopen(dest: SocketAddr) -> ExitCode {
    let family = if dest.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: socket(2) with plain integer arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return ExitCode::from(101);
    }
    let SocketAddr::V4(v4) = dest else {
        return usage("fastopen takes an IPv4 destination");
    };
    let sa = sockaddr_in(v4);
    let data = b"aw-probe";
    // SAFETY: data and sa are live locals of the sizes given.
    let ret = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    let r = if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    report("fastopen", "tcp", &dest, r);
    ExitCode::SUCCESS
}

fn usage(why: &str) -> ExitCode {
    eprintln!("aw-probe: {why}; see the source for usage");
    ExitCode::from(2)
}

fn dest(addr: &str, port: &str) -> Option<SocketAddr> {
    Some(SocketAddr::new(addr.parse().ok()?, port.parse().ok()?))
}

/// An unbound UDP socket of the destination's family (an AF_INET6 one for `::ffff:a.b.c.d`).
/// One datagram to each of `ports` ports (from 1) of `addrs` addresses from `first`: as many
/// distinct destinations as asked, from one socket. Prints one summary line (the calls are too
/// many for a line each).
fn sendto_spread(first: std::net::Ipv4Addr, addrs: u32, ports: u16) -> ExitCode {
    let socket = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aw-probe: bind: {e}");
            return ExitCode::from(101);
        }
    };
    let (mut sent, mut failed) = (0u64, 0u64);
    for a in 0..addrs {
        let addr = std::net::Ipv4Addr::from(u32::from(first) + a);
        for port in 1..=ports {
            match socket.send_to(b"x", (addr, port)) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
    }
    println!("{{\"sent\":{sent},\"failed\":{failed}}}");
    ExitCode::SUCCESS
}

/// `clone-into DIR ADDR PORT N`: clone3(CLONE_INTO_CGROUP) a child straight into cgroup DIR;
/// the child reports `child` and sends N datagrams to ADDR:PORT (as `escape` does after its
/// move). The parent reports `clone3` and then how the child ended (`child-exit`, dest
/// `exit N` or `signal N`).
fn clone_into(dir: &str, dest: SocketAddr, n: u32) -> ExitCode {
    /// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    use std::os::fd::AsRawFd as _;
    let cgroup = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) => {
            report_path("clone3", dir, Err(e));
            return ExitCode::SUCCESS;
        }
    };
    let args = CloneArgs {
        flags: agentwatch_common::CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with a valid, fully initialised clone_args of the size passed; without
    // CLONE_VM the child gets its own copy of this (single-threaded) process, like fork.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        report_path("child", dir, Ok(()));
        if let Ok(socket) = udp_socket(&dest) {
            for _ in 0..n {
                report(
                    "sendto",
                    "udp",
                    &dest,
                    socket.send_to(b"cloned", dest).map(drop),
                );
            }
        }
        // SAFETY: ends the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        report_path("clone3", dir, Err(std::io::Error::last_os_error()));
        return ExitCode::SUCCESS;
    }
    report_path("clone3", dir, Ok(()));
    let mut status = 0;
    // SAFETY: waiting for the child just made.
    unsafe { libc::waitpid(pid as i32, &raw mut status, 0) };
    let how = if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit {}", libc::WEXITSTATUS(status))
    };
    report_path("child-exit", &how, Ok(()));
    ExitCode::SUCCESS
}

fn udp_socket(dest: &SocketAddr) -> std::io::Result<UdpSocket> {
    if dest.is_ipv6() {
        UdpSocket::bind("[::]:0")
    } else {
        UdpSocket::bind("0.0.0.0:0")
    }
}

fn report(op: &str, proto: &str, dest: &SocketAddr, r: std::io::Result<()>) {
    report_line(op, Some(proto), &dest.to_string(), r);
}

/// One attempt on a path (`dest` is the path).
fn report_path(op: &str, path: &str, r: std::io::Result<()>) {
    report_line(op, None, path, r);
}

fn report_line(op: &str, proto: Option<&str>, dest: &str, r: std::io::Result<()>) {
    let errno = r
        .as_ref()
        .err()
        .map_or(0, |e| e.raw_os_error().unwrap_or(-1));
    let mut line = serde_json::json!({
        "op": op,
        "dest": dest,
        "ok": r.is_ok(),
        "errno": errno,
        "pid": std::process::id(),
        // SAFETY: getppid has no preconditions.
        "ppid": unsafe { libc::getppid() },
    });
    if let Some(proto) = proto {
        line["proto"] = proto.into();
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// `open PATH MODE [HOLD_MS]`, repeated.
fn open_files(mut args: &[&str]) -> ExitCode {
    while let [path, mode, rest @ ..] = args {
        let (hold, rest) = match rest.first().and_then(|h| h.parse::<u64>().ok()) {
            Some(ms) => (ms, &rest[1..]),
            None => (0, rest),
        };
        use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
        let mut o = std::fs::OpenOptions::new();
        match *mode {
            "read" => o.read(true),
            "write" => o.write(true),
            "create" => o.write(true).create(true).truncate(true),
            "path" | "path-read" => o.read(true).custom_flags(libc::O_PATH),
            _ => return usage("open mode must be read, write, create, path or path-read"),
        };
        match o.open(path) {
            Ok(file) => {
                report_path("open", path, Ok(()));
                // The O_PATH descriptor's file opened for reading through its /proc link.
                let reopened = (*mode == "path-read").then(|| {
                    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
                    match std::fs::File::open(&link) {
                        Ok(f) => {
                            report_path("open", &link, Ok(()));
                            Some(f)
                        }
                        Err(e) => {
                            report_path("open", &link, Err(e));
                            None
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(hold));
                drop((file, reopened));
            }
            Err(e) => report_path("open", path, Err(e)),
        }
        args = rest;
    }
    if !args.is_empty() {
        return usage("open needs PATH MODE pairs");
    }
    ExitCode::SUCCESS
}

/// `open-race REAL DECOY N`: opens the path in one buffer N times for reading while another
/// thread rewrites that buffer between REAL and DECOY (the same length) as fast as it can, so
/// the kernel opens one and a reader of the caller's memory at the syscall's exit may see the
/// other. Prints how many opens got REAL and how many DECOY (told apart by inode), were
/// refused (EACCES) or named neither (ENOENT: a string half of each), then holds
/// every fd open until stdin closes, for the daemon to name them.
fn open_race(real: &str, decoy: &str, n: u32) -> ExitCode {
    use std::{
        os::unix::fs::MetadataExt as _,
        sync::atomic::{AtomicBool, AtomicU8, Ordering},
    };
    let (real_b, decoy_b): (&'static [u8], &'static [u8]) = (
        Box::leak(real.as_bytes().into()),
        Box::leak(decoy.as_bytes().into()),
    );
    if real_b.len() != decoy_b.len() {
        return usage("open-race: REAL and DECOY must be the same length");
    }
    let inode = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let (Ok(real_id), Ok(decoy_id)) = (inode(real), inode(decoy)) else {
        return usage("open-race: REAL and DECOY must exist");
    };
    // NUL-terminated, shared with the flipping thread through atomics (no data race in Rust
    // terms; the kernel reads the bytes as they are).
    let buf: &'static [AtomicU8] = Box::leak(
        (0..=real_b.len())
            .map(|i| AtomicU8::new(real_b.get(i).copied().unwrap_or(0)))
            .collect(),
    );
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let started: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let flipper = std::thread::spawn(move || {
        started.store(true, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            for src in [decoy_b, real_b] {
                for (b, &c) in buf.iter().zip(src) {
                    b.store(c, Ordering::Relaxed);
                }
            }
        }
    });
    let (mut got_real, mut got_decoy, mut refused, mut missing) = (0u32, 0u32, 0u32, 0u32);
    let mut held = Vec::new();
    while !started.load(Ordering::Relaxed) {
        std::thread::yield_now();
    }
    for _ in 0..n {
        // Paced under the daemon's default audit rate (100 lines a second), so that every
        // line the test counts is written, none summarised.
        std::thread::sleep(Duration::from_millis(15));
        // SAFETY: a NUL-terminated buffer that outlives the call (leaked).
        let fd = unsafe { libc::open(buf.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            // A torn string (half of each) names no file: ENOENT.
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EACCES) => refused += 1,
                Some(libc::ENOENT) => missing += 1,
                _ => return ExitCode::from(3),
            }
            continue;
        }
        // SAFETY: an fd this process just opened and now owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        match file.metadata().map(|m| (m.dev(), m.ino())) {
            Ok(id) if id == real_id => got_real += 1,
            Ok(id) if id == decoy_id => got_decoy += 1,
            _ => return ExitCode::from(4),
        }
        held.push(file);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    let line = serde_json::json!({
        "op": "open-race",
        "real": got_real,
        "decoy": got_decoy,
        "refused": refused,
        "missing": missing,
        "pid": std::process::id(),
    });
    println!("{line}");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    drop(held);
    ExitCode::SUCCESS
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

/// How `resolve` talks to the server.
#[derive(Clone, Copy)]
enum DnsMode {
    /// Unconnected socket: sendto + recvfrom.
    Udp,
    /// connect + send + recv, as glibc's resolver does.
    UdpConnected,
    /// One length-prefixed query on a new connection.
    Tcp,
}

/// How long every DNS exchange may take.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// The errno to report for `e`; std's own timeouts and short reads carry none.
fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        std::io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        std::io::ErrorKind::WouldBlock => libc::EAGAIN,
        std::io::ErrorKind::UnexpectedEof => libc::ECONNRESET,
        _ => -1,
    })
}

fn resolve(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    mode: DnsMode,
    count: u32,
) -> ExitCode {
    // from_ascii keeps the name's case, so MiXeD case reaches the wire as written.
    let fq = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    let Ok(qname) = Name::from_ascii(&fq) else {
        return usage("bad NAME");
    };
    let mode_name = match mode {
        DnsMode::Udp => "udp",
        DnsMode::UdpConnected => "udp-connected",
        DnsMode::Tcp => "tcp",
    };
    for _ in 0..count {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(qname.clone(), qtype));
        let Ok(bytes) = query.to_vec() else {
            return usage("cannot encode the query");
        };
        let start = Instant::now();
        let r = match mode {
            DnsMode::Udp => udp_exchange(server, &bytes, false),
            DnsMode::UdpConnected => udp_exchange(server, &bytes, true),
            DnsMode::Tcp => tcp_exchange(server, &bytes),
        };
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut line = serde_json::json!({
            "op": "resolve",
            "server": server.to_string(),
            "name": name,
            "qtype": qtype.to_string(),
            "mode": mode_name,
            "us": us,
            "pid": std::process::id(),
        });
        match r {
            Err(e) => {
                line["errno"] = errno_of(&e).into();
                line["ok"] = false.into();
                line["rcode"] = serde_json::Value::Null;
                line["addrs"] = serde_json::json!([]);
                line["ttls"] = serde_json::json!([]);
                line["cnames"] = serde_json::json!([]);
                line["from"] = serde_json::Value::Null;
                line["id_ok"] = false.into();
            }
            Ok((reply, from)) => {
                line["errno"] = 0.into();
                line["ok"] = true.into();
                line["from"] = from.to_string().into();
                line["reply_len"] = reply.len().into();
                match Message::from_vec(&reply) {
                    Ok(m) => {
                        let (mut addrs, mut ttls, mut cnames) =
                            (Vec::new(), Vec::new(), Vec::new());
                        for r in &m.answers {
                            match &r.data {
                                RData::A(a) => {
                                    addrs.push(a.0.to_string());
                                    ttls.push(r.ttl);
                                }
                                RData::AAAA(a) => {
                                    addrs.push(a.0.to_string());
                                    ttls.push(r.ttl);
                                }
                                RData::CNAME(c) => {
                                    cnames.push(c.0.to_ascii().trim_end_matches('.').to_owned())
                                }
                                _ => {}
                            }
                        }
                        line["rcode"] = format!("{:?}", m.metadata.response_code).into();
                        line["addrs"] = addrs.into();
                        line["ttls"] = ttls.into();
                        line["cnames"] = cnames.into();
                        line["id_ok"] = (m.metadata.id == query.metadata.id).into();
                        line["truncated"] = m.metadata.truncation.into();
                    }
                    Err(e) => {
                        line["rcode"] = serde_json::Value::Null;
                        line["addrs"] = serde_json::json!([]);
                        line["ttls"] = serde_json::json!([]);
                        line["cnames"] = serde_json::json!([]);
                        line["id_ok"] = false.into();
                        line["parse_error"] = e.to_string().into();
                    }
                }
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }
    ExitCode::SUCCESS
}

/// One datagram out, one back: (reply, who answered). `connected`: connect + send + recv and
/// the answerer is getpeername's; else sendto + recvfrom and the answerer is recvfrom's source.
fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    connected: bool,
) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    let socket = udp_socket(&server)?;
    socket.set_read_timeout(Some(DNS_TIMEOUT))?;
    let mut buf = vec![0u8; 65_535];
    if connected {
        socket.connect(server)?;
        socket.send(bytes)?;
        let n = socket.recv(&mut buf)?;
        buf.truncate(n);
        Ok((buf, socket.peer_addr()?))
    } else {
        socket.send_to(bytes, server)?;
        let (n, from) = socket.recv_from(&mut buf)?;
        buf.truncate(n);
        Ok((buf, from))
    }
}

/// One length-prefixed message out on a new TCP connection, one back: (reply, getpeername).
fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&server, DNS_TIMEOUT)?;
    stream.set_read_timeout(Some(DNS_TIMEOUT))?;
    stream.set_write_timeout(Some(DNS_TIMEOUT))?;
    let len = u16::try_from(bytes.len())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EMSGSIZE))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply)?;
    Ok((reply, stream.peer_addr()?))
}

/// `hex` (two digits a byte, any case) as bytes.
fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn dns_raw(server: SocketAddr, bytes: &[u8], tcp: bool) -> ExitCode {
    let r = if tcp {
        tcp_exchange(server, bytes)
    } else {
        udp_exchange(server, bytes, false)
    };
    let mut line = serde_json::json!({
        "op": "dns-raw",
        "server": server.to_string(),
        "proto": if tcp { "tcp" } else { "udp" },
        "sent": bytes.len(),
        "pid": std::process::id(),
        "rcode": serde_json::Value::Null,
        "id": serde_json::Value::Null,
    });
    match r {
        Err(e) => {
            line["errno"] = errno_of(&e).into();
            line["reply_len"] = 0.into();
        }
        Ok((reply, from)) => {
            line["errno"] = 0.into();
            line["reply_len"] = reply.len().into();
            line["from"] = from.to_string().into();
            if let Ok(h) = Header::from_bytes(&reply) {
                line["rcode"] = format!("{:?}", h.metadata.response_code).into();
                line["id"] = h.metadata.id.into();
                line["response"] = (h.metadata.message_type == MessageType::Response).into();
                line["opcode_query"] = (h.metadata.op_code == OpCode::Query).into();
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    ExitCode::SUCCESS
}

/// Binds FILE over /etc/resolv.conf in a mount namespace of its own, then execs PROGRAM: a
/// process that resolves through glibc with the resolver the test chose, host untouched.
fn with_resolv_conf(file: &str, program: &str, args: &[&str]) -> ExitCode {
    use std::ffi::CString;
    let fail = |step: &str| {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
        println!(
            "{}",
            serde_json::json!({"op": "with-resolv-conf", "step": step, "errno": errno})
        );
        ExitCode::from(104)
    };
    let (Ok(file), Ok(root), Ok(target)) = (
        CString::new(file),
        CString::new("/"),
        CString::new("/etc/resolv.conf"),
    ) else {
        return usage("FILE has a NUL byte");
    };
    // SAFETY: unshare(2) with a flag; affects only this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return fail("unshare");
    }
    // Private, so the bind below never propagates back to the host's mount namespace.
    // SAFETY: valid NUL-terminated strings and null pointers where mount(2) allows them.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return fail("make-private");
    }
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            file.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        return fail("bind");
    }
    let err = Command::new(program).args(args).exec();
    eprintln!("aw-probe: exec {program}: {err}");
    ExitCode::from(127)
}
