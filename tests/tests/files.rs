//! The file guard (`[agents.files]`), as an agent that wants out meets it: a read outside the
//! list, a write under a read-only prefix, a symlink planted in its own writable directory that
//! points outside. Where the kernel has BPF LSM (the Debian guests of `cargo xtask vmtest`)
//! each open fails with EACCES in the kernel; where it has not (this project's CI host), the
//! opens happen, the daemon finds each one, audits it and runs the breaker's action. Which of
//! the two the test expects comes from the kernel's LSM list, read here, not from the daemon.

use std::{
    fs,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use agentwatch::bpf::load::bpf_lsm_active;
use agentwatch_tests::{DaemonEnv, TempDir, parse_attempts, patience, privileged, wait_until};

const EACCES: i32 = libc::EACCES;

/// The prefixes every guarded test agent needs besides its own directories: its libraries,
/// and (below, added per test) the directory of aw-probe, which `launch` execs inside the
/// agent: with BPF LSM an exec opens the binary through `file_open` like any read.
const BASE: &str = r#""/usr/:ro", "/lib/:ro", "/lib64/:ro", "/etc/:ro", "/dev/", "/proc/""#;

fn agent(name: &str, allow: &[&Path], ro: &[&Path], breaker: &str) -> String {
    let mut list = BASE.to_owned();
    let probe = agentwatch_tests::probe_bin();
    let bin_dir = probe.parent().expect("aw-probe's directory");
    list.push_str(&format!(", \"{}/:ro\"", bin_dir.display()));
    for p in allow {
        list.push_str(&format!(", \"{}/\"", p.display()));
    }
    for p in ro {
        list.push_str(&format!(", \"{}/:ro\"", p.display()));
    }
    format!(
        "[[agents]]\nname = \"{name}\"\negress = []\n{breaker}\n[agents.files]\nallow = [{list}]\n"
    )
}

/// Without BPF LSM: waits for the breaker's `n`th trip (a detection) and approves the agent,
/// as a human would, so that it can be launched into again.
fn approve_after_trips(env: &DaemonEnv, lsm: bool, n: usize) {
    if lsm {
        return;
    }
    let trips = env.wait_audit("breaker_tripped", n);
    assert_eq!(trips.len(), n, "{trips:#?}");
    let out = env.cli(&["approve", "fs"]);
    assert!(out.status.success(), "{out:?}");
}

/// A file `secret` holding "secret" in `dir`, outside every agent's list.
fn secret_in(dir: &TempDir) -> PathBuf {
    let secret = dir.0.join("secret");
    anyone_may_write(&secret, "secret");
    secret
}

/// Writes `text` to `path`, mode 0666: the agents are not root, and what must refuse them here
/// is agentwatch's guard, not the file's mode (nor, for a hard link, the kernel's
/// protected_hardlinks, which lets a user link only what it may read and write).
fn anyone_may_write(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod");
}

fn file_lines(env: &DaemonEnv) -> Vec<serde_json::Value> {
    env.audit_lines()
        .into_iter()
        .filter(|l| l["kind"] == "file_denied")
        .collect()
}

#[test]
fn opens_outside_the_list_are_refused_or_found_and_every_one_audited() {
    privileged!();
    let lsm = bpf_lsm_active();
    let (work, ro, outside) = (
        TempDir::for_agents(),
        TempDir::for_agents(),
        TempDir::for_agents(),
    );
    anyone_may_write(&ro.0.join("config"), "ro");
    let secret = secret_in(&outside);
    let (link, planted) = (work.0.join("link"), work.0.join("new"));
    let mut env = DaemonEnv::new();
    // A breaker that never trips on rates (an hour of warm-up) and only alerts: the probe
    // lives through every detection, so each open is made and judged.
    let breaker = "[agents.breaker]\nwarmup = \"1h\"\naction = \"alert\"\nrequire_approval = true";
    env.write_config(&agent("fs", &[&work.0], &[&ro.0], breaker));
    env.start();

    let check = env.cli(&["check", "--config", &env.config.display().to_string()]);
    let check = String::from_utf8_lossy(&check.stdout);
    let want = if lsm {
        "files on this host: enforced"
    } else {
        "files on this host: detected"
    };
    assert!(check.contains(want), "check said: {check}");
    let status = env.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status");
    let mode = status["guards"]["files"].as_str().unwrap_or_default();
    assert!(
        mode.starts_with(if lsm { "enforced" } else { "detected" }),
        "{mode}"
    );
    assert_eq!(status["agents"][0]["files"], status["guards"]["files"]);

    let out = env.launch_probe(
        "fs",
        &[
            "open",
            &work.0.join("a").display().to_string(),
            "create",
            &ro.0.join("config").display().to_string(),
            "read",
            &ro.0.join("config").display().to_string(),
            "write",
            &secret.display().to_string(),
            "read",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let opens = parse_attempts(&out.stdout);
    let results: Vec<(bool, i32)> = opens.iter().map(|a| (a.ok, a.errno)).collect();
    if lsm {
        assert_eq!(
            results,
            [(true, 0), (true, 0), (false, EACCES), (false, EACCES)]
        );
    } else {
        assert_eq!(results, [(true, 0); 4], "without BPF LSM the opens happen");
    }
    // Without BPF LSM the first detection opened the breaker (alert): a human approves.
    approve_after_trips(&env, lsm, 1);
    // The agent plants a symlink in its own writable directory and reads through it.
    let out = env.launch_probe(
        "fs",
        &[
            "symlink",
            &secret.display().to_string(),
            &link.display().to_string(),
        ],
    );
    let made = parse_attempts(&out.stdout);
    assert!(made.first().is_some_and(|a| a.ok), "{out:?}");
    let out = env.launch_probe("fs", &["open", &link.display().to_string(), "read"]);
    let through = parse_attempts(&out.stdout);
    assert_eq!(
        (through[0].ok, through[0].errno),
        if lsm { (false, EACCES) } else { (true, 0) },
        "through the symlink"
    );

    approve_after_trips(&env, lsm, 2);
    let pid = opens[0].pid;
    wait_until(
        "three file_denied lines",
        patience(std::time::Duration::from_secs(10)),
        || file_lines(&env).len() >= 3,
    );
    let lines = file_lines(&env);
    let ro_file = ro.0.join("config").display().to_string();
    let secret_s = secret.display().to_string();
    assert_eq!(
        lines
            .iter()
            .map(|l| (
                l["path"].as_str().unwrap_or_default(),
                l["access"].as_str().unwrap_or_default()
            ))
            .collect::<Vec<_>>(),
        vec![
            (ro_file.as_str(), "write"),
            (secret_s.as_str(), "read"),
            (secret_s.as_str(), "read"),
        ],
        "{lines:#?}"
    );
    for l in &lines {
        assert_eq!(l["agent"], "fs");
        assert_eq!(l["enforced"], lsm);
        assert_eq!(l["comm"], "aw-probe");
    }
    assert_eq!(lines[0]["pid"], pid);
    assert_eq!(lines[2]["pid"], through[0].pid);
    let trips: Vec<_> = env
        .audit_lines()
        .into_iter()
        .filter(|l| l["kind"] == "breaker_tripped")
        .collect();
    if lsm {
        assert!(trips.is_empty(), "refused opens need no action: {trips:#?}");
    } else {
        // One trip per probe: the first detection opens the breaker (require_approval), the
        // secret's read after it in the same probe is audited without acting again.
        assert_eq!(trips.len(), 2, "{trips:#?}");
        for t in &trips {
            assert_eq!(
                (t["signal"].as_str(), t["action"].as_str()),
                (Some("files"), Some("alert"))
            );
        }
    }
    assert_eq!(env.status()["fs"]["files_denied"], 3);
    let text = env.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    let want = if lsm {
        "files: 3 denied, enforced"
    } else {
        "files: 3 denied, detected"
    };
    assert!(text.contains(want), "{text}");
    assert_eq!(
        env.metric("agentwatch_files_denied_total{agent=\"fs\"}"),
        Some(3.0)
    );

    // A reload that lists the outside directory read-only lets the same read through, still
    // refuses a write there, and the planted file in the writable directory stays fine.
    env.write_config(&agent("fs", &[&work.0], &[&ro.0, &outside.0], breaker));
    wait_until(
        "the reload",
        patience(std::time::Duration::from_secs(10)),
        || {
            env.audit_lines()
                .iter()
                .any(|l| l["kind"] == "policy_reloaded")
        },
    );
    let out = env.launch_probe(
        "fs",
        &[
            "open",
            &secret_s,
            "read",
            &planted.display().to_string(),
            "create",
            &secret_s,
            "write",
        ],
    );
    let after: Vec<(bool, i32)> = parse_attempts(&out.stdout)
        .iter()
        .map(|a| (a.ok, a.errno))
        .collect();
    if lsm {
        assert_eq!(after, [(true, 0), (true, 0), (false, EACCES)]);
    } else {
        assert_eq!(after, [(true, 0); 3]);
    }
    wait_until(
        "the write's line",
        patience(std::time::Duration::from_secs(10)),
        || file_lines(&env).len() >= 4,
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let lines = file_lines(&env);
    assert_eq!(lines.len(), 4, "only the write is outside now: {lines:#?}");
    assert_eq!(
        (lines[3]["path"].as_str(), lines[3]["access"].as_str()),
        (Some(secret_s.as_str()), Some("write"))
    );
    // Opened for writing (detected) or refused, the secret was not written to.
    assert_eq!(fs::read_to_string(&secret).expect("secret"), "secret");
    env.verify_audit();
}

#[test]
fn without_a_breaker_an_open_outside_costs_the_agent_its_processes_or_is_refused() {
    privileged!();
    let lsm = bpf_lsm_active();
    let (work, outside) = (TempDir::for_agents(), TempDir::for_agents());
    let secret = secret_in(&outside);
    let mut env = DaemonEnv::new();
    env.write_config(&agent("nobreaker", &[&work.0], &[], ""));
    env.start();
    // The probe holds the file open for a minute: killed long before, or refused at once.
    let started = std::time::Instant::now();
    let out = env
        .probe_command("nobreaker")
        .args(["open", &secret.display().to_string(), "read", "60000"])
        .stderr(Stdio::piped())
        .output()
        .expect("launch");
    let took = started.elapsed();
    let opens = parse_attempts(&out.stdout);
    if lsm {
        assert!(out.status.success(), "{out:?}");
        assert_eq!((opens[0].ok, opens[0].errno), (false, EACCES));
    } else {
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
        // The kill may come before the probe prints that its open succeeded.
        assert!(opens.iter().all(|a| a.ok), "{opens:?}");
        assert!(
            took < patience(std::time::Duration::from_secs(10)),
            "killed after {took:?}"
        );
        let trips = env.wait_audit("breaker_tripped", 1);
        assert_eq!(
            (trips[0]["signal"].as_str(), trips[0]["action"].as_str()),
            (Some("files"), Some("kill"))
        );
        // The agent is held killed until approved, like any breaker kill.
        assert_eq!(env.status()["nobreaker"]["state"], "tripped");
    }
    let lines = env.wait_audit("file_denied", 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["path"], secret.display().to_string());
    assert_eq!(lines[0]["enforced"], lsm);
    assert_eq!(env.status()["nobreaker"]["files_denied"], 1);
}

/// A hard link in the agent's own directory to a file outside gives that file an allowed
/// path: with BPF LSM the agent may make no hard link at all (EPERM, audited as access
/// `link`). Without it the link is made and reads through it are not judged, as `status`
/// says ("hard links not judged"): this asserts that limit, so a change to it is noticed.
#[test]
fn a_hard_link_to_an_outside_file_is_refused_where_the_kernel_can() {
    privileged!();
    let lsm = bpf_lsm_active();
    let (work, outside) = (TempDir::for_agents(), TempDir::for_agents());
    let secret = secret_in(&outside);
    let hard = work.0.join("hard");
    let mut env = DaemonEnv::new();
    env.write_config(&agent("linker", &[&work.0], &[], ""));
    env.start();
    let out = env.launch_probe(
        "linker",
        &[
            "hardlink",
            &secret.display().to_string(),
            &hard.display().to_string(),
        ],
    );
    let made = parse_attempts(&out.stdout);
    assert_eq!(made.len(), 1, "{out:?}");
    if lsm {
        assert_eq!((made[0].ok, made[0].errno), (false, libc::EPERM));
        assert!(!hard.exists());
        let lines = env.wait_audit("file_denied", 1);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(
            (lines[0]["access"].as_str(), lines[0]["enforced"].as_bool()),
            (Some("link"), Some(true))
        );
        assert_eq!(env.status()["linker"]["files_denied"], 1);
    } else {
        assert_eq!((made[0].ok, made[0].errno), (true, 0));
        assert!(hard.exists());
        let modes = env.cli(&["status", "--json"]);
        assert!(String::from_utf8_lossy(&modes.stdout).contains("hard links not judged"));
    }
}

#[test]
fn agents_without_a_file_list_and_processes_outside_agents_are_untouched() {
    privileged!();
    let outside = TempDir::for_agents();
    let secret = secret_in(&outside);
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[[agents]]\nname = \"free\"\negress = []\n{}",
        agent("guarded", &[], &[], "")
    ));
    env.start();
    let s = secret.display().to_string();
    let out = env.launch_probe("free", &["open", &s, "read", &s, "write"]);
    let r: Vec<(bool, i32)> = parse_attempts(&out.stdout)
        .iter()
        .map(|a| (a.ok, a.errno))
        .collect();
    assert_eq!(r, [(true, 0), (true, 0)]);
    // The daemon's own reads (and this test's) are not an agent's.
    assert_eq!(fs::read_to_string(&secret).expect("read"), "secret");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(file_lines(&env).is_empty(), "{:#?}", file_lines(&env));
    assert_eq!(env.status()["free"]["files_denied"], 0);
    assert_eq!(env.status()["free"]["files"], serde_json::Value::Null);
}

/// The file guard's programs run on every open of the host: attached while some agent has a
/// file list, detached when none has (and pinned meanwhile, like every program).
#[test]
fn the_file_guard_is_attached_only_while_an_agent_needs_it() {
    privileged!();
    let work = TempDir::for_agents();
    let mut env = DaemonEnv::new();
    env.write_config("[[agents]]\nname = \"fs\"\negress = []\n");
    env.start();
    let pin = env
        .pin_dir
        .join("links")
        .join("_host")
        .join(if bpf_lsm_active() {
            "files_file_open"
        } else {
            "files_sys_enter_openat"
        });
    assert!(!pin.exists(), "no agent has a file list yet");
    env.write_config(&agent("fs", &[&work.0], &[], ""));
    wait_until(
        "the guard attached",
        patience(std::time::Duration::from_secs(10)),
        || pin.exists(),
    );
    // A restart adopts it (the agent's opens stay judged throughout).
    env.stop_with(libc::SIGTERM);
    assert!(pin.exists(), "pinned: it outlives the daemon");
    env.start();
    assert!(pin.exists());
    env.write_config("[[agents]]\nname = \"fs\"\negress = []\n");
    wait_until(
        "the guard detached",
        patience(std::time::Duration::from_secs(10)),
        || !pin.exists(),
    );
}

#[test]
fn a_bad_file_list_is_refused_whole_and_the_old_policy_stays() {
    privileged!();
    let work = TempDir::for_agents();
    let mut env = DaemonEnv::new();
    env.write_config(&agent("fs", &[&work.0], &[], ""));
    env.start();
    for bad in ["\"relative/\"", "\"/a/../etc/\"", "\"/a//b\""] {
        env.write_config(&format!(
            "[[agents]]\nname = \"fs\"\negress = []\n[agents.files]\nallow = [{bad}]\n"
        ));
        let out = env.cli(&["check", "--config", &env.config.display().to_string()]);
        assert!(!out.status.success(), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("files.allow entry"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    wait_until(
        "a rejected reload",
        patience(std::time::Duration::from_secs(10)),
        || {
            env.audit_lines()
                .iter()
                .any(|l| l["kind"] == "policy_rejected")
        },
    );
    // The old list still holds: the work directory is writable.
    let out = env.launch_probe(
        "fs",
        &["open", &work.0.join("x").display().to_string(), "create"],
    );
    assert!(parse_attempts(&out.stdout)[0].ok, "{out:?}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(file_lines(&env).is_empty());
}

/// The agent blocks in an open of a FIFO outside its list, and while it waits (the kernel has
/// read the path by then) it unmaps the page the path was in. Without BPF LSM the exit
/// tracepoint then cannot read the path (no page faults there): the open must still be found
/// and named, by the file its fd holds, not taken for an open of `/` (what it was before: a
/// CI run met this by chance, reclaim unmapping the page of a path bash had passed, and the
/// breaker killed a harmless agent). With BPF LSM the open is refused before it blocks.
#[test]
fn an_open_whose_path_page_is_unmapped_meanwhile_is_named_by_its_fd() {
    use std::{
        io::{BufRead as _, BufReader},
        os::unix::fs::OpenOptionsExt as _,
    };
    privileged!();
    let lsm = bpf_lsm_active();
    let (work, outside) = (TempDir::for_agents(), TempDir::for_agents());
    let fifo = outside.0.join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.display().to_string()).expect("path");
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o666) }, 0, "mkfifo");
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&fifo, fs::Permissions::from_mode(0o666)).expect("chmod");
    }
    let mut env = DaemonEnv::new();
    env.write_config(&agent("fd", &[&work.0], &[], ""));
    env.start();
    // The path lives in a page of its own, passed to open() by address from a thread; the
    // main thread waits until that thread sleeps in openat (257), then drops the page.
    const SCRIPT: &str = r#"
import ctypes, mmap, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
page = mmap.mmap(-1, mmap.PAGESIZE)
page.write(sys.argv[1].encode() + b"\0")
addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
got = {}
def opener():
    got["tid"] = threading.get_native_id()
    fd = libc.open(ctypes.c_void_p(addr), os.O_RDONLY)
    got["fd"] = (fd, ctypes.get_errno())
t = threading.Thread(target=opener)
t.start()
while "fd" not in got:
    tid = got.get("tid")
    if tid:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/self/task/{tid}/syscall") as f:
                nr = f.read().split()[0]
        except OSError:
            # The thread has ended: its open was refused at once (BPF LSM).
            continue
        if state == "S" and nr == "257":
            break
    time.sleep(0.01)
page.madvise(mmap.MADV_DONTNEED)
print("ready", flush=True)
t.join()
print("open", *got["fd"], flush=True)
sys.stdin.read()
"#;
    let mut child = env
        .launch_command(
            "fd",
            &[
                "/usr/bin/python3",
                "-I",
                "-c",
                SCRIPT,
                &fifo.display().to_string(),
            ],
        )
        .current_dir(&work.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    if first.is_empty() {
        let out = child.wait_with_output().expect("wait");
        panic!("the agent said nothing: {out:?}");
    }
    if lsm {
        assert_eq!(first, "ready");
        assert_eq!(
            lines.next().and_then(Result::ok).unwrap_or_default(),
            format!("open -1 {EACCES}")
        );
    } else {
        assert_eq!(first, "ready");
        // The writer's end, from outside the agent: the agent's open returns.
        let _writer = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open the FIFO for writing");
        // The breaker kills the agent for the open it found.
        let trips = env.wait_audit("breaker_tripped", 1);
        assert_eq!(trips[0]["signal"], "files", "{trips:#?}");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    if !lsm {
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    }
    let lines = env.wait_audit("file_denied", 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["path"], fifo.display().to_string(), "{lines:#?}");
    assert_eq!(lines[0]["access"], "read");
    assert_eq!(lines[0]["enforced"], lsm);
    // Without LSM the name came from the fd: proof that the kernel's read of the path failed
    // here, as the test means it to.
    let from = if lsm { None } else { Some("fd") };
    assert_eq!(lines[0]["path_from"].as_str(), from, "{lines:#?}");
}

#[test]
fn a_path_another_thread_rewrites_during_the_open_neither_hides_nor_invents_an_open() {
    use std::io::{BufRead as _, BufReader};
    privileged!();
    let lsm = bpf_lsm_active();
    let (work, outside) = (TempDir::for_agents(), TempDir::for_agents());
    let real = secret_in(&outside);
    // The decoy: an allowed file whose path is exactly as long as the secret's.
    let pad = real.as_os_str().len() - work.0.as_os_str().len() - 1;
    assert!(pad > 0, "{}", real.display());
    let decoy = work.0.join("d".repeat(pad));
    anyone_may_write(&decoy, "decoy");
    let mut env = DaemonEnv::new();
    let breaker = "[agents.breaker]\nwarmup = \"1h\"\naction = \"alert\"\nrequire_approval = true";
    // The decoy's folder read-only: a clean path read there is what the open tracepoints once
    // cleared by its string, read after the kernel's own read.
    env.write_config(&agent("race", &[], &[&work.0], breaker));
    env.start();
    const OPENS: u32 = 40;
    let mut child = env
        .probe_command("race")
        .args([
            "open-race",
            &real.display().to_string(),
            &decoy.display().to_string(),
            &OPENS.to_string(),
        ])
        .current_dir(&work.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("launch");
    let first = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .next()
        .and_then(Result::ok)
        .unwrap_or_default();
    let got: serde_json::Value = match serde_json::from_str(&first) {
        Ok(v) => v,
        Err(e) => {
            let out = child.wait_with_output();
            panic!("the probe said {first:?} ({e}): {out:?}")
        }
    };
    let n = |k: &str| got[k].as_u64().expect("count");
    let (real_opens, decoy_opens, refused) = (n("real"), n("decoy"), n("refused"));
    println!("{got}");
    assert_eq!(
        real_opens + decoy_opens + refused + n("missing"),
        u64::from(OPENS),
        "{got}"
    );
    // With BPF LSM every open of the secret was refused; without, made and to be found.
    let want = if lsm {
        assert_eq!(real_opens, 0, "{got}");
        refused
    } else {
        assert_eq!(refused, 0, "{got}");
        real_opens
    };
    let want = usize::try_from(want).expect("count");
    env.wait_audit("file_denied", want);
    // Whatever the caller's memory said at the exit, each open is judged on the file the
    // kernel opened: every secret open is audited under the secret's name, and no decoy open
    // is invented into one. A moment more for a line too many to show.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let lines = file_lines(&env);
    assert_eq!(lines.len(), want, "{got} {lines:#?}");
    for l in &lines {
        assert_eq!(l["path"], real.display().to_string(), "{lines:#?}");
        assert_eq!(l["access"], "read");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_pipe_reopened_through_its_fd_path_is_no_file_access() {
    privileged!();
    let work = TempDir::for_agents();
    let mut env = DaemonEnv::new();
    // No breaker: an open judged outside the list would kill the agent (or, with BPF LSM,
    // fail).
    env.write_config(&agent("pipes", &[&work.0], &[], ""));
    env.start();
    // `cat` opens a pipe it holds by its /proc link, as it does for process substitution's
    // /dev/fd/63 or for /dev/stdin (links there; the 6.1 guest's /dev has neither, and its
    // bash then has no process substitution). The opens reach the kernel's pipe filesystem,
    // which no path leads to: nothing to judge, whatever the list says.
    let out = env
        .launch_command(
            "pipes",
            &[
                "/usr/bin/bash",
                "-c",
                "echo one | /usr/bin/cat /proc/self/fd/0 \
                 && echo two | { /usr/bin/cat /proc/self/fd/3; } 3<&0",
            ],
        )
        .current_dir(&work.0)
        .stdin(Stdio::null())
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
    // A moment for a line that should not come.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(file_lines(&env), Vec::<serde_json::Value>::new());
    assert_eq!(env.status()["pipes"]["state"], "running");
}

/// An O_PATH descriptor reads and writes nothing: opening one outside the list is no file
/// access (BPF LSM's file_open is not even called for it), but reading its file through its
/// /proc link is, and is judged by the file behind it. glibc's user lookup for a uid with no
/// /etc/passwd entry (the uid `launch` gives) walks "/", "run", "usr" so with O_PATH
/// (nss-systemd): bash does that lookup at start when SHELL or HOME is unset, as in CI.
#[test]
fn path_only_opens_are_no_file_access_but_a_read_through_one_is() {
    privileged!();
    let lsm = bpf_lsm_active();
    let (work, outside) = (TempDir::for_agents(), TempDir::for_agents());
    let secret = secret_in(&outside);
    let mut env = DaemonEnv::new();
    env.write_config(&agent("opath", &[&work.0], &[], ""));
    env.start();
    let out = env
        .launch_command("opath", &["/usr/bin/bash", "-c", "echo started"])
        .env_remove("SHELL")
        .env_remove("HOME")
        .current_dir(&work.0)
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    let outside_dir = outside.0.display().to_string();
    let out = env
        .probe_command("opath")
        .args(["open", "/", "path", &outside_dir, "path"])
        .current_dir(&work.0)
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    let opens = parse_attempts(&out.stdout);
    assert_eq!(opens.iter().filter(|a| a.ok).count(), 2, "{opens:?}");
    // A moment for a line that should not come.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(file_lines(&env), Vec::<serde_json::Value>::new());
    assert_eq!(env.status()["opath"]["state"], "running");

    // Now the secret's content through an O_PATH descriptor of it: refused, or found and the
    // agent's processes ended (no breaker).
    let out = env
        .probe_command("opath")
        .args(["open", &secret.display().to_string(), "path-read", "60000"])
        .current_dir(&work.0)
        .output()
        .expect("launch");
    let opens = parse_attempts(&out.stdout);
    if lsm {
        assert!(out.status.success(), "{out:?}");
        assert_eq!(opens.len(), 2, "{opens:?}");
        assert!(opens[0].ok, "{opens:?}");
        assert_eq!((opens[1].ok, opens[1].errno), (false, EACCES));
    } else {
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    }
    let lines = env.wait_audit("file_denied", 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["path"], secret.display().to_string());
    assert_eq!(lines[0]["access"], "read");
    assert_eq!(lines[0]["enforced"], lsm);
}
