//! `agentwatch launch` hardening, end to end: what the launched command is (own cgroup
//! namespace, no_new_privs, none of the eight guard-breaking capabilities in any set, the
//! agent's user) and what it can no longer do (raw sockets, new network namespaces, moving
//! itself to another cgroup), each with the exact errno. Every test runs its own daemon.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use agentwatch_tests::{DaemonEnv, TempDir, TestCgroup, agentwatch_bin, privileged};

/// The eight capabilities launch drops: CAP_NET_ADMIN (12), CAP_NET_RAW (13),
/// CAP_SYS_MODULE (16), CAP_SYS_RAWIO (17), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21),
/// CAP_PERFMON (38), CAP_BPF (39). Spelled out here, not taken from the code under test.
const DROPPED: u64 = 1 << 12 | 1 << 13 | 1 << 16 | 1 << 17 | 1 << 19 | 1 << 21 | 1 << 38 | 1 << 39;

/// Tries, from inside the agent, what the hardening must refuse; prints `NAME ERRNO` per try
/// (0: it worked). argv[1], when given, is a cgroup to move this process into.
const ATTEMPTS: &str = r#"
import ctypes, os, socket, sys
def attempt(name, f):
    try:
        f()
        print(name, 0)
    except OSError as e:
        print(name, e.errno)
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
libc = ctypes.CDLL(None, use_errno=True)
def unshare_net():
    if libc.unshare(0x40000000) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("unshare_net", unshare_net)
def unshare_user():
    if libc.unshare(0x10000000) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("unshare_user", unshare_user)
libc.syscall.restype = ctypes.c_long
def clone3():
    # Any clone3 at all: the seccomp filter cannot read its flags (a bad size would be EINVAL).
    if libc.syscall(435, None, ctypes.c_size_t(0)) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("clone3", clone3)
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    if os.waitpid(pid, 0)[1] >> 8 != 7:
        raise OSError(1, "child")
attempt("fork", fork)
if len(sys.argv) > 1:
    try:
        fd = os.open(sys.argv[1] + "/cgroup.procs", os.O_WRONLY)
    except OSError as e:
        print("cgroup_open", e.errno)
    else:
        attempt("cgroup_write", lambda: os.write(fd, str(os.getpid()).encode()))
sys.stdout.flush()
"#;

/// The launched shell: reports its own status and cgroup, waits until the test has looked at
/// the host's view, runs the attempts and `unshare -n true`, and exits with $3.
const SCRIPT: &str = r#"cat /proc/$$/status /proc/$$/cgroup
echo ready
read x
python3 -c "$1" $2
echo "python $?"
unshare -n true 2>&1
echo "unshare_cmd $?"
exit $3"#;

#[derive(Debug)]
struct Report {
    /// `/proc/self/status` of the launched process, key -> value.
    status: HashMap<String, String>,
    /// The cgroup v2 line of its `/proc/self/cgroup`.
    cgroup_line: String,
    pid: u32,
    /// Its pid was in the agent's cgroup.procs on the host while it ran.
    in_agent_cgroup: bool,
    /// `NAME ERRNO` lines of the attempts, and `unshare_cmd EXIT`.
    attempts: HashMap<String, i32>,
    /// Other output (the `unshare` command's message).
    other: Vec<String>,
    exit: Option<i32>,
    stderr: String,
}

/// Launches SCRIPT in `agent` through the daemon of `env`.
fn launch_script(env: &DaemonEnv, agent: &str, other_cgroup: Option<&Path>, exit: u8) -> Report {
    let mut child = Command::new(agentwatch_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "launch", "--agent", agent, "--", "/bin/sh", "-c", SCRIPT, "sh", ATTEMPTS,
        ])
        .arg(other_cgroup.map_or(String::new(), |p| p.display().to_string()))
        .arg(exit.to_string())
        // A user like nobody may not search the test's working directory.
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running agentwatch launch");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut status = HashMap::new();
    let mut cgroup_line = String::new();
    for line in lines.by_ref() {
        let line = line.expect("reading the launched command's output");
        if line == "ready" {
            break;
        }
        if let Some(rest) = line.strip_prefix("0::") {
            cgroup_line = format!("0::{rest}");
        } else if let Some((k, v)) = line.split_once(':') {
            status.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    let Some(pid) = status.get("Pid").and_then(|p| p.parse::<u32>().ok()) else {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!(
            "the launched command did not report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let procs = fs::read_to_string(env.agent_cgroup(agent).join("cgroup.procs"))
        .expect("reading the agent's cgroup.procs");
    let in_agent_cgroup = procs.lines().any(|l| l == pid.to_string());
    writeln!(stdin, "go").expect("letting the command go on");
    drop(stdin);
    let mut attempts = HashMap::new();
    let mut other = Vec::new();
    for line in lines {
        let line = line.expect("reading the launched command's output");
        match line.split_once(' ').map(|(k, v)| (k, v.parse::<i32>())) {
            Some((k, Ok(v))) if !k.contains(':') => {
                attempts.insert(k.to_owned(), v);
            }
            _ => other.push(line),
        }
    }
    let out = child.wait_with_output().expect("waiting for launch");
    Report {
        status,
        cgroup_line,
        pid,
        in_agent_cgroup,
        attempts,
        other,
        exit: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn mask(status: &HashMap<String, String>, key: &str) -> u64 {
    let v = status
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {status:?}"));
    u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("{key}: {v}"))
}

/// This test process's own status (root with every capability, as privileged tests run).
fn own_status() -> HashMap<String, String> {
    fs::read_to_string("/proc/self/status")
        .expect("own status")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn id(args: &[&str]) -> String {
    let out = Command::new("id").args(args).output().expect("running id");
    assert!(out.status.success(), "id {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The common part of both users' reports.
fn assert_hardened(r: &Report, env: &DaemonEnv, agent: &str) {
    assert_eq!(r.status.get("NoNewPrivs").map(String::as_str), Some("1"));
    for key in ["CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(
            mask(&r.status, key) & DROPPED,
            0,
            "{key} {:016x} holds a dropped capability",
            mask(&r.status, key)
        );
    }
    // Only the eight are gone from the bounding set; everything else stays.
    assert_eq!(
        mask(&r.status, "CapBnd"),
        mask(&own_status(), "CapBnd") & !DROPPED
    );
    assert_eq!(r.cgroup_line, "0::/", "own cgroup namespace");
    assert!(
        r.in_agent_cgroup,
        "pid {} not in {}",
        r.pid,
        env.agent_cgroup(agent).display()
    );
    // A raw socket needs CAP_NET_RAW; a network namespace CAP_SYS_ADMIN.
    assert_eq!(
        r.attempts.get("raw_socket"),
        Some(&libc::EPERM),
        "{:?}",
        r.attempts
    );
    assert_eq!(
        r.attempts.get("unshare_net"),
        Some(&libc::EPERM),
        "{:?}",
        r.attempts
    );
    // No user namespace of its own (where it would hold every capability over its own
    // mounts): the seccomp filter, for root and everyone else. clone3 is ENOSYS (runtimes fall
    // back to clone); fork still works.
    assert_eq!(r.status.get("Seccomp").map(String::as_str), Some("2"));
    assert_eq!(
        r.attempts.get("unshare_user"),
        Some(&libc::EPERM),
        "{:?}",
        r.attempts
    );
    assert_eq!(
        r.attempts.get("clone3"),
        Some(&libc::ENOSYS),
        "{:?}",
        r.attempts
    );
    assert_eq!(r.attempts.get("fork"), Some(&0), "{:?}", r.attempts);
    assert_eq!(r.attempts.get("unshare_cmd"), Some(&1), "{:?}", r.attempts);
    assert_eq!(
        r.other,
        vec!["unshare: unshare failed: Operation not permitted".to_owned()]
    );
}

#[test]
fn launched_as_root_without_the_eight_capabilities_in_its_own_cgroup_namespace() {
    privileged!();
    let other = TestCgroup::new();
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"rooted\"\nuser = \"root\"\n");
    env.start();
    let r = launch_script(&env, "rooted", Some(other.path()), 0);
    eprintln!("{r:#?}");
    assert_eq!(r.exit, Some(0), "{}", r.stderr);
    assert_hardened(&r, &env, "rooted");
    // `user = "root"`: uid 0, with every capability but the eight.
    assert_eq!(r.status.get("Uid").map(String::as_str), Some("0\t0\t0\t0"));
    let own = own_status();
    assert_eq!(mask(&r.status, "CapEff"), mask(&own, "CapEff") & !DROPPED);
    assert_eq!(mask(&r.status, "CapPrm"), mask(&own, "CapPrm") & !DROPPED);
    assert_eq!(mask(&r.status, "CapInh"), 0);
    assert_eq!(mask(&r.status, "CapAmb"), 0);
    // Moving itself to another cgroup: root may open cgroup.procs. With nsdelegate the kernel
    // refuses a target outside the namespace (ENOENT); without it (this test machine), the
    // move happens and agentwatch's escape guard kills the process before the write returns
    // (SIGKILL: the shell sees 137), so it never reports the write.
    assert_eq!(r.attempts.get("cgroup_open"), None, "{:?}", r.attempts);
    if agentwatch_tests::cgroup2_nsdelegate() {
        assert_eq!(r.attempts.get("cgroup_write"), Some(&libc::ENOENT));
        assert_eq!(r.attempts.get("python"), Some(&0));
    } else {
        assert_eq!(r.attempts.get("cgroup_write"), None, "{:?}", r.attempts);
        assert_eq!(r.attempts.get("python"), Some(&137), "{:?}", r.attempts);
    }
    assert_eq!(
        fs::read_to_string(other.path().join("cgroup.procs")).expect("other cgroup.procs"),
        "",
        "nothing is left in the cgroup it tried to escape to"
    );
}

#[test]
fn launched_as_nobody_with_its_ids_and_the_exit_status_passed_through() {
    privileged!();
    let other = TestCgroup::new();
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"lowly\"\nuser = \"nobody\"\n");
    env.start();
    let r = launch_script(&env, "lowly", Some(other.path()), 7);
    eprintln!("{r:#?}");
    assert_eq!(r.exit, Some(7), "exit status passed through: {}", r.stderr);
    assert_hardened(&r, &env, "lowly");
    let (uid, gid) = (id(&["-u", "nobody"]), id(&["-g", "nobody"]));
    assert_eq!(
        r.status.get("Uid"),
        Some(&format!("{uid}\t{uid}\t{uid}\t{uid}"))
    );
    assert_eq!(
        r.status.get("Gid"),
        Some(&format!("{gid}\t{gid}\t{gid}\t{gid}"))
    );
    let mut want: Vec<u32> = id(&["-G", "nobody"])
        .split(' ')
        .map(|g| g.parse().expect("gid"))
        .collect();
    want.sort_unstable();
    let mut got: Vec<u32> = r.status["Groups"]
        .split_whitespace()
        .map(|g| g.parse().expect("gid"))
        .collect();
    got.sort_unstable();
    assert_eq!(got, want, "supplementary groups (initgroups)");
    // Not root any more: no capability at all, only the bounding set is left (minus the eight).
    for key in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(mask(&r.status, key), 0, "{key}");
    }
    // cgroup.procs of another cgroup is root's, mode 0644: refused at open.
    assert_eq!(
        r.attempts.get("cgroup_open"),
        Some(&libc::EACCES),
        "{:?}",
        r.attempts
    );
    assert_eq!(r.attempts.get("cgroup_write"), None, "{:?}", r.attempts);
    assert_eq!(
        fs::read_to_string(other.path().join("cgroup.procs")).ok(),
        Some(String::new())
    );
}

#[test]
fn without_user_an_agent_runs_as_a_uid_of_its_own_with_a_private_home() {
    privileged!();
    let other = TestCgroup::new();
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"plain\"\n\n[[agents]]\nname = \"other\"\n");
    env.start();
    let r = launch_script(&env, "plain", Some(other.path()), 3);
    eprintln!("{r:#?}");
    assert_eq!(r.exit, Some(3), "exit status passed through: {}", r.stderr);
    assert_hardened(&r, &env, "plain");
    // The uid the config gives it (stable: from its name), and its group of the same number.
    let config = agentwatch::config::Config::load(&env.config).expect("config");
    let uid = match config.agent("plain").map(|a| a.run_as.clone()) {
        Some(agentwatch::uids::RunAs::Own { uid }) => uid,
        other => panic!("plain runs as {other:?}"),
    };
    let other_uid = match config.agent("other").map(|a| a.run_as.clone()) {
        Some(agentwatch::uids::RunAs::Own { uid }) => uid,
        o => panic!("other runs as {o:?}"),
    };
    assert_ne!(uid, other_uid, "two agents, two uids");
    assert!(agentwatch::uids::UidRange::DEFAULT.contains(uid), "{uid}");
    assert_eq!(
        r.status.get("Uid"),
        Some(&format!("{uid}\t{uid}\t{uid}\t{uid}"))
    );
    assert_eq!(
        r.status.get("Gid"),
        Some(&format!("{uid}\t{uid}\t{uid}\t{uid}"))
    );
    assert_eq!(r.status.get("Groups").map(String::as_str), Some(""));
    for key in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(mask(&r.status, key), 0, "{key}");
    }
    assert_eq!(
        r.attempts.get("cgroup_open"),
        Some(&libc::EACCES),
        "{:?}",
        r.attempts
    );
    // Its private home: its own, nobody else's.
    use std::os::unix::fs::MetadataExt as _;
    let home = env.homes().join("plain");
    let m = fs::metadata(&home).expect("the agent's home");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, uid, 0o700));
    // status says whom it runs as, and that it is not root.
    let row = &env.status()["plain"];
    assert_eq!(row["runs_as"], format!("uid:{uid}"));
    assert_eq!(row["root"], false);
    // The home is writable by it, HOME points there, and the same uid comes back next time.
    let out = env.cli(&[
        "launch",
        "--agent",
        "plain",
        "--",
        "/bin/sh",
        "-c",
        "touch \"$HOME/ok\" && echo \"$HOME $(id -u)\"",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{} {uid}", home.display())
    );
    assert_eq!(fs::metadata(home.join("ok")).expect("written").uid(), uid);
}

#[test]
fn a_working_directory_the_agent_cannot_read_is_a_clear_error() {
    privileged!();
    let dir = TempDir::new();
    let private = dir.0.join("private");
    fs::create_dir(&private).expect("mkdir");
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).expect("chmod");
    let marker = dir.0.join("ran");
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"plain\"\n");
    env.start();
    let out = Command::new(agentwatch_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args(["launch", "--agent", "plain", "--", "/bin/sh", "-c"])
        .arg(format!("touch {}", marker.display()))
        .current_dir(&private)
        .output()
        .expect("launch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let uid = match agentwatch::config::Config::load(&env.config)
        .expect("config")
        .agent("plain")
        .map(|a| a.run_as.clone())
    {
        Some(agentwatch::uids::RunAs::Own { uid }) => uid,
        o => panic!("{o:?}"),
    };
    assert_eq!(
        stderr.trim(),
        format!(
            "agentwatch: agent `plain` runs as uid {uid}, which cannot read the working \
             directory {}; start it from a directory that uid can read (its home is {}), or \
             give the agent a `user` who can",
            private.display(),
            env.homes().join("plain").display()
        )
    );
    assert!(!marker.exists(), "the command ran");
    // A command it may not execute, from a directory it may read.
    let script = private.join("tool.sh");
    fs::write(&script, "#!/bin/sh\ntrue\n").expect("write");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(agentwatch_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args(["launch", "--agent", "plain", "--"])
        .arg(&script)
        .current_dir("/")
        .output()
        .expect("launch");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "agentwatch: agent `plain` runs as uid {uid}, which cannot execute {} (or search a \
             folder on its path); the command was not run",
            script.display()
        )
    );
}

#[test]
fn check_warns_of_a_root_agent() {
    let dir = TempDir::new();
    let path = dir.0.join("root.toml");
    fs::write(
        &path,
        "[[agents]]\nname = \"a\"\nuser = \"root\"\n\n[[agents]]\nname = \"b\"\n",
    )
    .expect("write");
    let out = Command::new(agentwatch_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("running agentwatch check");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].starts_with("  warning: agent `a` runs as root (user = \"root\"):"),
        "{text}"
    );
    // And what guards the daemon from it on this kernel.
    let tamper = if agentwatch::bpf::load::bpf_lsm_active() {
        "  tamper on this host: enforced (BPF LSM: an agent's bpf() calls, its signals to the daemon and its writes, unlinks and renames of the daemon's files are refused)"
    } else {
        "  tamper on this host: file modes and uids only (no BPF LSM: an agent with user = \"root\" can open the pins and signal the daemon)"
    };
    assert!(text.lines().any(|l| l == tamper), "{text}");
    // And whether the cgroup2 mount keeps it from moving the daemon into its own cgroup.
    let moves = text
        .lines()
        .filter(|l| l.starts_with("  cgroup2 on this host: no nsdelegate"))
        .count();
    assert_eq!(
        moves,
        usize::from(!agentwatch::cgroup::nsdelegate()),
        "{text}"
    );
}

#[test]
fn an_unknown_user_fails_the_launch_and_the_command_never_runs() {
    privileged!();
    let dir = TempDir::new();
    let marker = dir.0.join("ran");
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"ghost\"\nuser = \"aw-no-such-user\"\n");
    env.start();
    let out = env.cli(&[
        "launch",
        "--agent",
        "ghost",
        "--",
        "/bin/sh",
        "-c",
        &format!("touch {}", marker.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "agentwatch: agent `ghost` runs as user `aw-no-such-user`, but there is no user \
         `aw-no-such-user` on this host"
    );
    assert!(!marker.exists(), "the command ran");
    // It failed before joining: nothing ever entered the agent's cgroup.
    assert_eq!(
        fs::read_to_string(env.agent_cgroup("ghost").join("cgroup.procs")).ok(),
        Some(String::new())
    );
}

#[test]
fn check_reports_a_malformed_user_with_its_place() {
    let dir = TempDir::new();
    let path = dir.0.join("bad.toml");
    fs::write(&path, "[[agents]]\nname = \"a\"\nuser = \"root:0\"\n").expect("write");
    let out = Command::new(agentwatch_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("running agentwatch check");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "{}:3:8: user `root:0` is not a user name (1-32 characters of letters, digits, \
             `_`, `.` and `-`, starting with a letter or `_`)",
            path.display()
        )
    );
}
