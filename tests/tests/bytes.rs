//! Outbound bytes: counted exactly per agent in the kernel, and held to the agent's byte cap.

use std::{
    io::Read as _,
    net::{TcpListener, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use agentwatch_tests::{DaemonEnv, parse_attempts, privileged};
use agentwatch_tests::{scaled_rate, scaled_toml, time_scale};

#[test]
fn outbound_bytes_are_counted_exactly() {
    privileged!();
    let sink = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = sink.local_addr().expect("addr").port();
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"sender\"\negress = [\"udp 127.0.0.1 {port}\"]\n"
    ));
    env.start();
    let payload = "x".repeat(100);
    let out = env.launch_probe(
        "sender",
        &["sendto", "127.0.0.1", &port.to_string(), "10", &payload],
    );
    let sent = parse_attempts(&out.stdout);
    assert_eq!(sent.len(), 10);
    assert!(sent.iter().all(|a| a.ok), "{sent:?}");
    // Each datagram is an IPv4 packet: 20 bytes of IP header, 8 of UDP, 100 of payload.
    let row = &env.status()["sender"];
    assert_eq!(row["egress_bytes"], 10 * (20 + 8 + 100), "{row}");
    assert_eq!(row["egress_bytes_dropped"], 0);
    assert_eq!(
        env.metric("agentwatch_egress_bytes_total{agent=\"sender\"}"),
        Some(1280.0)
    );
}

#[test]
fn a_byte_cap_holds_a_bulk_tcp_upload_to_the_cap() {
    privileged!();
    const CAP: u64 = 1_000_000;
    // Measured over 5 s after the first second (the burst and TCP's start are behind it).
    const FROM: Duration = Duration::from_secs(1);
    const TO: Duration = Duration::from_secs(6);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"uploader\"\negress = [\"tcp 127.0.0.1 {port}\"]\n\n\
         [agents.limits]\negress_bytes_per_second = {CAP}\n"
    ));
    env.start();
    // The receiving end counts what arrives in the window, then hangs up.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let start = Instant::now();
        let (mut before, mut total) = (0u64, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        while start.elapsed() < TO {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
            if start.elapsed() < FROM {
                before = total;
            }
        }
        let _ = tx.send(total - before);
    });
    let secs = (TO + Duration::from_secs(1)).as_secs().to_string();
    let out = env.launch_probe(
        "uploader",
        &["upload", "127.0.0.1", &port.to_string(), &secs],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("upload report");
    // The receiver hangs up at the end of its window: the writer sees EPIPE or a reset.
    assert!(
        [0, libc::EPIPE, libc::ECONNRESET]
            .iter()
            .any(|e| report["errno"] == *e),
        "{report}"
    );
    let in_window = rx.recv_timeout(Duration::from_secs(30)).expect("receiver");
    let rate = in_window as f64 / (TO - FROM).as_secs_f64();
    let ratio = rate / CAP as f64;
    eprintln!("byte cap {CAP} B/s: {in_window} bytes arrived in 5 s = {rate:.0} B/s (x{ratio:.3})");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{in_window} bytes in 5 s: {rate:.0} B/s against a cap of {CAP} B/s"
    );
    let row = &env.status()["uploader"];
    assert!(
        row["egress_bytes_dropped"].as_u64().unwrap_or(0) > 0,
        "{row}"
    );
}

/// Exfiltration looks like this: the same one connection, suddenly carrying far more bytes. The
/// `bytes` signal trips the breaker while the connect rate stays flat.
#[test]
fn a_jump_in_bytes_trips_the_breaker_while_connects_stay_flat() {
    privileged!();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = vec![0u8; 1 << 16];
            while s.read(&mut buf).is_ok_and(|n| n > 0) {}
        }
    });
    let mut env = DaemonEnv::new();
    // Times stretched and rates shrunk by the time scale alike (see `scaled`): each window
    // carries the same bytes as on the host.
    env.write_config(&format!(
        "[[agents]]\nname = \"exfil\"\negress = [\"tcp 127.0.0.1 {port}\"]\n\n\
         [agents.breaker]\nwarmup = \"{}\"\nwindow = \"{}\"\ntrip_factor = 5.0\n\
         min_rate = {:?}\nmin_bytes_rate = {:?}\naction = \"alert\"\n",
        scaled_toml(Duration::from_secs(2)),
        scaled_toml(Duration::from_secs(1)),
        scaled_rate(20.0),
        scaled_rate(65536.0),
    ));
    env.start();
    // 40 KB/s for 4 s (the baseline), then 2 MB/s (upload-paced takes whole bytes a second).
    let phase = |bytes_per_second: f64, secs: f64| {
        format!(
            "{}:{}",
            scaled_rate(bytes_per_second).round(),
            secs * f64::from(time_scale())
        )
    };
    let out = env.launch_probe(
        "exfil",
        &[
            "upload-paced",
            "127.0.0.1",
            &port.to_string(),
            &phase(40_000.0, 4.0),
            &phase(2_000_000.0, 2.0),
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert!(
        report["bytes"].as_u64().unwrap_or(0) > 3_000_000,
        "{report}"
    );
    let trips = env.wait_audit("breaker_tripped", 1);
    assert_eq!(trips.len(), 1, "{trips:?}");
    assert_eq!(trips[0]["signal"], "bytes", "{trips:?}");
    let baseline = trips[0]["baseline"].as_f64().expect("baseline");
    assert!(
        (scaled_rate(20_000.0)..scaled_rate(80_000.0)).contains(&baseline),
        "learned about 40 KB/s: {trips:?}"
    );
    let row = &env.status()["exfil"];
    assert_eq!(row["connects"], 1, "one connection throughout: {row}");
}
