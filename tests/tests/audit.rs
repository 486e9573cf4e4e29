//! The audit trail's hash chain end to end: a real daemon writes a small, rotating trail
//! across a restart; `agentwatch audit verify` finds it intact, and names the exact file and
//! line of every kind of tampering done to copies of it.

use std::{
    fs,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use agentwatch::audit::{link, rotated};
use agentwatch_tests::{
    DaemonEnv, EPERM, TempDir, agentwatch_bin, holds_within, parse_attempts, patience, privileged,
    written_lines,
};

/// Rotated files kept: more than this test writes, so the trail starts at its first line.
const KEEP: u32 = 20;

/// The trail's files, oldest first, as `audit verify` takes them.
fn trail_files(audit: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=KEEP)
        .rev()
        .map(|n| rotated(audit, n))
        .filter(|p| p.exists())
        .collect();
    files.push(audit.to_owned());
    files
}

/// Every line of the trail, oldest first.
fn trail_lines(audit: &Path) -> Vec<String> {
    trail_files(audit)
        .iter()
        .flat_map(|f| {
            written_lines(&fs::read_to_string(f).unwrap_or_default())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until the whole trail (all files) holds `n` lines of `kind`.
fn wait_kind(audit: &Path, kind: &str, n: usize) {
    let needle = format!("\"kind\":\"{kind}\"");
    let mut got = 0;
    let held = holds_within(Duration::from_secs(10), || {
        got = trail_lines(audit)
            .iter()
            .filter(|l| l.contains(&needle))
            .count();
        got >= n
    });
    assert!(
        held,
        "{got} of {n} {kind} lines after {:?}:\n{}",
        patience(Duration::from_secs(10)),
        trail_lines(audit).join("\n")
    );
    assert_eq!(got, n, "more {kind} lines than attempts");
}

/// `count` connects the agent is denied, each one audited.
fn denied_connects(env: &DaemonEnv, port: u16, count: usize) {
    let out = env.launch_probe(
        "chain",
        &[
            "connect",
            "tcp",
            "127.0.0.1",
            &port.to_string(),
            &count.to_string(),
        ],
    );
    let attempts = parse_attempts(&out.stdout);
    assert_eq!(
        attempts.len(),
        count,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        attempts.iter().all(|a| !a.ok && a.errno == EPERM),
        "{attempts:?}"
    );
}

fn verify(files: &[PathBuf]) -> Output {
    Command::new(agentwatch_bin())
        .args(["audit", "verify"])
        .args(files)
        .output()
        .expect("running agentwatch audit verify")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies of `files` into a new folder `name` under `dir`, same file names.
fn copies(dir: &Path, name: &str, files: &[PathBuf]) -> Vec<PathBuf> {
    let to = dir.join(name);
    fs::create_dir_all(&to).expect("copy folder");
    files
        .iter()
        .map(|f| {
            let c = to.join(f.file_name().expect("file name"));
            fs::copy(f, &c).expect("copying a trail file");
            c
        })
        .collect()
}

fn read_lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .expect("reading a copy")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    fs::write(p, lines.join("\n") + "\n").expect("writing a copy");
}

/// Asserts a failed verify whose first line starts with `FILE:LINE: ` and contains `says`.
fn assert_break(o: &Output, file: &Path, line: usize, says: &str) {
    let text = stdout(o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let first = text.lines().next().unwrap_or_default();
    let at = format!("{}:{line}: ", file.display());
    assert!(first.starts_with(&at), "expected `{at}...`, got:\n{text}");
    assert!(first.contains(says), "expected `{says}` in:\n{text}");
}

#[test]
fn a_rotated_trail_across_a_restart_verifies_and_tampering_is_located() {
    privileged!();
    // A real listener, so the EPERM can only be agentwatch's.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut env = DaemonEnv::new();
    // The smallest size the config takes: about a dozen lines a file. An audit rate high
    // enough for every denial to be a line of its own (none summarised), so the counts are exact.
    env.set_daemon_extra(&format!(
        "audit_max_size = \"4KiB\"\naudit_keep = {KEEP}\naudit_rate = 1000\n"
    ));
    env.write_config("[[agents]]\nname = \"chain\"\negress = []\n");
    env.start();
    denied_connects(&env, port, 40);
    wait_kind(&env.audit, "egress_denied", 40);
    assert_eq!(env.stop_with(libc::SIGTERM), Some(0), "{}", env.log());
    let before_restart = trail_lines(&env.audit).len();
    env.start();
    denied_connects(&env, port, 40);
    wait_kind(&env.audit, "egress_denied", 80);
    // Nothing more is written while the files are checked.
    assert_eq!(env.stop_with(libc::SIGTERM), Some(0), "{}", env.log());

    let files = trail_files(&env.audit);
    let lines = trail_lines(&env.audit);
    assert!(files.len() >= 5, "too few rotations to test: {files:?}");
    assert!(
        files
            .iter()
            .all(|f| fs::metadata(f).expect("trail file").len() <= 4096),
        "{files:?}"
    );
    // Each line's `prev` is the SHA-256 of the line before it, as sha256sum computes it:
    // across the restart, and from the empty string at the very start.
    let prev_of = |l: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(l).expect("audit line is JSON");
        v["prev"].as_str().expect("prev").to_owned()
    };
    assert_eq!(prev_of(&lines[0]), sha256sum(b""));
    let first_after = &lines[before_restart];
    assert_eq!(
        prev_of(first_after),
        sha256sum(lines[before_restart - 1].as_bytes())
    );
    assert!(
        lines[before_restart - 1].ends_with(&format!(
            r#","prev":"{}"}}"#,
            prev_of(&lines[before_restart - 1])
        )),
        "prev is the line's last field"
    );

    let out = verify(&files);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        stdout(&out).lines().next(),
        Some(
            format!(
                "ok: {} lines in {} files, chain intact",
                lines.len(),
                files.len()
            )
            .as_str()
        )
    );
    // Only the newest two: intact, starting mid-chain.
    let out = verify(&files[files.len() - 2..]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!(
            "starts mid-chain: the line before {}:1 is not among the files given",
            files[files.len() - 2].display()
        )),
        "{}",
        stdout(&out)
    );

    let scratch = TempDir::new();
    // The middle file, where a line has neighbours in its own file.
    let mid = files.len() / 2;

    // One byte changed in line 5 (a digit of its time): line 6 no longer chains.
    let copy = copies(&scratch.0, "byte", &files);
    let mut l = read_lines(&copy[mid]);
    let z = l[4].find("Z\"").expect("ts ends in Z");
    let digit = if &l[4][z - 1..z] == "7" { "3" } else { "7" };
    l[4].replace_range(z - 1..z, digit);
    write_lines(&copy[mid], &l);
    assert_break(
        &verify(&copy),
        &copy[mid],
        6,
        &format!(
            "not the SHA-256 of the line before it ({}:5): that line was changed",
            copy[mid].display()
        ),
    );

    // Line 5 removed: the line now at 5 does not chain to line 4.
    let copy = copies(&scratch.0, "removed", &files);
    let mut l = read_lines(&copy[mid]);
    l.remove(4);
    write_lines(&copy[mid], &l);
    assert_break(
        &verify(&copy),
        &copy[mid],
        5,
        "that line was changed, or lines were removed or inserted here",
    );

    // A line inserted as line 5, forged to chain to line 4: line 6 names it.
    let copy = copies(&scratch.0, "inserted", &files);
    let mut l = read_lines(&copy[mid]);
    let forged = format!(
        r#"{{"ts":"2026-01-01T00:00:00.000000Z","agent":"chain","kind":"approved","actor_uid":0,"prev":"{}"}}"#,
        link(l[3].as_bytes())
    );
    l.insert(4, forged);
    write_lines(&copy[mid], &l);
    assert_break(
        &verify(&copy),
        &copy[mid],
        6,
        &format!("{}:5 was inserted", copy[mid].display()),
    );

    // The files newest first: the break is at the second file's first line, and the message
    // gives the order they chain in.
    let copy = copies(&scratch.0, "order", &files);
    let reversed: Vec<PathBuf> = copy.iter().rev().cloned().collect();
    let order = copy
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    assert_break(
        &verify(&reversed),
        &reversed[1],
        1,
        &format!("the files are not in order (oldest first); they chain in this order: {order}"),
    );
}

/// SHA-256 in hex as coreutils' sha256sum computes it: a check independent of agentwatch's.
fn sha256sum(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feeding sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_owned()
}
