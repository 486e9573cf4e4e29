//! The control socket against peers that misbehave: malformed and oversized requests, a peer
//! that sends half a request and stalls, a thousand idle connections. The daemon answers an
//! error or drops the peer, and keeps serving the others: a good peer's `status` is timed
//! meanwhile.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use agentwatch::control::Request;
use agentwatch_tests::{DaemonEnv, patience, privileged};

/// Sends `bytes` and reads the one answer line (empty: the daemon hung up without one).
fn exchange(env: &DaemonEnv, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&env.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // The daemon may answer and hang up before it read everything (oversized requests).
    let _ = s.write_all(bytes);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

/// `status` from a good peer, with how long it took.
/// The request is the CLI's, sent from this process: what is timed is the daemon's answer, not
/// the start of an `agentwatch` process (alone 1-2 s under QEMU's TCG), so the bound stays
/// below the daemon's 5 s peer timeout, which a daemon that waited on the idle peers would
/// exceed.
fn timed_status(env: &DaemonEnv) -> Duration {
    let t = Instant::now();
    let _ = env.request(&Request::Status { rules: false });
    t.elapsed()
}

fn started() -> DaemonEnv {
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"a\"\negress = []\n");
    env.start();
    env
}

#[test]
fn malformed_and_oversized_requests_get_an_error_and_nothing_else_changes() {
    privileged!();
    let env = started();
    let bad = |bytes: &[u8]| {
        let line = exchange(&env, bytes);
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{e}: {line:?} for {:?}", String::from_utf8_lossy(bytes)));
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().expect("error").to_owned()
    };
    assert!(bad(b"{\"cmd\":\n").starts_with("bad request"));
    assert!(bad(b"not json at all\n").starts_with("bad request"));
    assert!(bad(b"{\"cmd\":\"explode\"}\n").starts_with("bad request"));
    assert!(
        bad(b"{\"cmd\":\"kill\"}\n").starts_with("bad request"),
        "missing field"
    );
    assert!(bad(b"{\"cmd\":\"status\",\"extra\":1}\n").starts_with("bad request"));
    assert!(bad(b"\xff\xfe\x00\n").starts_with("bad request"));
    assert!(bad(b"{\"cmd\":\"kill\",\"agent\":\"nobody\"}\n").contains("unknown agent `nobody`"));
    // 1 MiB without a newline: the daemon reads at most 64 KiB of it and answers.
    let huge = vec![b'x'; 1 << 20];
    assert!(bad(&huge).starts_with("bad request"));
    // A peer that connects and hangs up at once.
    drop(UnixStream::connect(&env.socket).expect("connect"));
    assert_eq!(env.status()["a"]["state"], "running");
    assert!(
        env.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        env.log()
    );
}

#[test]
fn stalled_and_idle_peers_do_not_keep_others_waiting() {
    privileged!();
    let env = started();
    // This test holds a thousand sockets itself.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(8192);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    // Half a request, then nothing.
    let mut stalled = UnixStream::connect(&env.socket).expect("connect");
    stalled.write_all(b"{\"cmd\":\"sta").expect("write");
    // A thousand peers that connect and say nothing.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&env.socket).expect("connect idle"))
        .collect();
    // Each peer is judged from the kernel before it is read (crate::peer: its pidfd or
    // credentials, its cgroup against the agents'), so a status behind a thousand of them waits
    // for a thousand judgements: 2.5 s in the 6.1 guest under TCG with the host busy, hence a
    // bound that follows the time scale (it catches a hang, not a slowdown).
    let took = timed_status(&env);
    eprintln!("status with 1,001 idle peers: {took:?}");
    assert!(
        took < patience(Duration::from_secs(2)),
        "status took {took:?} with 1,001 idle peers"
    );
    // The idle and the stalled are dropped after the daemon's 5 s, without an answer.
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let t = Instant::now();
    let mut rest = Vec::new();
    let n = stalled
        .read_to_end(&mut rest)
        .expect("read until the daemon hangs up");
    assert_eq!(n, 0, "no answer to half a request: {rest:?}");
    assert!(
        t.elapsed() < patience(Duration::from_secs(10)),
        "{:?}",
        t.elapsed()
    );
    for mut s in idle.into_iter().step_by(100) {
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).expect("hung up"), 0);
    }
    let took = timed_status(&env);
    assert!(
        took < patience(Duration::from_secs(2)),
        "status took {took:?} afterwards"
    );
}
