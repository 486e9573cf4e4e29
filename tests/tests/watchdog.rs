//! Enforcement that notices being switched off (issue 21, point 4): a link of an agent detached
//! from under the running daemon (BPF_OBJ_GET on its pin, then BPF_LINK_DETACH, as anyone who
//! can open the pins could) is attached again within seconds, audited and trips the agent's
//! breaker; a restarted daemon says how the last one ended and after how long; the denied calls
//! an agent made while no daemon ran are judged by its breaker at restart; a link that went
//! while no daemon ran is found missing at restart. Every test runs its own daemon.

use std::{
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agentwatch::cgroup::Cgroup;
use agentwatch_tests::{
    DaemonEnv, EPERM, one, patience, privileged, probe, tcp_listener, time_scale, wait_until,
};
use serde_json::Value;

/// bpf(2) commands (linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`, valid for the call;
    // the kernel reads at most size_of::<T>() bytes of it (and writes through its pointers).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An fd of the object pinned at `path` (BPF_OBJ_GET), as a hostile process would get it.
fn obj_get(path: &Path) -> OwnedFd {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let fd = bpf(
        BPF_OBJ_GET,
        &mut ObjGet {
            pathname: name.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        },
    )
    .unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", path.display()));
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

/// BPF_LINK_DETACH on the link open at `fd`.
fn link_detach(fd: &OwnedFd) -> io::Result<()> {
    #[repr(C)]
    struct Detach {
        link_fd: u32,
    }
    bpf(
        BPF_LINK_DETACH,
        &mut Detach {
            link_fd: u32::try_from(fd.as_raw_fd()).expect("fd"),
        },
    )
    .map(drop)
}

/// (link id, cgroup id) of the cgroup link open at `fd`, from the kernel's bpf_link_info
/// (cgroup id 0: detached).
fn link_info(fd: &OwnedFd) -> (u32, u64) {
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _rest: [u32; 5],
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info::default();
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut InfoByFd {
            bpf_fd: u32::try_from(fd.as_raw_fd()).expect("fd"),
            info_len: u32::try_from(std::mem::size_of::<Info>()).expect("size"),
            info: std::ptr::from_mut(&mut info) as u64,
        },
    )
    .expect("BPF_OBJ_GET_INFO_BY_FD");
    assert_eq!(info.link_type, 3, "a cgroup link (BPF_LINK_TYPE_CGROUP)");
    (info.id, info.cgroup_id)
}

/// The pins in `dir`, sorted.
fn pins(dir: &Path) -> Vec<PathBuf> {
    let mut pins: Vec<PathBuf> = fs::read_dir(dir)
        .expect("pin folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    pins.sort();
    pins
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn lines_of(env: &DaemonEnv, kind: &str) -> Vec<Value> {
    env.audit_lines()
        .into_iter()
        .filter(|l| l["kind"] == kind)
        .collect()
}

/// One TCP connect to 127.0.0.1:`port` from a process put in `cgroup` by the test (root, but
/// in the agent's cgroup: its programs judge it; `launch` is refused for a tripped agent and
/// needs a daemon). (ok, errno).
fn connect_from(cgroup: &Path, port: u16) -> (bool, i32) {
    let a = one(probe(
        Some(cgroup),
        &["connect", "tcp", "127.0.0.1", &port.to_string()],
    ));
    (a.ok, a.errno)
}

/// An agent allowed `allowed` only, with a breaker that never trips on its own here (a long
/// warmup) and whose action changes nothing the kernel enforces (alert): what refuses a call
/// after a trip is then the agent's programs, not a deny-all.
fn alert_agent(name: &str, allowed: u16) -> String {
    format!(
        "[[agents]]\nname = \"{name}\"\negress = [\"tcp 127.0.0.1 {allowed}\"]\n\
         [agents.breaker]\nwarmup = \"10m\"\nwindow = \"1s\"\naction = \"alert\"\n\
         require_approval = true\n"
    )
}

#[test]
fn links_detached_under_a_running_daemon_are_attached_again_audited_and_trip_the_breaker() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_d, denied) = tcp_listener("127.0.0.1:0");
    // A hostname rule, so the agent has every link there is (the DNS hooks too); the name is
    // never looked up.
    let server = agentwatch_tests::dns::TestDnsServer::start([]);
    let config = alert_agent("guarded", allowed)
        .replace("egress = [", "egress = [\"tcp api.agentwatch.test 443\", ");
    let env = agentwatch_tests::dns::start_daemon(&server, &config);
    let cg = env.agent_cgroup("guarded");
    let cgroup_id = Cgroup::open(&cg).expect("agent cgroup").id().expect("id");
    assert_eq!(connect_from(&cg, denied), (false, EPERM), "guarded");
    assert_eq!(connect_from(&cg, allowed), (true, 0), "guarded");

    // A process outside the agent, root, switches every link of the agent off through its pin.
    // It keeps its fds: the detached links live on as objects, attached to nothing.
    let dir = env.agent_link_dir("guarded");
    let pinned = pins(&dir);
    assert_eq!(pinned.len(), 11, "{pinned:?}");
    let mut held = Vec::new();
    for pin in &pinned {
        let fd = obj_get(pin);
        let (id, attached_to) = link_info(&fd);
        assert_eq!(attached_to, cgroup_id, "{}", pin.display());
        link_detach(&fd).unwrap_or_else(|e| panic!("BPF_LINK_DETACH {}: {e}", pin.display()));
        assert_eq!(link_info(&fd), (id, 0), "detached: {}", pin.display());
        held.push((file_name(pin), id, fd));
    }

    // Within a sweep or two, each is attached again, pinned where it was, and audited.
    let restored = env.wait_audit("guard_restored", pinned.len());
    assert_eq!(restored.len(), pinned.len(), "{restored:#?}\n{}", env.log());
    let mut programs: Vec<String> = restored
        .iter()
        .map(|l| l["program"].as_str().expect("program").to_owned())
        .collect();
    programs.sort();
    let mut names: Vec<String> = pinned.iter().map(|p| file_name(p)).collect();
    names.sort();
    assert_eq!(programs, names);
    for line in &restored {
        let (_, old, _) = held
            .iter()
            .find(|(n, _, _)| line["program"] == n.as_str())
            .expect("a detached link");
        assert_eq!(line["agent"], "guarded", "{line}");
        assert_eq!(line["found"], "detached", "{line}");
        assert_eq!(line["old_link_id"], *old, "{line}");
        let new = line["link_id"].as_u64().expect("link_id");
        assert_ne!(new, u64::from(*old), "{line}");
        // The pin holds the new link, attached to the agent's cgroup.
        let pin = dir.join(line["program"].as_str().expect("program"));
        assert_eq!(
            link_info(&obj_get(&pin)),
            (u32::try_from(new).expect("id"), cgroup_id),
            "{line}"
        );
        assert!(line.get("at_start").is_none(), "{line}");
    }
    // The detached links stay detached (the hostile process still holds them).
    for (name, id, fd) in &held {
        assert_eq!(link_info(fd), (*id, 0), "{name}");
    }

    // Enforced again: the denied destination is refused by the agent's own programs (the
    // breaker's action is alert, no deny-all), the allowed one still goes through.
    assert_eq!(connect_from(&cg, denied), (false, EPERM), "guarded again");
    assert_eq!(connect_from(&cg, allowed), (true, 0), "guarded again");

    // A tamper attempt: the breaker tripped, once, on `tamper`.
    let trips = lines_of(&env, "breaker_tripped");
    assert_eq!(trips.len(), 1, "{trips:#?}");
    assert_eq!(
        (&trips[0]["agent"], &trips[0]["signal"], &trips[0]["action"]),
        (
            &Value::from("guarded"),
            &Value::from("tamper"),
            &Value::from("alert")
        ),
        "{trips:#?}"
    );
    let row = &env.status()["guarded"];
    assert_eq!(
        (&row["state"], &row["breaker"]),
        (&Value::from("tripped"), &Value::from("open"))
    );
    assert!(
        env.log()
            .contains("a guard was switched off; attached again"),
        "{}",
        env.log()
    );

    // Nothing more is found once everything is attached.
    std::thread::sleep(patience(Duration::from_secs(2)));
    assert_eq!(lines_of(&env, "guard_restored").len(), pinned.len());
    assert!(lines_of(&env, "guard_lost").is_empty());
    env.verify_audit();
}

#[test]
fn a_restarted_daemon_says_how_the_last_one_ended_and_after_how_long() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_d, denied) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&alert_agent("steady", allowed));
    env.start();
    let cg = env.agent_cgroup("steady");
    // A first start: no pins, no trail, nothing to say.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(lines_of(&env, "daemon_restarted").is_empty());

    let killed_at = Instant::now();
    env.stop_with(libc::SIGKILL);
    // A few denied calls while no daemon runs (the pins still refuse them): far below the
    // breaker's min_rate over any gap, so no trip.
    for _ in 0..3 {
        assert_eq!(connect_from(&cg, denied), (false, EPERM), "no daemon");
    }
    let dead = Duration::from_secs(2);
    std::thread::sleep(dead);
    env.start();
    let started_by = killed_at.elapsed();
    let restarted = env.wait_audit("daemon_restarted", 1);
    assert_eq!(restarted.len(), 1, "{restarted:#?}");
    let r = &restarted[0];
    assert_eq!(r["agent"], Value::Null, "{r}");
    assert_eq!(r["how"], "killed or crashed", "{r}");
    assert_eq!(r["pins_adopted"], true, "{r}");
    assert!(r["last_line"].is_string(), "{r}");
    // The gap runs from the old daemon's last checkpoint (at most a second before the kill)
    // to the new one's start.
    let gap = r["gap_seconds"].as_f64().expect("gap_seconds");
    assert!(
        gap >= dead.as_secs_f64() && gap <= started_by.as_secs_f64() + 1.5,
        "gap {gap} s; dead {dead:?}, restarted within {started_by:?}: {r}"
    );
    assert!(lines_of(&env, "daemon_stopped").is_empty());
    assert!(lines_of(&env, "breaker_tripped").is_empty());
    assert_eq!(env.status()["steady"]["denied"], 3);

    // A clean stop leaves its mark, and the next start says so.
    assert_eq!(env.stop_with(libc::SIGTERM), Some(0), "{}", env.log());
    let all = env.audit_lines();
    let last = all.last().expect("a trail");
    assert_eq!(
        (&last["kind"], &last["signal"]),
        (&Value::from("daemon_stopped"), &Value::from("SIGTERM")),
        "{last}"
    );
    env.start();
    let restarted = env.wait_audit("daemon_restarted", 2);
    assert_eq!(restarted.len(), 2, "{restarted:#?}");
    let r = &restarted[1];
    assert_eq!(r["how"], "clean", "{r}");
    assert_eq!(r["last_line"], last["ts"], "{r}");
    let gap = r["gap_seconds"].as_f64().expect("gap_seconds");
    assert!(
        (0.0..patience(Duration::from_secs(15)).as_secs_f64()).contains(&gap),
        "{r}"
    );
    assert!(lines_of(&env, "breaker_tripped").is_empty());
    // SIGINT is a clean stop too; then a SIGKILL again is not.
    assert_eq!(env.stop_with(libc::SIGINT), Some(0), "{}", env.log());
    env.start();
    env.stop_with(libc::SIGKILL);
    env.start();
    let how: Vec<Value> = env
        .wait_audit("daemon_restarted", 4)
        .iter()
        .map(|l| l["how"].clone())
        .collect();
    assert_eq!(
        how,
        ["killed or crashed", "clean", "clean", "killed or crashed"]
    );
    let stopped: Vec<Value> = lines_of(&env, "daemon_stopped")
        .iter()
        .map(|l| l["signal"].clone())
        .collect();
    assert_eq!(stopped, ["SIGTERM", "SIGINT"]);
    env.verify_audit();
}

#[test]
fn denials_made_while_no_daemon_ran_trip_the_breaker_at_restart() {
    privileged!();
    let (_d, denied) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(
        "[[agents]]\nname = \"prober\"\negress = []\n[agents.breaker]\nwarmup = \"10m\"\n\
         window = \"1s\"\ntrip_factor = 5.0\nmin_rate = 20.0\naction = \"freeze\"\n\
         require_approval = true\n",
    );
    env.start();
    let cg = env.agent_cgroup("prober");
    // Let a checkpoint of the agent be written (the sweep, once a second).
    std::thread::sleep(Duration::from_millis(1500));
    env.stop_with(libc::SIGKILL);
    // No daemon: the kernel refuses and counts, nobody judges. One UDP datagram per attempt,
    // so the count is exact; enough that even a slow restart sees far more than min_rate.
    let n = 2000 * u64::from(time_scale());
    let sent = probe(
        Some(&cg),
        &["sendto", "127.0.0.1", &denied.to_string(), &n.to_string()],
    );
    assert_eq!(sent.len() as u64, n);
    assert!(sent.iter().all(|a| !a.ok && a.errno == EPERM), "no daemon");
    env.start();
    let trips = env.wait_audit("breaker_tripped", 1);
    assert_eq!(trips.len(), 1, "{trips:#?}\n{}", env.log());
    let t = &trips[0];
    assert_eq!(t["agent"], "prober", "{t}");
    assert_eq!(t["signal"], "denied", "{t}");
    assert_eq!(t["action"], "freeze", "{t}");
    assert_eq!(t["during_gap"], true, "{t}");
    assert_eq!(t["count"], n, "{t}");
    // The baseline the old daemon had learned (and checkpointed): no denied calls at all.
    assert_eq!(t["baseline"], 0.0, "{t}");
    let (rate, gap) = (
        t["rate"].as_f64().expect("rate"),
        t["gap_seconds"].as_f64().expect("gap_seconds"),
    );
    assert!(gap > 0.0, "{t}");
    assert!(
        (rate - n as f64 / gap.max(1.0)).abs() <= rate * 0.02 + 0.01,
        "the rate is the count over the gap: {t}"
    );
    // In the trail after the restart's own line.
    let kinds: Vec<Value> = env
        .audit_lines()
        .iter()
        .filter(|l| l["kind"] == "daemon_restarted" || l["kind"] == "breaker_tripped")
        .map(|l| l["kind"].clone())
        .collect();
    assert_eq!(kinds, ["daemon_restarted", "breaker_tripped"]);
    let row = &env.status()["prober"];
    assert_eq!(
        (&row["state"], &row["breaker"]),
        (&Value::from("tripped"), &Value::from("open"))
    );
    assert_eq!(row["denied"], n);
    assert!(
        Cgroup::open(&cg).expect("cgroup").frozen().expect("frozen"),
        "the action ran"
    );
    env.verify_audit();
}

#[test]
fn a_link_gone_while_no_daemon_ran_is_found_missing_at_restart() {
    privileged!();
    let (_a, allowed) = tcp_listener("127.0.0.1:0");
    let (_d, denied) = tcp_listener("127.0.0.1:0");
    let mut env = DaemonEnv::new();
    env.write_config(&alert_agent("holed", allowed));
    env.start();
    let cg = env.agent_cgroup("holed");
    // Let a checkpoint say the agent was fully guarded.
    std::thread::sleep(Duration::from_millis(1500));
    env.stop_with(libc::SIGKILL);
    // The connect4 pin removed while nobody holds the link: the link is gone, and with it the
    // judging of TCP connects over IPv4.
    let pin = env.agent_link_dir("holed").join("egress_connect4");
    fs::remove_file(&pin).expect("removing the pin");
    wait_until("the connect hook to go", Duration::from_secs(5), || {
        connect_from(&cg, denied) == (true, 0)
    });
    env.start();
    let restored = env.wait_audit("guard_restored", 1);
    assert_eq!(restored.len(), 1, "{restored:#?}\n{}", env.log());
    let r = &restored[0];
    assert_eq!(r["agent"], "holed", "{r}");
    assert_eq!(r["program"], "egress_connect4", "{r}");
    assert_eq!(r["found"], "missing", "{r}");
    assert_eq!(r["at_start"], true, "{r}");
    assert_eq!(r["old_link_id"], Value::Null, "{r}");
    let cgroup_id = Cgroup::open(&cg).expect("agent cgroup").id().expect("id");
    assert_eq!(
        link_info(&obj_get(&pin)),
        (
            u32::try_from(r["link_id"].as_u64().expect("link_id")).expect("id"),
            cgroup_id
        )
    );
    assert_eq!(connect_from(&cg, denied), (false, EPERM), "guarded again");
    let trips = env.wait_audit("breaker_tripped", 1);
    assert_eq!(trips.len(), 1, "{trips:#?}");
    assert_eq!(trips[0]["signal"], "tamper", "{trips:#?}");
    // The other ten links were adopted as they were: nothing else restored.
    std::thread::sleep(patience(Duration::from_secs(2)));
    assert_eq!(lines_of(&env, "guard_restored").len(), 1);
    env.verify_audit();
}
