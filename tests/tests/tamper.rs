//! The guarded never steers the guard (issue 21): a hostile agent, launched with the defaults,
//! tries every way around the daemon that the issue's table lists, finding its targets the way
//! a real one would (the daemon's command line in /proc names the config, the config names the
//! socket, the pins and the trail). Each attempt's exact errno is asserted, and then that
//! nothing it aimed at changed: the daemon runs and answers, its links are attached, its
//! config and trail are as they were, the sibling agent lives unfrozen.
//!
//! A `user = "root"` agent can open the control socket; the daemon refuses it all the same,
//! from the kernel's word on its cgroup, audits `control_refused` and acts on it.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use agentwatch_tests::{
    DaemonEnv, accepting, agentwatch_bin, patience, privileged, scaled_toml, wait_until,
};

/// What the JSON-reporting scripts below (ATTACK, PEEK) begin with: `libc` for raw syscalls,
/// and `attempt(name, f)`, which records in `out` the errno `f` failed with (0: it worked).
const PRELUDE: &str = r#"
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
def write(path, text):
    # One write(2), its error raised here (a buffered file's would surface at a close that a
    # garbage collector swallows).
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
"#;

/// `python3 -c` of [`PRELUDE`] and `body`.
fn python(body: &str) -> String {
    format!("{PRELUDE}{body}")
}

/// The attacker, run inside agent `a` as `python3 -c ATTACK CONFIG SIBLING_PID SIBLING_CG
/// OWN_CG ALLOWED_PORT`. Prints one JSON object: attempt -> errno (0: it worked), plus what it
/// found.
const ATTACK: &str = r#"
import signal, socket, time, tomllib
config_path, sibling_pid, sibling_cg, own_cg, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
def connect_allowed():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    finally:
        s.close()
# The lease ends egress: wait until the allowed port is refused.
deadline = time.time() + float(os.environ.get("WAIT", "20"))
while time.time() < deadline:
    try:
        connect_allowed()
        time.sleep(0.05)
    except OSError as e:
        out["lease_over"] = e.errno
        break
# The daemon, found from /proc: the process whose command line names the config.
daemon = None
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if b"run" in cmd and config_path.encode() in cmd:
        daemon = int(p)
out["daemon_found"] = daemon is not None
cfg = tomllib.load(open(config_path, "rb"))["daemon"]
sock, pins, trail = cfg["control_socket"], cfg["pin_dir"], cfg["audit_log"]
def control(req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(json.dumps(req).encode() + b"\n")
    out[req["cmd"] + "_answer"] = s.recv(4096).decode()
attempt("approve", lambda: control({"cmd": "approve", "agent": "a", "keep_baseline": False}))
attempt("extend", lambda: control({"cmd": "extend", "agent": "a", "seconds": 36000}))
attempt("egress_after", connect_allowed)
attempt("config_append", lambda: open(config_path, "a").close())
attempt("config_rename", lambda: os.rename(config_path, config_path + ".old"))
attempt("socket_unlink", lambda: os.unlink(sock))
attempt("socket_fake", lambda: socket.socket(socket.AF_UNIX).bind(sock + ".fake"))
attempt("trail_write", lambda: open(trail, "r+").close())
attempt("trail_unlink", lambda: os.unlink(trail))
attempt("child_cgroup", lambda: os.mkdir(own_cg + "/evil"))
attempt("daemon_move", lambda: write(own_cg + "/cgroup.procs", str(daemon)))
attempt("daemon_stop", lambda: os.kill(daemon, signal.SIGSTOP))
attempt("daemon_kill", lambda: os.kill(daemon, signal.SIGKILL))
class ObjGet(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32), ("pad", ctypes.c_uint64 * 4)]
def bpf_obj_get(path):
    name = ctypes.create_string_buffer(path.encode())
    attr = ObjGet(ctypes.cast(name, ctypes.c_void_p).value, 0, 0)
    fd = libc.syscall(321, 7, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    os.close(fd)
pin_files = []
for root, dirs, files in os.walk(pins):
    pin_files += [os.path.join(root, f) for f in files]
out["pins_seen"] = len(pin_files)
attempt("pin_unlink", lambda: os.unlink(pin_files[0]))
attempt("sibling_freeze", lambda: write(sibling_cg + "/cgroup.freeze", "1"))
attempt("sibling_kill", lambda: write(sibling_cg + "/cgroup.kill", "1"))
attempt("sibling_signal", lambda: os.kill(sibling_pid, signal.SIGKILL))
def ptrace_sibling():
    if libc.ptrace(16, sibling_pid, None, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("sibling_ptrace", ptrace_sibling)
print(json.dumps(out), flush=True)
# Last, as it may cost the agent its life: with BPF LSM the tamper guard refuses every bpf()
# call of an agent (EPERM) and the daemon acts on it; wait for that here.
errs = {}
for p in pin_files:
    try:
        bpf_obj_get(p)
        errs["0"] = errs.get("0", 0) + 1
    except OSError as e:
        errs[str(e.errno)] = errs.get(str(e.errno), 0) + 1
        if e.errno == 1:
            print(json.dumps({"pin_first": 1}), flush=True)
            time.sleep(600)
print(json.dumps({"pins_opened": errs}), flush=True)
"#;

/// Launches `sleep` in agent `name` and waits until it is in the agent's cgroup; its pid.
fn sleeper(env: &DaemonEnv, name: &str) -> (Child, u32) {
    let mut child = env
        .launch_command(name, &["/bin/sleep", "600"])
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launching the sibling");
    let procs = env.agent_cgroup(name).join("cgroup.procs");
    let mut pid = 0;
    wait_until("the sibling in its cgroup", Duration::from_secs(10), || {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            panic!("the sibling exited: {status}: {err}");
        }
        pid = fs::read_to_string(&procs)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.parse().ok()))
            .unwrap_or(0);
        pid != 0
    });
    (child, pid)
}

/// `sh -c SCRIPT` launched in agent `agent`, once it has printed its first line, `ready`: the
/// child and the rest of its output.
fn ready_shell(
    env: &DaemonEnv,
    agent: &str,
    script: &str,
) -> (Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = env
        .launch_command(agent, &["/bin/sh", "-c", script])
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launching the agent's shell");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    (child, lines)
}

/// Programs attached to each agent's cgroup on the connect4 hook (the kernel's word, not
/// the pin files').
fn attached(env: &DaemonEnv) -> Vec<u32> {
    ["a", "b"]
        .iter()
        .map(|n| {
            let cg = agentwatch::cgroup::Cgroup::open(env.agent_cgroup(n)).expect("cgroup");
            agentwatch::launch::attached_programs(&cg).expect("BPF_PROG_QUERY")
        })
        .collect()
}

#[test]
fn a_default_launched_agent_cannot_reach_the_daemon_its_pins_or_its_sibling() {
    privileged!();
    let port = accepting();
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"a\"\negress = [\"tcp 127.0.0.1 {port}\"]\nlease = \"{}\"\n\n\
         [[agents]]\nname = \"b\"\negress = [\"tcp 127.0.0.1 {port}\"]\n",
        scaled_toml(Duration::from_secs(2))
    ));
    env.start();
    let (mut sibling, sibling_pid) = sleeper(&env, "b");
    let config_before = fs::read(&env.config).expect("config");
    let links_before = attached(&env);
    assert_eq!(links_before, vec![1, 1]);
    let out = env
        .launch_command("a", &["python3", "-c", &python(ATTACK)])
        .arg(&env.config)
        .arg(sibling_pid.to_string())
        .arg(env.agent_cgroup("b"))
        .arg(env.agent_cgroup("a"))
        .arg(port.to_string())
        .env(
            "WAIT",
            patience(Duration::from_secs(20)).as_secs().to_string(),
        )
        .current_dir("/")
        .output()
        .expect("launching the attacker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lsm = agentwatch_tests::bpf_lsm();
    use std::os::unix::process::ExitStatusExt as _;
    if lsm {
        // Killed by the daemon for its first bpf() call (no breaker: the tamper trip kills).
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "the attacker: {stdout}"
        );
    } else {
        assert!(
            out.status.success(),
            "the attacker: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut got: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for line in stdout.lines() {
        let part: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(line).expect("the attacker's report");
        got.extend(part);
    }
    eprintln!("{got:#?}");
    let errno = |k: &str| got.get(k).and_then(serde_json::Value::as_i64);
    let (eacces, eperm) = (i64::from(libc::EACCES), i64::from(libc::EPERM));
    assert_eq!(
        got["daemon_found"], true,
        "it found the daemon as a real agent would"
    );
    assert_eq!(errno("lease_over"), Some(eperm), "the lease ended egress");
    // The control socket is root's, mode 0600: approve and extend never reach the daemon.
    assert_eq!(errno("approve"), Some(eacces));
    assert_eq!(errno("extend"), Some(eacces));
    assert_eq!(errno("egress_after"), Some(eperm), "egress stays ended");
    // The config, the socket's folder, the trail: root's, writable by nobody else.
    for k in [
        "config_append",
        "config_rename",
        "socket_unlink",
        "socket_fake",
        "trail_write",
        "trail_unlink",
    ] {
        assert_eq!(errno(k), Some(eacces), "{k}");
    }
    // Its own cgroup's files are root's: no child cgroup to freeze the daemon in, no move.
    assert_eq!(errno("child_cgroup"), Some(eacces));
    assert_eq!(errno("daemon_move"), Some(eacces));
    // Another uid: no signal reaches the daemon or the sibling, no ptrace.
    assert_eq!(errno("daemon_stop"), Some(eperm));
    assert_eq!(errno("daemon_kill"), Some(eperm));
    assert_eq!(errno("sibling_signal"), Some(eperm));
    assert_eq!(errno("sibling_ptrace"), Some(eperm));
    assert_eq!(errno("sibling_freeze"), Some(eacces));
    assert_eq!(errno("sibling_kill"), Some(eacces));
    assert_eq!(errno("pin_unlink"), Some(eacces));
    let seen = got["pins_seen"].as_u64().expect("pins_seen");
    assert!(seen > 0, "{got:?}");
    if lsm {
        // The tamper guard came first: EPERM for the bpf() call itself, audited, acted on.
        // The attacker's own word of that EPERM races the kill the refusal brings (a few ms
        // later; in the TCG guest python lost it once): missing, it must not have gone on to
        // open pins (it would say `pins_opened`), and the refusal is the kernel's line below.
        match got.get("pin_first") {
            Some(v) => assert_eq!(v, &serde_json::json!(1), "{got:?}"),
            None => assert!(!got.contains_key("pins_opened"), "{got:?}"),
        }
        let refused = env.wait_audit("tamper_refused", 1);
        assert_eq!(refused.len(), 1, "{refused:#?}");
        assert_eq!(refused[0]["agent"], "a");
        assert_eq!(refused[0]["bpf_cmd"], "BPF_OBJ_GET");
        let trips = env.wait_audit("breaker_tripped", 1);
        assert_eq!(
            (trips[0]["signal"].as_str(), trips[0]["action"].as_str()),
            (Some("tamper"), Some("kill"))
        );
    } else {
        // Every pin seen, none opened: bpffs pins are root's, mode 0600.
        assert_eq!(
            got["pins_opened"],
            serde_json::json!({ libc::EACCES.to_string(): seen }),
            "BPF_OBJ_GET on every pin"
        );
    }
    // Nothing it aimed at changed.
    assert!(
        env.pid()
            .is_some_and(|p| fs::metadata(format!("/proc/{p}")).is_ok()),
        "the daemon runs"
    );
    let status = fs::read_to_string(format!("/proc/{}/status", env.pid().unwrap_or(0)))
        .expect("daemon status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("State:") && !l.contains("stopped")),
        "{status}"
    );
    let rows = env.status();
    assert_eq!(rows["b"]["state"], "running");
    assert_eq!(rows["b"]["processes"], 1);
    assert_eq!(rows["a"]["lease"]["expired"], true);
    assert_eq!(
        rows["a"]["runs_as"].as_str().map(|s| s.starts_with("uid:")),
        Some(true)
    );
    assert_ne!(
        rows["a"]["runs_as"], rows["b"]["runs_as"],
        "two agents, two uids"
    );
    assert_eq!(fs::read(&env.config).expect("config"), config_before);
    assert!(env.socket.exists());
    assert_eq!(attached(&env), links_before, "every link still attached");
    let lines = env.audit_lines();
    assert!(
        !lines
            .iter()
            .any(|l| l["kind"] == "approved" || l["kind"] == "lease_extended"),
        "{lines:?}"
    );
    env.verify_audit();
    let _ = sibling.kill();
    let _ = sibling.wait();
}

#[test]
fn a_root_agent_is_refused_on_the_control_socket_audited_and_stopped() {
    privileged!();
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"r\"\nuser = \"root\"\n\n[[agents]]\nname = \"other\"\n");
    env.start();
    // Root inside the agent: the socket opens, the daemon refuses what it asks, whatever the
    // request (approve itself, or launch into another agent).
    let (mut child, _lines) = ready_shell(
        &env,
        "r",
        &format!(
            "echo ready; {bin} --socket {sock} approve r; echo \"approve $?\"; sleep 600",
            bin = agentwatch_bin().display(),
            sock = env.socket.display()
        ),
    );
    let refused = env.wait_audit("control_refused", 1);
    assert_eq!(refused.len(), 1, "{:?}", env.audit_lines());
    let line = &refused[0];
    assert_eq!(line["agent"], "r");
    assert_eq!(line["uid"], 0);
    assert_eq!(line["comm"], "agentwatch");
    assert_eq!(line["request"]["cmd"], "approve");
    assert_eq!(line["request"]["agent"], "r");
    let pid = line["pid"].as_u64().expect("pid");
    assert!(pid > 0);
    // Acted on like an escape attempt: no breaker configured, so the agent is killed.
    let trips = env.wait_audit("breaker_tripped", 1);
    assert_eq!(trips.len(), 1, "{:?}", env.audit_lines());
    assert_eq!(trips[0]["agent"], "r");
    assert_eq!(trips[0]["signal"], "tamper");
    assert_eq!(trips[0]["action"], "kill");
    let status = child.wait().expect("waiting for the launched shell");
    assert_eq!(status.code(), None, "killed by a signal: {status}");
    let rows = env.status();
    // A breaker's kill: the tree is gone and the breaker holds it until a human approves.
    assert_eq!(rows["r"]["state"], "tripped");
    assert_eq!(rows["r"]["processes"], 0);
    assert_eq!(rows["r"]["root"], true);
    assert_eq!(rows["r"]["runs_as"], "root");
    assert_eq!(rows["r"]["escape_attempts"]["control_refused"], 1);
    assert_eq!(rows["other"]["root"], false);
    assert_eq!(
        env.metric("agentwatch_escape_attempts_total{agent=\"r\",kind=\"control_refused\"}"),
        Some(1.0)
    );
    assert_eq!(env.metric("agentwatch_agent_root{agent=\"r\"}"), Some(1.0));
    assert!(
        !env.audit_lines().iter().any(|l| l["kind"] == "approved"),
        "the approve never ran"
    );
    // The human, outside every agent, still may.
    let out = env.cli(&["approve", "r"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.verify_audit();
}

/// A root agent tries what only BPF LSM can refuse a root process here: opening a pinned
/// link (to detach it), signalling the daemon, writing its config and trail, moving its
/// socket, unlinking a pin, moving the daemon into its own cgroup. Run as `python3 -c
/// TRY_AS_ROOT PIN DAEMON_PID CONFIG TRAIL SOCKET LSM NSDELEGATE OWN_CGROUP`; prints `NAME
/// ERRNO` per attempt.
const TRY_AS_ROOT: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class ObjGet(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32), ("pad", ctypes.c_uint64 * 4)]
name = ctypes.create_string_buffer(sys.argv[1].encode())
attr = ObjGet(ctypes.cast(name, ctypes.c_void_p).value, 0, 0)
fd = libc.syscall(321, 7, ctypes.byref(attr), ctypes.sizeof(attr))
print("bpf", 0 if fd >= 0 else ctypes.get_errno())
if fd >= 0:
    os.close(fd)
try:
    os.kill(int(sys.argv[2]), 0)
    print("signal 0")
except OSError as e:
    print("signal", e.errno)
def attempt(name, f):
    try:
        f()
        print(name, 0)
    except OSError as e:
        print(name, e.errno)
config, trail, sock, lsm = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1"
nsdelegate, own_cg = sys.argv[7] == "1", sys.argv[8]
if nsdelegate:
    # The daemon into its own cgroup, to freeze it there. Its cgroup namespace (launch) is the
    # boundary where the mount has nsdelegate; without it, see the README's Security model.
    def move_daemon():
        fd = os.open(own_cg + "/cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, sys.argv[2].encode())
        finally:
            os.close(fd)
    attempt("daemon_move", move_daemon)
# Opened for writing and closed without a byte written: harmless where it works.
attempt("config_write", lambda: open(config, "a").close())
attempt("trail_write", lambda: open(trail, "r+").close())
if lsm:
    # Where nothing refuses them (no BPF LSM) these would break the test's own daemon.
    attempt("socket_rename", lambda: os.rename(sock, sock + ".x"))
    attempt("pin_unlink", lambda: os.unlink(sys.argv[1]))
sys.stdout.flush()
"#;

#[test]
fn a_root_agent_cannot_reach_the_daemon_its_files_or_its_pins_where_the_kernel_has_bpf_lsm() {
    privileged!();
    let lsm = agentwatch_tests::bpf_lsm();
    let nsdelegate = agentwatch_tests::cgroup2_nsdelegate();
    let mut env = DaemonEnv::new();
    // An alerting breaker: the agent lives through the first refusal and makes the second.
    env.write_config(
        "[[agents]]\nname = \"r\"\nuser = \"root\"\n[agents.breaker]\nwarmup = \"1h\"\n\
         action = \"alert\"\nrequire_approval = true\n",
    );
    env.start();
    // Any pinned object will do: the guard refuses every bpf() call of an agent.
    let link = walk(&env.pin_dir).into_iter().next().expect("a pin");
    let daemon = env.pid().expect("daemon pid");
    let out = env
        .launch_command("r", &["python3", "-c", TRY_AS_ROOT])
        .arg(&link)
        .arg(daemon.to_string())
        .arg(&env.config)
        .arg(&env.audit)
        .arg(&env.socket)
        .arg(if lsm { "1" } else { "0" })
        .arg(if nsdelegate { "1" } else { "0" })
        .arg(env.agent_cgroup("r"))
        .current_dir("/")
        .output()
        .expect("launch");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got: BTreeMap<&str, i32> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    if nsdelegate {
        // Outside its cgroup namespace: the kernel will not move the daemon, LSM or not.
        assert_eq!(got.remove("daemon_move"), Some(libc::ENOENT), "{text}");
        let own = fs::read_to_string(env.agent_cgroup("r").join("cgroup.procs")).expect("procs");
        assert!(
            !own.lines().any(|l| l == daemon.to_string()),
            "the daemon is not in the agent's cgroup"
        );
    }
    if lsm {
        assert_eq!(
            got,
            BTreeMap::from([
                ("bpf", libc::EPERM),
                ("signal", libc::EPERM),
                ("config_write", libc::EACCES),
                ("trail_write", libc::EACCES),
                ("socket_rename", libc::EPERM),
                ("pin_unlink", libc::EPERM),
            ])
        );
        let lines = env.wait_audit("tamper_refused", 6);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert_eq!(lines[0]["what"], "bpf");
        assert_eq!(lines[0]["bpf_cmd"], "BPF_OBJ_GET");
        assert_eq!(lines[1]["what"], "signal");
        assert_eq!(lines[1]["signal"], 0);
        assert_eq!(lines[1]["target_pid"], daemon);
        let files: Vec<(String, String)> = lines[2..]
            .iter()
            .map(|l| {
                assert_eq!(l["what"], "file", "{l}");
                (
                    l["op"].as_str().unwrap_or_default().to_owned(),
                    l["path"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let shown = |p: &std::path::Path| p.display().to_string();
        assert_eq!(
            files,
            [
                ("write".to_owned(), shown(&env.config)),
                ("write".to_owned(), shown(&env.audit)),
                ("rename".to_owned(), shown(&env.socket)),
                ("unlink".to_owned(), shown(&link)),
            ]
        );
        assert!(env.socket.exists() && link.exists());
        let trips = env.wait_audit("breaker_tripped", 1);
        assert_eq!(trips.len(), 1, "once per trip: {trips:#?}");
        assert_eq!(
            (trips[0]["signal"].as_str(), trips[0]["action"].as_str()),
            (Some("tamper"), Some("alert"))
        );
        assert_eq!(env.status()["r"]["escape_attempts"]["tamper_refused"], 6);
    } else {
        // No hook to refuse them here: a root agent opens the pin, the daemon's signal check
        // passes, the config and the trail open for writing (what the README's Security model
        // says a root agent can still do).
        assert_eq!(
            got,
            BTreeMap::from([
                ("bpf", 0),
                ("signal", 0),
                ("config_write", 0),
                ("trail_write", 0)
            ])
        );
        assert!(
            env.audit_lines()
                .iter()
                .all(|l| l["kind"] != "tamper_refused")
        );
        assert_eq!(env.status()["r"]["escape_attempts"]["tamper_refused"], 0);
    }
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// What an agent's uid could write is no file of root's: the daemon will not start on a config
/// anyone may write, nor on a trail another group may write, and a reload of a config made
/// writable rejects it whole (by the file watcher and by `agentwatch reload`): the policy in
/// force stays, the port it would open stays denied. Each message names the path and why.
#[test]
fn files_an_agent_could_write_are_refused_at_start_and_at_reload() {
    privileged!();
    use std::os::unix::fs::PermissionsExt as _;
    let (_a, allowed) = agentwatch_tests::tcp_listener("127.0.0.1:0");
    let (_b, denied) = agentwatch_tests::tcp_listener("127.0.0.1:0");
    let agent =
        |port: u16| format!("[[agents]]\nname = \"a\"\negress = [\"tcp 127.0.0.1 {port}\"]\n");
    let mut env = DaemonEnv::new();
    env.write_config(&agent(allowed));
    let mode = |p: &std::path::Path, m: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).expect("chmod");
    };
    let run = |env: &DaemonEnv| {
        Command::new(agentwatch_bin())
            .args(["run", "--config"])
            .arg(&env.config)
            .output()
            .expect("agentwatch run")
    };
    // A config everyone may write.
    mode(&env.config, 0o666);
    let out = run(&env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "the config {}: everyone may write it (mode 0666); only root may be able to change \
             it (an agent could otherwise)",
            env.config.display()
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mode(&env.config, 0o644);
    // A trail a group other than root's may write (gid 1 on Debian: daemon).
    fs::write(&env.audit, "").expect("trail");
    std::os::unix::fs::chown(&env.audit, Some(0), Some(1)).expect("chown");
    mode(&env.audit, 0o660);
    let out = run(&env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "the audit trail {}: its group (gid 1) may write it (mode 0660)",
            env.audit.display()
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !env.cgroup_parent.join("a").exists(),
        "a refused daemon guards nothing and makes nothing"
    );
    fs::remove_file(&env.audit).expect("rm trail");
    env.start();
    let cg = env.agent_cgroup("a");
    let verdict = |port: u16| {
        let r = agentwatch_tests::one(agentwatch_tests::probe(
            Some(&cg),
            &["connect", "tcp", "127.0.0.1", &port.to_string()],
        ));
        (r.ok, r.errno)
    };
    assert_eq!(verdict(allowed), (true, 0));
    assert_eq!(verdict(denied), (false, libc::EPERM));
    // The rule that would open `denied`, in a file everyone may write, put in place whole
    // (renamed over the config, so the watcher never sees it root's).
    let tmp = env.config.with_extension("new");
    fs::write(&tmp, format!("{}{}", env.daemon_section(), agent(denied))).expect("write");
    mode(&tmp, 0o666);
    fs::rename(&tmp, &env.config).expect("rename");
    let rejected = env.wait_audit("policy_rejected", 1);
    let want = format!("the config {}: everyone may write it", env.config.display());
    assert!(
        rejected[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&want)),
        "{rejected:?}"
    );
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&want),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        verdict(denied),
        (false, libc::EPERM),
        "the old policy stays"
    );
    assert_eq!(verdict(allowed), (true, 0));
    assert!(
        !env.audit_lines()
            .iter()
            .any(|l| l["kind"] == "policy_reloaded"),
        "{:?}",
        env.audit_lines()
    );
    // Root's again: the same file is taken.
    mode(&env.config, 0o644);
    let out = env.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(verdict(denied), (true, 0));
    assert_eq!(verdict(allowed), (false, libc::EPERM));
}

/// A root agent on a cgroup2 mount without `nsdelegate` (this host) can write the daemon's pid
/// into its own `cgroup.procs`: the kernel checks only that it may write there. The daemon
/// finds itself there within a second, writes itself back into its own cgroup, audits
/// `daemon_moved`, and the agent's breaker trips on `tamper` (no breaker: the agent is killed,
/// and the daemon, out by then, is not). The process that wrote the pid dies before its write
/// returns (the escape guard), and the daemon's move back out is not taken for an escape.
/// With `nsdelegate` the kernel refuses the move (`ENOENT`, in the test above).
#[test]
fn a_daemon_moved_into_an_agents_cgroup_moves_itself_back_out() {
    privileged!();
    if agentwatch_tests::cgroup2_nsdelegate() {
        eprintln!("cgroup2 has nsdelegate: the kernel refuses the move (asserted above)");
        return;
    }
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"r\"\nuser = \"root\"\n");
    env.start();
    let daemon = env.pid().expect("daemon pid");
    let own_cgroup = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .expect("cgroup")
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .expect("a cgroup2 line")
    };
    let home = own_cgroup(daemon);
    let agent_cg = env.agent_cgroup("r");
    let (mut child, lines) = ready_shell(
        &env,
        "r",
        &format!(
            "sleep 600 & echo ready; echo {daemon} > {procs}; echo survived",
            procs = agent_cg.join("cgroup.procs").display()
        ),
    );
    let moved = env.wait_audit("daemon_moved", 1);
    assert_eq!(moved.len(), 1, "{moved:#?}");
    let rel = format!(
        "/{}",
        agent_cg
            .strip_prefix(agentwatch::cgroup::cgroup2_mount().expect("mount"))
            .expect("below the mount")
            .display()
    );
    assert_eq!(moved[0]["agent"], "r");
    assert_eq!(moved[0]["cgroup"], rel);
    assert_eq!(moved[0]["moved_back_to"], home);
    assert_eq!(own_cgroup(daemon), home, "back in its own cgroup");
    // The writer died at its write: the launched shell, killed by a signal.
    use std::os::unix::process::ExitStatusExt as _;
    let status = child.wait().expect("waiting for the agent");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    // No breaker: the rest of the agent (its sleep) is killed; the daemon, out by then, lives.
    let trips = env.wait_audit("breaker_tripped", 1);
    assert_eq!(
        (
            trips[0]["agent"].as_str(),
            trips[0]["signal"].as_str(),
            trips[0]["action"].as_str()
        ),
        (Some("r"), Some("tamper"), Some("kill"))
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.is_empty(), "nothing more from the agent: {rest:?}");
    let rows = env.status();
    assert_eq!(rows["r"]["processes"], 0);
    assert_eq!(rows["r"]["escape_attempts"]["daemon_moved"], 1);
    assert_eq!(
        env.metric("agentwatch_escape_attempts_total{agent=\"r\",kind=\"daemon_moved\"}"),
        Some(1.0)
    );
    assert!(
        fs::metadata(format!("/proc/{daemon}")).is_ok(),
        "the daemon runs"
    );
    env.verify_audit();
}

/// What an agent tries on the daemon's /proc entries: `python3 -c PEEK DAEMON_PID`; prints one
/// JSON object, attempt -> errno (0: it worked).
const PEEK: &str = r#"
d = int(sys.argv[1])
def sc(*a):
    r = libc.syscall(*a)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
attempt("cmdline", lambda: open(f"/proc/{d}/cmdline", "rb").read())
attempt("environ", lambda: open(f"/proc/{d}/environ", "rb").read())
attempt("mem", lambda: open(f"/proc/{d}/mem", "rb").close())
attempt("maps", lambda: open(f"/proc/{d}/maps", "rb").read())
attempt("fd_list", lambda: os.listdir(f"/proc/{d}/fd"))
attempt("fd_link", lambda: os.readlink(f"/proc/{d}/fd/2"))
attempt("fd_open", lambda: open(f"/proc/{d}/fd/2", "rb").close())
def ptrace():
    if libc.ptrace(16, d, None, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("ptrace", ptrace)
pidfd = sc(434, d, 0)
attempt("pidfd_getfd", lambda: os.close(sc(438, pidfd, 2, 0)))
print(json.dumps(out))
"#;

/// The daemon's memory, environment, descriptors and maps are out of every agent's reach: a
/// default-launched agent (another uid) and a `user = "root"` one (no CAP_SYS_PTRACE, and fewer
/// capabilities than the daemon, so the kernel's ptrace check refuses it too) read its command
/// line and nothing else of it.
#[test]
fn the_daemons_proc_entries_are_private_to_every_agent() {
    privileged!();
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"plain\"\n\n[[agents]]\nname = \"r\"\nuser = \"root\"\n");
    env.start();
    let daemon = env.pid().expect("daemon pid").to_string();
    let (eacces, eperm) = (libc::EACCES, libc::EPERM);
    for (agent, fd_list) in [("plain", eacces), ("r", 0)] {
        let out = env
            .launch_command(agent, &["python3", "-c", &python(PEEK), &daemon])
            .current_dir("/")
            .output()
            .expect("launch");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{agent}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: BTreeMap<String, i32> = serde_json::from_str(text.trim()).expect("report");
        let want: BTreeMap<String, i32> = [
            ("cmdline", 0),
            ("environ", eacces),
            ("mem", eacces),
            ("maps", eacces),
            // Root reads the folder (CAP_DAC_READ_SEARCH): the numbers, not what they are.
            ("fd_list", fd_list),
            ("fd_link", eacces),
            ("fd_open", eacces),
            ("ptrace", eperm),
            ("pidfd_getfd", eperm),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(got, want, "{agent}");
    }
    assert!(fs::metadata(format!("/proc/{daemon}")).is_ok());
}

/// A fork bomb in a default-launched agent (every process forks two more, down to a depth:
/// 2,047 processes on the host, 255 in a guest under TCG) is killed whole by the kill switch
/// while it may still be growing: every process of it dead, none left in the cgroup, and the
/// daemon answering `status` all along.
#[test]
fn a_fork_bomb_is_killed_whole_and_the_daemon_answers_throughout() {
    privileged!();
    let depth = if agentwatch_tests::time_scale() > 1 {
        7
    } else {
        10
    };
    let total = (1u64 << (depth + 1)) - 1;
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"bomb\"\n");
    env.start();
    let mut child = env.launch_command("bomb", &["/bin/sh", "-c"])
        .arg(format!(
            "f() {{ if [ $1 -gt 0 ]; then (f $(($1 - 1))) & (f $(($1 - 1))) & fi; exec sleep 600; }}; f {depth}"
        ))
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launching the bomb");
    let cg = agentwatch::cgroup::Cgroup::open(env.agent_cgroup("bomb")).expect("cgroup");
    let count = || cg.all_pids().map_or(0, |p| p.len() as u64);
    // The daemon answers while it grows: each status within seconds (a hang bound only).
    let mut slowest = Duration::ZERO;
    wait_until(
        "the bomb to reach half its size",
        Duration::from_secs(60),
        || {
            let t = std::time::Instant::now();
            let rows = env.status();
            slowest = slowest.max(t.elapsed());
            assert!(rows.contains_key("bomb"));
            count() >= total / 2
        },
    );
    assert!(
        slowest < patience(Duration::from_secs(5)),
        "status took {slowest:?}"
    );
    let seen = count();
    let t = std::time::Instant::now();
    let out = env.cli(&["kill", "bomb"]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(), 0, "nothing of the bomb is left");
    let killed = env.wait_audit("killed", 1);
    let n = killed[0]["processes"].as_u64().expect("processes");
    assert!(
        (seen..=total).contains(&n),
        "killed {n}: at least the {seen} seen, at most the bomb's {total}"
    );
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        child.wait().expect("wait").signal(),
        Some(libc::SIGKILL),
        "the launched shell"
    );
    eprintln!(
        "fork bomb: {seen} of {total} processes when the kill began, {n} killed in {took:?}; \
         slowest status meanwhile {slowest:?}"
    );
    assert_eq!(env.status()["bomb"]["processes"], 0);
}
