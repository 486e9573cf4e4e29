//! `agentwatch top` in a real pseudo-terminal: the screen (as a terminal would show it, through
//! vt100) lists the agents with their state and the latest audit events, and a key (with its
//! confirmation) freezes and thaws the selected agent for real.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use agentwatch_tests::{DaemonEnv, agentwatch_bin, holds_within, privileged, wait_until};

const ROWS: u16 = 45;
const COLS: u16 = 150;

/// A program running on the slave side of a pseudo-terminal; what it draws goes into a vt100
/// screen.
struct Pty {
    master: File,
    screen: Arc<Mutex<vt100::Parser>>,
    child: std::process::Child,
}

impl Pty {
    fn spawn(mut cmd: Command) -> Self {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty with valid out-pointers and a valid winsize.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned two new descriptors that nothing else owns.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup the pty"));
        cmd.stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(stdio(&slave))
            .env("TERM", "xterm-256color");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // A session of its own with the pty as its controlling terminal, as a login
                // shell would have.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn in the pty");
        drop(slave);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let mut reader = master.try_clone().expect("dup master");
        let feed = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the program exits and the slave side closes.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                feed.lock().expect("screen").process(&buf[..n]);
            }
        });
        Self {
            master,
            screen,
            child,
        }
    }

    fn contents(&self) -> String {
        self.screen.lock().expect("screen").screen().contents()
    }

    fn type_key(&mut self, key: &str) {
        self.master.write_all(key.as_bytes()).expect("typing");
    }

    #[track_caller]
    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) {
        let mut screen = String::new();
        let shown = holds_within(Duration::from_secs(10), || {
            screen = self.contents();
            f(&screen)
        });
        assert!(shown, "the screen never showed {what}:\n{screen}");
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The screen line that names agent `name` in the agents table.
fn agent_line<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.trim_start_matches('│').trim_start().starts_with(name))
}

#[test]
fn top_shows_the_agents_and_a_confirmed_key_freezes_and_thaws_one() {
    privileged!();
    let mut env = DaemonEnv::new();
    env.write_config(
        "[[agents]]\nname = \"alpha\"\negress = [\"tcp 127.0.0.1 9\"]\n\n\
         [[agents]]\nname = \"beta\"\negress = []\n",
    );
    env.start();
    // Something for the events pane, and a process for the freeze to stop.
    let out = env.launch_probe("alpha", &["connect", "udp", "127.0.0.2", "53"]);
    assert!(out.status.success());
    let counter = env.scratch().join("count");
    let mut spin = env
        .probe_command("alpha")
        .args(["spin", counter.to_str().expect("utf8")])
        .stdout(Stdio::null())
        .spawn()
        .expect("spin");

    let mut cmd = Command::new(agentwatch_bin());
    cmd.arg("--socket")
        .arg(&env.socket)
        .args(["top", "--interval", "200ms"]);
    let mut top = Pty::spawn(cmd);
    top.wait_for("both agents running and the denial", |s| {
        agent_line(s, "alpha").is_some_and(|l| l.contains("running"))
            && agent_line(s, "beta").is_some_and(|l| l.contains("running"))
            && s.contains("egress_denied")
            && s.contains("dest=127.0.0.2:53")
    });
    // The first agent (alpha) is selected. Nothing happens without the confirmation.
    top.type_key("f");
    top.wait_for("the confirmation", |s| {
        s.contains("freeze agent `alpha`? y to confirm")
    });
    top.type_key("n");
    top.wait_for("the cancellation", |s| {
        s.contains("freeze alpha: cancelled")
    });
    assert_eq!(env.status()["alpha"]["state"], "running");

    top.type_key("f");
    top.wait_for("the confirmation", |s| {
        s.contains("freeze agent `alpha`? y to confirm")
    });
    top.type_key("y");
    top.wait_for("alpha frozen", |s| {
        agent_line(s, "alpha").is_some_and(|l| l.contains("frozen"))
            && s.contains("freeze alpha: done")
    });
    assert_eq!(env.status()["alpha"]["state"], "frozen");
    assert_eq!(env.status()["beta"]["state"], "running");
    if std::env::var_os("AGENTWATCH_SHOW_TOP").is_some() {
        eprintln!("{}", top.contents());
    }

    top.type_key("t");
    top.type_key("y");
    top.wait_for("alpha running again", |s| {
        agent_line(s, "alpha").is_some_and(|l| l.contains("running"))
            && s.contains("thaw alpha: done")
    });
    assert_eq!(env.status()["alpha"]["state"], "running");

    top.type_key("q");
    let mut status = None;
    wait_until("top to quit", Duration::from_secs(5), || {
        status = top.child.try_wait().expect("wait");
        status.is_some()
    });
    let status = status.expect("quit");
    assert!(status.success(), "{status}");
    let _ = spin.kill();
    let _ = spin.wait();
}

/// An API call held for a human shows in top (its agent, scope, method and path), and `c`
/// then `y` lets exactly that call through, `d` then `y` refuses the next one.
#[test]
fn top_lists_held_api_calls_and_a_confirmed_key_approves_or_denies_one() {
    use agentwatch_tests::{TempDir, upstream::Upstream};
    use std::os::unix::fs::PermissionsExt as _;
    privileged!();
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = dir.0.join("mail.key");
    std::fs::write(&secret, "sk-live-FAKE-top\n").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[secrets]\nmail = {{ file = \"{}\" }}\n\n[[agents]]\nname = \"mailer\"\n\n\
         [[agents.apis]]\nname = \"mail\"\nupstream = \"{}\"\nca_file = \"{}\"\nsecret = \"mail\"\n\
         allow = [\"POST /v3/*/messages\"]\napprove = [\"POST /v3/*/messages\"]\n",
        secret.display(),
        up.url(),
        up.ca_file.display()
    ));
    env.start();
    // Two calls, one after the other, each held until decided.
    const CALLS: &str = r#"
import http.client, os, urllib.parse
u = urllib.parse.urlsplit(os.environ["AGENTWATCH_API_MAIL_URL"])
token = os.environ["AGENTWATCH_API_MAIL_TOKEN"]
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
for n in (1, 2):
    conn.request("POST", u.path + f"/v3/example.com/messages", body=b"x",
                 headers={"Authorization": "Bearer " + token})
    r = conn.getresponse()
    r.read()
    print(r.status, flush=True)
"#;
    let agent = env
        .launch_command("mailer", &["python3", "-c", CALLS])
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch");

    let mut cmd = Command::new(agentwatch_bin());
    cmd.arg("--socket")
        .arg(&env.socket)
        .args(["top", "--interval", "200ms"]);
    let mut top = Pty::spawn(cmd);
    let held_id = |env: &DaemonEnv| {
        env.status()["mailer"]["apis"]["mail"]["held"][0]["call"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until("a held call", Duration::from_secs(10), || {
        held_id(&env) != 0
    });
    let first = held_id(&env);
    top.wait_for("the held call", |s| {
        s.contains("API calls held for a human (1)")
            && s.contains(&format!("call {first:<6} mailer"))
            && s.contains("POST /v3/example.com/messages")
    });
    top.type_key("c");
    top.wait_for("the confirmation", |s| {
        s.contains(&format!(
            "approve call {first} of `mailer` (POST /v3/example.com/messages of mail)? y to confirm"
        ))
    });
    top.type_key("y");
    top.wait_for("the approval", |s| {
        s.contains(&format!("approve call {first} of mailer: done"))
    });
    wait_until("the second held call", Duration::from_secs(10), || {
        let id = held_id(&env);
        id != 0 && id != first
    });
    let second = held_id(&env);
    top.wait_for("the second held call", |s| {
        s.contains(&format!("call {second:<6} mailer"))
    });
    top.type_key("d");
    top.type_key("y");
    top.wait_for("the denial", |s| {
        s.contains(&format!("deny call {second} of mailer: done"))
    });
    let out = agent.wait_with_output().expect("agent");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200\n403\n",
        "{out:?}"
    );
    assert_eq!(up.requests().len(), 1);
    let decided = env.wait_audit("api_decided", 2);
    assert_eq!(
        (
            decided[0]["decision"].as_str(),
            decided[1]["decision"].as_str()
        ),
        (Some("approved"), Some("refused"))
    );
    top.type_key("q");
}
