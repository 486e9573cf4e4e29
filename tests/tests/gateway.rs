//! The API gateway: an agent holds a phantom token, never the key; the gateway knows from the
//! kernel which agent calls, judges each call, injects the real secret and audits the call.
//! The upstream is a real HTTPS server on loopback with a CA made for the test, recording what
//! reaches it.

use agentwatch_tests::{DaemonEnv, TempDir, privileged, upstream::Upstream};

/// A fake key of the shape users fear losing: it must reach the upstream and nothing else.
const SECRET: &str = "sk-live-FAKE-7f3a9c0e2b";

/// A python3 agent that makes the calls in argv (`METHOD PATH [TOKEN]`, path under the
/// scope's URL) with its own token unless one is given, and prints one JSON line per call:
/// the status and the body's first 200 bytes. It also prints its own token and whether any of
/// its environment's values holds the secret.
const AGENT: &str = r#"
import http.client, json, os, sys, urllib.parse
url = os.environ["AGENTWATCH_API_MAIL_URL"]
token = os.environ["AGENTWATCH_API_MAIL_TOKEN"]
secret = sys.argv[1]
print(json.dumps({"token": token, "secret_in_env": any(secret in v for v in os.environ.values()),
                  "mail_base": os.environ.get("MAIL_BASE"), "mail_key_is_token": os.environ.get("MAIL_KEY") == token}))
u = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=float(os.environ["AW_TIMEOUT"]))
for call in sys.argv[2:]:
    parts = call.split(" ")
    method, path = parts[0], parts[1]
    tok = parts[2] if len(parts) > 2 else token
    body = b"to=someone@example.com" if method == "POST" else None
    conn.request(method, u.path + path, body=body, headers={"Authorization": "Bearer " + tok})
    r = conn.getresponse()
    data = r.read()
    print(json.dumps({"call": call.replace(tok, "TOKEN"), "status": r.status, "body": data[:200].decode("utf-8", "replace")}))
    sys.stdout.flush()
"#;

/// The agent's command, with its HTTP client's timeout (a hang is a failure, not a wait) on the
/// test's time scale.
trait Timed {
    fn launch_command_timed(&self, agent: &str, cmd: &[&str]) -> std::process::Command;
}

impl Timed for DaemonEnv {
    fn launch_command_timed(&self, agent: &str, cmd: &[&str]) -> std::process::Command {
        let mut c = self.launch_command(agent, cmd);
        let timeout = agentwatch_tests::scaled(std::time::Duration::from_secs(20));
        c.env("AW_TIMEOUT", timeout.as_secs_f64().to_string());
        c
    }
}

fn config(up: &Upstream, secret: &std::path::Path) -> String {
    format!(
        r#"
[secrets]
mail = {{ file = "{secret}" }}

[[agents]]
name = "mailer"

[[agents.apis]]
name = "mail"
upstream = "{url}"
ca_file = "{ca}"
secret = "mail"
allow = ["POST /v3/*/messages", "GET /v3/domains/**"]
per_minute = 3
env = {{ MAIL_BASE = "{{url}}/v3", MAIL_KEY = "{{token}}" }}
"#,
        secret = secret.display(),
        url = up.url(),
        ca = up.ca_file.display(),
    )
}

fn secret_file(dir: &TempDir, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.0.join("mail.key");
    std::fs::write(&p, format!("{SECRET}\n")).expect("secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

/// A test upstream, a secret file of mode 0600 holding [`SECRET`], and a daemon started on the
/// config `make` writes from them (the folder keeps the secret for reloads).
fn started(
    make: impl FnOnce(&Upstream, &std::path::Path) -> String,
) -> (Upstream, TempDir, std::path::PathBuf, DaemonEnv) {
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = secret_file(&dir, 0o600);
    let mut env = DaemonEnv::new();
    env.write_config(&make(&up, &secret));
    env.start();
    (up, dir, secret, env)
}

/// `python3 -c AGENT SECRET CALLS...` as agent `mailer`, not yet started.
fn agent(env: &DaemonEnv, calls: &[&str]) -> std::process::Command {
    let mut args = vec!["python3", "-c", AGENT, SECRET];
    args.extend(calls);
    let mut c = env.launch_command_timed("mailer", &args);
    c.current_dir("/");
    c
}

/// The statuses the agent printed, one per call.
fn statuses(got: &[serde_json::Value]) -> Vec<u64> {
    got[1..]
        .iter()
        .map(|l| l["status"].as_u64().expect("status"))
        .collect()
}

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("agent line"))
        .collect()
}

#[test]
fn an_agent_calls_its_api_with_a_phantom_token_and_only_the_upstream_sees_the_secret() {
    privileged!();
    let (up, _dir, _, env) = started(config);
    let calls = [
        "POST /v3/example.com/messages",
        "GET /v3/domains/example.com?api_key=query-secret",
        // Not in `allow`.
        "DELETE /v3/domains/example.com",
        // `..` applied before judging: /v3/admin, not allowed.
        "GET /v3/domains/../admin",
        "POST /v3/example.com/messages",
        // The fourth allowed call in a minute: over per_minute = 3.
        "POST /v3/example.com/messages",
        "POST /v3/example.com/messages awp_not-a-token-of-ours",
    ];
    let out = agent(&env, &calls).output().expect("launch");
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    let head = &got[0];
    assert_eq!(head["secret_in_env"], false, "{head}");
    assert_eq!(head["mail_key_is_token"], true, "{head}");
    let token = head["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("awp_"), "{token}");
    assert_eq!(
        statuses(&got),
        [200, 200, 403, 403, 200, 429, 401],
        "{got:#?}"
    );

    // Exactly the three allowed calls arrived, each with the real key and nothing the agent
    // sent as a credential.
    let seen = up.requests();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    for r in &seen {
        assert_eq!(
            r.header("authorization"),
            [format!("Bearer {SECRET}")],
            "{r:?}"
        );
        assert!(
            r.headers.iter().all(|(_, v)| !v.contains(&token)),
            "the token went upstream: {r:?}"
        );
        // The upstream offers HTTP/2 (ALPN): the gateway speaks it.
        assert_eq!(r.version, "HTTP/2.0", "{r:?}");
    }
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path_and_query, "/v3/example.com/messages");
    assert_eq!(seen[0].body, b"to=someone@example.com");
    // The query is forwarded as sent.
    assert_eq!(
        seen[1].path_and_query,
        "/v3/domains/example.com?api_key=query-secret"
    );

    // Every call audited, in order, with its decision; the query never in the trail.
    let audited = env.wait_audit("api_call", 7);
    let decisions: Vec<&str> = audited
        .iter()
        .map(|l| l["decision"].as_str().expect("decision"))
        .collect();
    assert_eq!(
        decisions,
        [
            "allowed", "allowed", "denied", "denied", "allowed", "limited", "refused"
        ],
        "{audited:#?}"
    );
    assert_eq!(audited[1]["path"], "/v3/domains/example.com");
    assert_eq!(audited[3]["path"], "/v3/admin");
    assert!(
        audited
            .iter()
            .all(|l| l["agent"] == "mailer" && l["api"] == "mail")
    );
    assert_eq!(audited[0]["bytes_out"], 22);
    assert!(audited[0]["bytes_in"].as_u64().expect("bytes_in") > 0);

    // The same token from outside every agent: refused, audited, never forwarded.
    let outside = std::process::Command::new("python3")
        .args([
            "-c",
            "import http.client,sys\nc=http.client.HTTPConnection(sys.argv[1])\n\
             c.request('POST','/mail/v3/example.com/messages',body=b'x',headers={'Authorization':'Bearer '+sys.argv[2]})\n\
             print(c.getresponse().status)",
            head["mail_base"]
                .as_str()
                .expect("MAIL_BASE")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .expect("host:port"),
            &token,
        ])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&outside.stdout).trim(),
        "401",
        "{outside:?}"
    );
    assert_eq!(up.requests().len(), 3);
    let refused = env.wait_audit("api_call", 8);
    let last = refused.last().expect("line");
    assert_eq!(last["decision"], "refused", "{last}");
    assert!(last["agent"].is_null() || last["agent"] == "", "{last}");

    // Status and metrics count the same calls.
    let row = &env.status()["mailer"]["apis"]["mail"];
    assert_eq!(row["calls"]["allowed"], 3, "{row}");
    assert_eq!(row["calls"]["denied"], 2, "{row}");
    assert_eq!(row["calls"]["limited"], 1, "{row}");
    assert_eq!(row["per_minute_left"], 0, "{row}");
    assert_eq!(
        env.metric(
            "agentwatch_api_calls_total{agent=\"mailer\",api=\"mail\",decision=\"allowed\"}"
        ),
        Some(3.0)
    );

    // The secret is nowhere but upstream: not in the trail, the log, status or metrics, and
    // neither is the token.
    let trail = std::fs::read_to_string(&env.audit).expect("trail");
    for (what, text) in [
        ("trail", trail.as_str()),
        ("log", env.log().as_str()),
        ("metrics", env.metrics().as_str()),
    ] {
        assert!(!text.contains(SECRET), "the secret is in the {what}");
        assert!(!text.contains(&token), "the token is in the {what}");
    }
    let status = String::from_utf8_lossy(&env.cli(&["status", "--json"]).stdout).into_owned();
    assert!(!status.contains(SECRET) && !status.contains(&token));

    // Killed: its token is revoked. A new process of the approved agent presenting the old
    // token is refused as `revoked`; a new launch gets a new token that works.
    let killed = env.cli(&["kill", "mailer"]);
    assert!(killed.status.success(), "{killed:?}");
    let approved = env.cli(&["approve", "mailer"]);
    assert!(approved.status.success(), "{approved:?}");
    let old = format!("POST /v3/example.com/messages {token}");
    let out = agent(&env, &[&old]).output().expect("launch");
    let again = lines(&out);
    assert_ne!(again[0]["token"], token.as_str());
    assert_eq!(again[1]["status"], 401, "{again:#?}");
    let audited = env.wait_audit("api_call", 9);
    assert_eq!(audited.last().expect("line")["decision"], "revoked");
    assert_eq!(up.requests().len(), 3);
}

#[test]
fn a_secret_file_others_may_read_refuses_the_config_with_its_path_and_never_its_value() {
    privileged!();
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = secret_file(&dir, 0o644);
    let mut env = DaemonEnv::new();
    env.write_config(&config(&up, &secret));
    let check = env.cli(&["check", "--config", &env.config.display().to_string()]);
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert!(said.contains(&secret.display().to_string()), "{said}");
    assert!(said.contains("mode 0644"), "{said}");
    assert!(!said.contains(SECRET), "{said}");
    // A running daemon refuses the same file at a reload, and keeps the config it had.
    env.write_config("[[agents]]\nname = \"mailer\"\n");
    env.start();
    env.write_config(&config(&up, &secret));
    let reload = env.cli(&["reload"]);
    assert!(!reload.status.success(), "{reload:?}");
    let err = String::from_utf8_lossy(&reload.stderr);
    assert!(err.contains("mode 0644"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
    assert_eq!(env.status()["mailer"]["apis"], serde_json::json!({}));
}

/// The case this project exists for: calls at 5 a second while the breaker learns, then a
/// flood over the same keep-alive connection (one `connect`, invisible to every other signal).
/// The breaker trips on `api_calls` and denies: every call after that gets 403 and none of
/// them reaches the upstream.
#[test]
fn a_flood_over_one_connection_trips_the_breaker_on_api_calls_and_the_rest_never_arrive() {
    privileged!();
    use agentwatch_tests::{scaled, scaled_rate, scaled_toml};
    use std::time::Duration;
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = secret_file(&dir, 0o600);
    let warmup = Duration::from_secs(3);
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "{}\n[agents.breaker]\nwarmup = \"{}\"\nwindow = \"{}\"\ntrip_factor = 5.0\nmin_rate = {:?}\n\
         action = \"deny\"\nrequire_approval = true\n",
        config(&up, &secret).replace("per_minute = 3", "per_minute = 100000"),
        scaled_toml(warmup),
        scaled_toml(Duration::from_millis(500)),
        scaled_rate(20.0),
    ));
    env.start();
    let pace = scaled(Duration::from_millis(200)).as_secs_f64();
    let steady = scaled(warmup + Duration::from_secs(1)).as_secs_f64();
    let script = r#"
import http.client, json, os, sys, time, urllib.parse
u = urllib.parse.urlsplit(os.environ["AGENTWATCH_API_MAIL_URL"])
token = os.environ["AGENTWATCH_API_MAIL_TOKEN"]
pace, steady, flood = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=float(os.environ["AW_TIMEOUT"]))
def call():
    conn.request("GET", u.path + "/v3/domains/example.com", headers={"Authorization": "Bearer " + token})
    r = conn.getresponse(); r.read(); return r.status
start = time.monotonic(); normal = []
while time.monotonic() - start < steady:
    normal.append(call()); time.sleep(pace)
burst = [call() for _ in range(flood)]
print(json.dumps({"normal": normal, "burst": burst}))
"#;
    let out = env
        .launch_command_timed(
            "mailer",
            &[
                "python3",
                "-c",
                script,
                &pace.to_string(),
                &steady.to_string(),
                "600",
            ],
        )
        .current_dir("/")
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the agent's report");
    let normal: Vec<u64> = serde_json::from_value(got["normal"].clone()).expect("normal");
    let burst: Vec<u64> = serde_json::from_value(got["burst"].clone()).expect("burst");
    assert!(normal.iter().all(|s| *s == 200), "{normal:?}");
    let first_denied = burst
        .iter()
        .position(|s| *s == 403)
        .unwrap_or_else(|| panic!("the flood was never denied: {burst:?}"));
    // Once denied, denied: the breaker waits for a human.
    assert!(burst[first_denied..].iter().all(|s| *s == 403), "{burst:?}");
    assert!(burst[..first_denied].iter().all(|s| *s == 200), "{burst:?}");
    let tripped = env.wait_audit("breaker_tripped", 1);
    assert_eq!(tripped.len(), 1, "{tripped:#?}");
    assert_eq!(tripped[0]["signal"], "api_calls", "{tripped:#?}");
    assert_eq!(tripped[0]["action"], "deny", "{tripped:#?}");
    // Exactly the calls answered 200 reached the upstream.
    let answered = normal.len() + first_denied;
    assert_eq!(up.requests().len(), answered);
    let row = &env.status()["mailer"]["apis"]["mail"]["calls"];
    assert_eq!(row["allowed"], answered, "{row}");
    assert_eq!(row["denied"], burst.len() - first_denied, "{row}");
}

/// A call `approve` names waits for a human: approved it goes through once, denied it gets 403,
/// undecided it gets 403 when `approve_timeout` passes; only the approved one reaches the
/// upstream, and the trail says who decided what about which exact call.
#[test]
fn a_held_call_goes_through_only_when_a_human_approves_that_call() {
    privileged!();
    use agentwatch_tests::{scaled, scaled_toml, wait_until};
    use std::time::Duration;
    let (up, _dir, _, env) = started(|up, secret| {
        config(up, secret).replace(
            "per_minute = 3",
            &format!(
                "per_minute = 30\napprove = [\"POST /v3/*/messages\"]\napprove_timeout = \"{}\"",
                scaled_toml(Duration::from_secs(3))
            ),
        )
    });
    let calls = [
        "POST /v3/example.com/messages",
        "POST /v3/example.com/messages",
        "POST /v3/example.com/messages",
        // Not held: GET is not in `approve`.
        "GET /v3/domains/example.com",
    ];
    let child = agent(&env, &calls)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch");
    let held = |env: &DaemonEnv| -> Vec<serde_json::Value> {
        env.status()["mailer"]["apis"]["mail"]["held"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let wait_held = |env: &DaemonEnv| -> serde_json::Value {
        let mut one = None;
        wait_until("a held call", scaled(Duration::from_secs(10)), || {
            one = held(env).into_iter().next();
            one.is_some()
        });
        one.expect("held")
    };
    // 1: approved.
    let first = wait_held(&env);
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v3/example.com/messages");
    assert_eq!(first["digest"].as_str().map(str::len), Some(64), "{first}");
    let id = first["call"].to_string();
    // Another agent's call id, or one that does not exist, is refused.
    let wrong = env.cli(&["approve", "mailer", "--call", "999999"]);
    assert!(!wrong.status.success());
    let ok = env.cli(&["approve", "mailer", "--call", &id]);
    assert!(ok.status.success(), "{ok:?}");
    // 2: denied.
    let second = wait_held(&env);
    assert_ne!(second["call"], first["call"]);
    let ok = env.cli(&["deny", "mailer", "--call", &second["call"].to_string()]);
    assert!(ok.status.success(), "{ok:?}");
    // 3: nobody decides.
    let _third = wait_held(&env);
    let out = child.wait_with_output().expect("agent");
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    assert_eq!(statuses(&got), [200, 403, 403, 200], "{got:#?}");
    assert!(held(&env).is_empty());
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[1].method.as_str()),
        ("POST", "GET")
    );
    // What the human approved is what went: the body the digest was taken over.
    assert_eq!(seen[0].body, b"to=someone@example.com");
    let audited = env.wait_audit("api_call", 4);
    let decisions: Vec<&str> = audited
        .iter()
        .map(|l| l["decision"].as_str().expect("decision"))
        .collect();
    assert_eq!(
        decisions,
        ["approved", "refused", "refused", "allowed"],
        "{audited:#?}"
    );
    assert!(
        audited[2]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not approved within")),
        "{audited:#?}"
    );
    let held_lines = env.wait_audit("api_held", 3);
    assert_eq!(held_lines.len(), 3);
    assert_eq!(held_lines[0]["digest"], first["digest"]);
    let decided = env.wait_audit("api_decided", 2);
    assert_eq!(decided[0]["decision"], "approved");
    assert_eq!(decided[1]["decision"], "refused");
    assert_eq!(decided[0]["actor_uid"], 0);
}

/// The whole `status --json` reply's `gateway` object.
fn gateway_status(env: &DaemonEnv) -> serde_json::Value {
    let out = env.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    v["gateway"].clone()
}

/// Has the gateway closed `s` (EOF or reset) within `wait`?
fn closed_within(s: &mut std::net::TcpStream, wait: std::time::Duration) -> bool {
    use std::io::Read as _;
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An answer before the close (a 408 or 401): read on to the end.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Any local process can reach the gateway's port, as a hostile agent's accomplice outside
/// every agent would. It holds few places (32 connections; the rest are closed at once, and
/// a connection that sends no full request head is closed after 30 s), gets one answer per
/// connection, and writes at most 10 trail lines a second, every other call counted; the
/// agent's own calls go through all the while.
#[test]
fn outsiders_hold_few_places_get_one_answer_per_connection_and_cannot_flood_the_trail() {
    use std::io::Write as _;
    privileged!();
    let (up, _dir, _, env) = started(config);
    let listen: std::net::SocketAddr = gateway_status(&env)["listen"]
        .as_str()
        .expect("the gateway listens")
        .parse()
        .expect("address");

    // 40 connections that never send a request: 32 are held, 8 closed at once.
    let mut held: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(listen).expect("connect"))
        .collect();
    let started = std::time::Instant::now();
    agentwatch_tests::wait_until(
        "the gateway to hold 32 connections and count 8 refused",
        agentwatch_tests::patience(std::time::Duration::from_secs(10)),
        || {
            let g = gateway_status(&env);
            g["connections_refused"] == 8 && g["connections"] == 32
        },
    );
    let closed: Vec<bool> = held
        .iter_mut()
        .map(|s| closed_within(s, std::time::Duration::from_millis(200)))
        .collect();
    assert_eq!(
        closed.iter().filter(|c| **c).count(),
        8,
        "closed at once: {closed:?}"
    );

    // Meanwhile the agent's calls go through: its places are its own.
    let out = agent(&env, &["POST /v3/example.com/messages"])
        .output()
        .expect("launch");
    assert_eq!(statuses(&lines(&out)), [200], "{out:?}");

    // The held ones are closed once the header timeout has passed, not before 30 s.
    let mut open: Vec<std::net::TcpStream> = held
        .into_iter()
        .zip(&closed)
        .filter(|(_, c)| !**c)
        .map(|(s, _)| s)
        .collect();
    for s in &mut open {
        let left = agentwatch_tests::patience(std::time::Duration::from_secs(60))
            .saturating_sub(started.elapsed());
        assert!(closed_within(s, left), "a silent connection was kept");
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(29),
        "closed after {:?}",
        started.elapsed()
    );
    agentwatch_tests::wait_until(
        "the places to be given back",
        agentwatch_tests::patience(std::time::Duration::from_secs(10)),
        || gateway_status(&env)["connections"] == 0,
    );

    // 30 calls from outside: each gets its answer (401) and the connection ends.
    let lines_before = env.audit_lines().len();
    let flood = std::time::Instant::now();
    for _ in 0..30 {
        let mut s = std::net::TcpStream::connect(listen).expect("connect");
        s.write_all(
            b"GET /mail/v3/domains/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer awp_x\r\n\r\n",
        )
        .expect("write");
        s.set_read_timeout(Some(agentwatch_tests::patience(
            std::time::Duration::from_secs(10),
        )))
        .expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("no close after the answer: {e} ({got:?})"),
            }
        }
        let answer = String::from_utf8_lossy(&got);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    let took = flood.elapsed();
    // Every call is accounted for: written, or counted as not written.
    agentwatch_tests::wait_until(
        "the outsiders' lines",
        agentwatch_tests::patience(std::time::Duration::from_secs(10)),
        || {
            let written = env.audit_lines()[lines_before..]
                .iter()
                .filter(|l| l["kind"] == "api_call")
                .count() as u64;
            let not_written = gateway_status(&env)["outsider_lines_not_written"]
                .as_u64()
                .unwrap_or(0);
            written + not_written == 30
        },
    );
    let mine: Vec<serde_json::Value> = env.audit_lines()[lines_before..]
        .iter()
        .filter(|l| l["kind"] == "api_call")
        .cloned()
        .collect();
    assert!(
        mine.iter()
            .all(|l| l["decision"] == "refused" && l["peer"].is_string()),
        "{mine:#?}"
    );
    let seconds = took.as_secs() + 1;
    assert!(
        (10..=10 * seconds as usize).contains(&mine.len()),
        "{} lines for 30 calls in {took:?}",
        mine.len()
    );
    // A line after a gap says how many it follows; those counts and the ones still pending
    // add up to what status says was not written.
    let said: u64 = mine
        .iter()
        .map(|l| l["not_written_before"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        said <= gateway_status(&env)["outsider_lines_not_written"]
            .as_u64()
            .unwrap_or(0)
    );
    assert_eq!(
        env.metric("agentwatch_gateway_connections_refused_total"),
        Some(8.0)
    );
    // Nothing reached the upstream but the agent's one call.
    assert_eq!(up.requests().len(), 1);
}

/// A python3 agent that GETs each path in argv over one connection and prints, per call, its
/// status, then each server-sent event with when it came (seconds since the call), then how
/// the answer ended (`done`, or the error that cut it).
const STREAM_AGENT: &str = r#"
import http.client, json, os, sys, time, urllib.parse
u = urllib.parse.urlsplit(os.environ["AGENTWATCH_API_MAIL_URL"])
token = os.environ["AGENTWATCH_API_MAIL_TOKEN"]
timeout = float(os.environ["AW_TIMEOUT"])
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
for path in sys.argv[1:]:
    start = time.monotonic()
    try:
        conn.request("GET", u.path + path, headers={"Authorization": "Bearer " + token})
        r = conn.getresponse()
        print(json.dumps({"path": path, "status": r.status, "chunked": r.chunked, "length": r.length}), flush=True)
        # read1, not readline: http.client's readline takes a chunked answer cut short for
        # a whole one.
        pending = b""
        while True:
            data = r.read1(65536)
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"data:"):
                    print(json.dumps({"event": line[5:].strip().decode(), "t": time.monotonic() - start}), flush=True)
        print(json.dumps({"end": "done"}), flush=True)
    except Exception as e:
        print(json.dumps({"end": type(e).__name__}), flush=True)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
"#;

/// [`config`] with `GET /stream` allowed too.
fn stream_config(up: &Upstream, secret: &std::path::Path) -> String {
    config(up, secret).replace("allow = [", "allow = [\"GET /stream\", ")
}

/// `STREAM_AGENT` as `mailer`, its lines readable as they come.
fn stream_agent(
    env: &DaemonEnv,
    paths: &[&str],
) -> (
    std::process::Child,
    impl Iterator<Item = serde_json::Value> + use<>,
) {
    use std::io::BufRead as _;
    let mut args = vec!["python3", "-c", STREAM_AGENT];
    args.extend(paths);
    let mut child = env
        .launch_command_timed("mailer", &args)
        .current_dir("/")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch");
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let lines = out
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).expect("agent line"));
    (child, lines)
}

/// Server-sent events pass through as they come, not buffered to the end; a reload that
/// rotates the secret mid-stream does not drop that stream, and the next call carries the
/// new secret.
#[test]
fn a_stream_passes_through_as_it_comes_and_survives_a_secret_rotation() {
    use agentwatch_tests::upstream::{STREAM_GAP, StreamEnd};
    privileged!();
    let (up, _dir, secret, env) = started(stream_config);
    let (child, mut lines) = stream_agent(&env, &["/stream?n=6", "/v3/domains/example.com"]);
    let head = lines.next().expect("status line");
    assert_eq!(head["status"], 200, "{head}");
    let first = lines.next().expect("first event");
    assert_eq!(first["event"], "{\"n\":0}");
    // The first event is there long before the last is sent (5 gaps later).
    let first_at = first["t"].as_f64().expect("t");
    // Rotated while the stream runs: new file contents, then a reload.
    std::fs::write(&secret, "sk-live-ROTATED-0000\n").expect("rotate");
    let reload = env.cli(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    let rest: Vec<serde_json::Value> = lines.by_ref().take(7).collect();
    let events: Vec<&str> = rest.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(
        events,
        [
            "{\"n\":1}",
            "{\"n\":2}",
            "{\"n\":3}",
            "{\"n\":4}",
            "{\"n\":5}",
            "[DONE]"
        ],
        "{rest:#?}"
    );
    assert_eq!(rest[6]["end"], "done", "{rest:#?}");
    let last_at = rest[5]["t"].as_f64().expect("t");
    assert!(
        last_at - first_at >= 4.0 * STREAM_GAP.as_secs_f64(),
        "events came together: first at {first_at}s, last at {last_at}s"
    );
    let after: Vec<serde_json::Value> = lines.collect();
    assert_eq!(after[0]["status"], 200, "{after:#?}");
    let out = child.wait_with_output().expect("agent");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        up.streams(),
        [StreamEnd {
            sent: 6,
            completed: true
        }]
    );
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        seen[0].header("authorization"),
        [format!("Bearer {SECRET}")]
    );
    assert_eq!(
        seen[1].header("authorization"),
        ["Bearer sk-live-ROTATED-0000"]
    );
}

/// An agent's API scope removed from the config while it reads a long stream: its token dies
/// and the stream is cut at once, on both sides (the upstream sees its reader go), though the
/// agent's process lives on; it cannot reach the gateway again.
#[test]
fn removing_an_agents_scope_cuts_its_open_stream_on_both_sides() {
    privileged!();
    let (up, _dir, _, env) = started(stream_config);
    // 100 events: 40 s, were it not cut.
    let (child, mut lines) = stream_agent(&env, &["/stream?n=100", "/v3/domains/example.com"]);
    let head = lines.next().expect("status");
    assert_eq!(head["status"], 200, "{head}");
    // Chunked: the end of the answer is said, so a cut cannot pass for one.
    assert_eq!(head["chunked"], true, "{head}");
    for n in 0..2 {
        assert_eq!(
            lines.next().expect("event")["event"],
            format!("{{\"n\":{n}}}")
        );
    }
    let cut_at = std::time::Instant::now();
    env.write_config("[[agents]]\nname = \"mailer\"\n");
    let reload = env.cli(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    let rest: Vec<serde_json::Value> = lines.collect();
    let took = cut_at.elapsed();
    let out = child.wait_with_output().expect("agent");
    assert!(out.status.success(), "{out:?}");
    // A few events may have been on their way; then the stream ends in an error, not [DONE].
    let events = rest.iter().filter(|l| l["event"].is_string()).count();
    assert!(events <= 3, "{rest:#?}");
    let ends: Vec<&serde_json::Value> = rest.iter().filter(|l| !l["end"].is_null()).collect();
    assert_eq!(ends.len(), 2, "{rest:#?}");
    assert_ne!(ends[0]["end"], "done", "{rest:#?}");
    assert!(
        took < agentwatch_tests::patience(std::time::Duration::from_secs(10)),
        "cut after {took:?}"
    );
    // The next call cannot even connect: with no scope left the gateway is off the agent's
    // egress list (EPERM in the kernel).
    assert_eq!(ends[1]["end"], "PermissionError", "{rest:#?}");
    assert!(rest.iter().all(|l| l["status"].is_null()), "{rest:#?}");
    // The upstream saw its reader go well before the 100th event.
    agentwatch_tests::wait_until(
        "the upstream to see the stream end",
        agentwatch_tests::patience(std::time::Duration::from_secs(10)),
        || !up.streams().is_empty(),
    );
    let ends = up.streams();
    assert!(!ends[0].completed && ends[0].sent < 20, "{ends:?}");
    assert_eq!(up.requests().len(), 1);
    let calls = env.wait_audit("api_call", 1);
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0]["path"], "/stream", "{calls:#?}");
    assert_eq!(calls[0]["decision"], "allowed", "{calls:#?}");
}

/// 16 clients at once, 32 calls against per_minute = 10: exactly 10 go through, each limit is
/// reserved before the call is forwarded, so no call crosses it while others are in flight.
#[test]
fn per_minute_is_exact_under_sixteen_concurrent_clients() {
    privileged!();
    let (up, _dir, _, env) =
        started(|up, secret| config(up, secret).replace("per_minute = 3", "per_minute = 10"));
    const CLIENTS: &str = r#"
import http.client, json, os, threading, urllib.parse
u = urllib.parse.urlsplit(os.environ["AGENTWATCH_API_MAIL_URL"])
token = os.environ["AGENTWATCH_API_MAIL_TOKEN"]
timeout = float(os.environ["AW_TIMEOUT"])
start = threading.Barrier(16)
got = []
def client():
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.connect()
    start.wait()
    for _ in range(2):
        conn.request("POST", u.path + "/v3/example.com/messages", body=b"x",
                     headers={"Authorization": "Bearer " + token})
        r = conn.getresponse()
        r.read()
        got.append(r.status)
threads = [threading.Thread(target=client) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(sorted(got)))
"#;
    let out = env
        .launch_command_timed("mailer", &["python3", "-c", CLIENTS])
        .current_dir("/")
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    let got: Vec<u64> = serde_json::from_slice(&out.stdout).expect("statuses");
    assert_eq!(got.len(), 32, "{got:?}");
    assert_eq!(got.iter().filter(|s| **s == 200).count(), 10, "{got:?}");
    assert_eq!(got.iter().filter(|s| **s == 429).count(), 22, "{got:?}");
    assert_eq!(up.requests().len(), 10);
    let row = &env.status()["mailer"]["apis"]["mail"];
    assert_eq!(row["calls"]["allowed"], 10, "{row}");
    assert_eq!(row["calls"]["limited"], 22, "{row}");
    assert_eq!(row["per_minute_left"], 0, "{row}");
}

/// `learn` proposes each scope's `allow` from the calls made (an identifier in a path becomes
/// `*`), with counts; refused calls and configured patterns never used are said apart, and a
/// scope never called is left out. The proposal, with the `[secrets]` it names, passes `check`.
#[test]
fn learn_proposes_each_scopes_allow_from_the_calls_made() {
    privileged!();
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = secret_file(&dir, 0o600);
    let mut env = DaemonEnv::new();
    let base = config(&up, &secret).replace("per_minute = 3", "per_minute = 30");
    env.write_config(&format!(
        "{base}\n[[agents.apis]]\nname = \"spare\"\nupstream = \"{}\"\nca_file = \"{}\"\n\
         secret = \"mail\"\nallow = [\"GET /**\"]\n",
        up.url(),
        up.ca_file.display()
    ));
    env.start();
    let calls = [
        "POST /v3/example.com/messages",
        "POST /v3/example.com/messages",
        "POST /v3/other.org/messages",
        "GET /v3/domains/example.com",
        "DELETE /v3/domains/example.com",
    ];
    let out = agent(&env, &calls).output().expect("launch");
    assert_eq!(statuses(&lines(&out)), [200, 200, 200, 200, 403], "{out:?}");
    let json = env.cli(&["learn", "mailer", "--json"]);
    assert!(json.status.success(), "{json:?}");
    let p: serde_json::Value = serde_json::from_slice(&json.stdout).expect("proposal");
    assert_eq!(p["unused_apis"], serde_json::json!(["spare"]), "{p:#}");
    let mail = &p["apis"][0];
    assert_eq!(mail["name"], "mail");
    assert_eq!(
        mail["allow"],
        serde_json::json!([
            { "pattern": "POST /v3/*/messages", "calls": 3 },
            { "pattern": "GET /v3/domains/*", "calls": 1 },
        ]),
        "{mail:#}"
    );
    assert_eq!(
        mail["refused"],
        serde_json::json!([{ "pattern": "DELETE /v3/domains/*", "calls": 1 }]),
        "{mail:#}"
    );
    assert_eq!(mail["unused_allow"], serde_json::json!([]), "{mail:#}");

    let text = env.cli(&["learn", "mailer"]);
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("\"POST /v3/*/messages\", # 3 calls"),
        "{text}"
    );
    assert!(
        text.contains("# refused by `allow`, left out: \"DELETE /v3/domains/*\" (1 call)"),
        "{text}"
    );
    assert!(
        text.contains("# API scope \"spare\" was never called: left out"),
        "{text}"
    );
    let proposed = dir.0.join("proposed.toml");
    std::fs::write(
        &proposed,
        format!(
            "[secrets]\nmail = {{ file = \"{}\" }}\n\n{text}",
            secret.display()
        ),
    )
    .expect("write");
    let check = std::process::Command::new(agentwatch_tests::agentwatch_bin())
        .args(["check", "--config"])
        .arg(&proposed)
        .output()
        .expect("check");
    assert!(check.status.success(), "{check:?}\n{text}");
}

/// A stream that outlasts the gateway's 30 s header and idle timeout (an LLM's long answer) is
/// not cut by it: the timer runs only while the gateway waits for a request head.
#[test]
fn a_stream_longer_than_the_idle_timeout_runs_to_its_end() {
    use agentwatch_tests::upstream::{STREAM_GAP, StreamEnd};
    privileged!();
    let (up, _dir, _, env) = started(stream_config);
    // 35 s of events, then [DONE].
    let n = (35_000 / STREAM_GAP.as_millis()) as usize;
    let path = format!("/stream?n={n}");
    let (child, lines) = stream_agent(&env, &[&path]);
    let got: Vec<serde_json::Value> = lines.collect();
    let out = child.wait_with_output().expect("agent");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(got.last().expect("end")["end"], "done", "{got:#?}");
    let events = got.iter().filter(|l| l["event"].is_string()).count();
    assert_eq!(events, n + 1, "{n} events and [DONE]");
    assert_eq!(
        up.streams(),
        [StreamEnd {
            sent: n,
            completed: true
        }]
    );
}

/// The real AWS key pair, as a secret file holds it (fake, made for the test).
const AWS_KEY_ID: &str = "AKIDREALEXAMPLE7Q2Z";
const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// A python3 agent signing like an AWS SDK that holds the phantom token as its key id (the
/// signature itself is junk: the gateway never checks it). Each argv item is
/// `SCOPE METHOD PATH [BODY]`; one JSON line per call with its status.
const AWS_AGENT: &str = r#"
import datetime, http.client, json, os, sys, urllib.parse
for call in sys.argv[1:]:
    scope, method, path, *body = call.split(" ", 3)
    body = body[0].encode() if body else b""
    u = urllib.parse.urlsplit(os.environ[f"AGENTWATCH_API_{scope.upper()}_URL"])
    token = os.environ[f"AGENTWATCH_API_{scope.upper()}_TOKEN"]
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=float(os.environ["AW_TIMEOUT"]))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    headers = {
        "X-Amz-Date": date,
        "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
        "X-Amz-Security-Token": "agents-own-session-token",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={token}/{date[:8]}/us-east-1/{scope}/aws4_request, "
                         "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    }
    if scope == "sqs":
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, u.path + path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    print(json.dumps({"call": call, "status": r.status, "token": token}), flush=True)
"#;

/// Checks each request's SigV4 signature with botocore (the signer boto3 and the AWS CLI use),
/// from what the upstream received: stdin a JSON list of {method, url, headers, body (base64),
/// secret}; stdout, per request, the signature botocore computes over the headers the request
/// says it signed.
const BOTOCORE_CHECK: &str = r#"
import base64, json, sys
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
out = []
for r in json.load(sys.stdin):
    auth = dict(p.strip().split("=", 1) for p in r["authorization"][len("AWS4-HMAC-SHA256 "):].split(","))
    key_id, _, region, service, _ = auth["Credential"].split("/")
    signed = auth["SignedHeaders"].split(";")
    headers = {k: v for k, v in r["headers"] if k in signed and k != "host"}
    req = AWSRequest(method=r["method"], url=r["url"], data=base64.b64decode(r["body"]), headers=headers)
    amz_date = dict(r["headers"])["x-amz-date"]
    req.context["timestamp"] = amz_date
    req.context["payload_signing_enabled"] = service != "s3"
    signer = (S3SigV4Auth if service == "s3" else SigV4Auth)(Credentials(key_id, r["secret"]), service, region)
    canonical = signer.canonical_request(req)
    sts = signer.string_to_sign(req, canonical)
    out.append({"signature": signer.signature(sts, req),
                "signed": signer.signed_headers(signer.headers_to_sign(req)), "key_id": key_id})
print(json.dumps(out))
"#;

/// botocore's signatures of `seen` with `secret`.
fn botocore_signatures(
    up: &Upstream,
    seen: &[agentwatch_tests::upstream::Recorded],
    secret: &str,
) -> Vec<serde_json::Value> {
    use base64::Engine as _;
    use std::io::Write as _;
    let input: Vec<serde_json::Value> = seen
        .iter()
        .map(|r| {
            serde_json::json!({
                "method": r.method,
                "url": format!("https://{}{}", up.addr, r.path_and_query),
                "headers": r.headers,
                "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
                "authorization": r.header("authorization")[0],
                "secret": secret,
            })
        })
        .collect();
    let python = agentwatch_tests::prom::venv().join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it installs botocore)",
        python.display()
    );
    let mut child = std::process::Command::new(python)
        .args(["-c", BOTOCORE_CHECK])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("botocore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&input).expect("json").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("botocore");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("botocore's answer")
}

/// `auth = "aws-sigv4:REGION:SERVICE"`: the agent signs with its phantom token as key id; the
/// gateway removes that signature and its headers and signs again with the real key pair, S3
/// as S3 wants (path as sent, body unsigned), others over the body's hash. botocore, not the
/// code under test, checks each signature the upstream received; with another secret it
/// would not match. A presigned URL (the credential in the query) is refused.
#[test]
fn aws_calls_are_re_signed_with_the_real_key_pair_as_botocore_verifies() {
    use sha2::Digest as _;
    privileged!();
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = dir.0.join("aws.key");
    std::fs::write(&secret, format!("{AWS_KEY_ID} {AWS_SECRET}\n")).expect("secret");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let scope = |name: &str, auth: &str, allow: &str| {
        format!(
            "\n[[agents.apis]]\nname = \"{name}\"\nupstream = \"{}\"\nca_file = \"{}\"\n\
             secret = \"aws\"\nauth = \"{auth}\"\nallow = [{allow}]\n",
            up.url(),
            up.ca_file.display()
        )
    };
    let mut env = DaemonEnv::new();
    env.write_config(&format!(
        "[secrets]\naws = {{ file = \"{}\" }}\n\n[[agents]]\nname = \"mailer\"\n{}{}",
        secret.display(),
        scope(
            "s3",
            "aws-sigv4:us-east-1:s3",
            "\"PUT /bucket/**\", \"GET /bucket/**\""
        ),
        scope("sqs", "aws-sigv4:eu-west-1:sqs", "\"POST /\""),
    ));
    env.start();
    let calls = [
        // A key S3 users escape: space, plus, tilde, UTF-8.
        "s3 PUT /bucket/reports/a%20key%2Bplus~%C3%BC.txt hello",
        "sqs POST / Action=ListQueues&Version=2012-11-05",
        "s3 GET /bucket/k?X-Amz-Credential=x%2F20261207&X-Amz-Signature=00",
    ];
    let out = env
        .launch_command_timed(
            "mailer",
            &["python3", "-c", AWS_AGENT, calls[0], calls[1], calls[2]],
        )
        .current_dir("/")
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    let status: Vec<u64> = got.iter().filter_map(|l| l["status"].as_u64()).collect();
    assert_eq!(status, [200, 200, 400], "{got:#?}");
    let tokens: Vec<&str> = got.iter().filter_map(|l| l["token"].as_str()).collect();

    let seen = up.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    for r in &seen {
        let auth = r.header("authorization");
        assert_eq!(auth.len(), 1, "{r:?}");
        assert!(
            auth[0].starts_with(&format!("AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")),
            "{r:?}"
        );
        // Nothing of the agent's signature went upstream.
        for t in &tokens {
            assert!(r.headers.iter().all(|(_, v)| !v.contains(t)), "{r:?}");
        }
        assert!(r.header("x-amz-security-token").is_empty(), "{r:?}");
        assert_eq!(r.header("x-amz-date").len(), 1, "{r:?}");
    }
    assert_eq!(
        seen[0].path_and_query,
        "/bucket/reports/a%20key%2Bplus~%C3%BC.txt"
    );
    assert_eq!(seen[0].body, b"hello");
    assert_eq!(seen[0].header("x-amz-content-sha256"), ["UNSIGNED-PAYLOAD"]);
    let body_hash = format!("{:x}", sha2::Sha256::digest(&seen[1].body));
    assert_eq!(seen[1].header("x-amz-content-sha256"), [body_hash.as_str()]);

    let checked = botocore_signatures(&up, &seen, AWS_SECRET);
    for (r, c) in seen.iter().zip(&checked) {
        let sent = r.header("authorization")[0]
            .rsplit("Signature=")
            .next()
            .expect("signature");
        assert_eq!(c["signature"], sent, "botocore disagrees on {r:?}: {c}");
        assert_eq!(c["key_id"], AWS_KEY_ID);
        assert!(
            r.header("authorization")[0].contains(&format!(
                "SignedHeaders={}",
                c["signed"].as_str().expect("signed")
            )),
            "{r:?}: {c}"
        );
    }
    // The check can fail: another secret gives other signatures.
    let wrong = botocore_signatures(&up, &seen, &format!("{AWS_SECRET}x"));
    for (r, c) in seen.iter().zip(&wrong) {
        assert!(
            !r.header("authorization")[0].ends_with(c["signature"].as_str().expect("sig")),
            "{r:?}"
        );
    }
    let audited = env.wait_audit("api_call", 3);
    assert_eq!(audited[2]["status"], 400, "{audited:#?}");
    assert!(
        !std::fs::read_to_string(&env.audit)
            .expect("trail")
            .contains(AWS_SECRET)
    );
}

/// An aws-sigv4 scope whose secret is not a key pair is refused by `check` (and so by the
/// daemon), naming the scope and the secret, never what the secret holds.
#[test]
fn an_aws_scope_whose_secret_is_no_key_pair_is_refused_without_showing_it() {
    let dir = TempDir::new();
    let secret = secret_file(&dir, 0o600);
    let config = dir.0.join("agentwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[secrets]\nmail = {{ file = \"{}\" }}\n\n[[agents]]\nname = \"a\"\n\n\
             [[agents.apis]]\nname = \"s3\"\nupstream = \"https://s3.amazonaws.com\"\n\
             secret = \"mail\"\nauth = \"aws-sigv4:us-east-1:s3\"\nallow = [\"GET /**\"]\n",
            secret.display()
        ),
    )
    .expect("config");
    let out = std::process::Command::new(agentwatch_tests::agentwatch_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("agent `a` api `s3`: secret `mail`: an aws-sigv4 secret is one line: ACCESS_KEY_ID SECRET_ACCESS_KEY [SESSION_TOKEN]"),
        "{said}"
    );
    assert!(!said.contains(SECRET), "{said}");
}

/// A refused call whose body comes after its head (a slow client, a large upload): the
/// gateway reads that body away, so the same keep-alive connection carries the agent's next
/// call (hyper alone closes such a connection when the body has not arrived by the answer:
/// a Python client then lost a call now and then).
#[test]
fn a_refused_call_leaves_its_keep_alive_connection_usable() {
    privileged!();
    let (up, _dir, _, env) = started(config);
    const RAW: &str = r#"
import os, socket, time, urllib.parse
u = urllib.parse.urlsplit(os.environ["AGENTWATCH_API_MAIL_URL"])
token = os.environ["AGENTWATCH_API_MAIL_TOKEN"]
s = socket.create_connection((u.hostname, u.port), timeout=float(os.environ["AW_TIMEOUT"]))
def answer():
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            return "closed"
        head += chunk
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    return head.split(b"\r\n")[0].decode()
# Not allowed (403), its body sent only after the head has been answered.
s.sendall(f"POST {u.path}/v3/admin HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nContent-Length: 5\r\n\r\n".encode())
time.sleep(0.5)
s.sendall(b"hello")
print(answer(), flush=True)
s.sendall(f"GET {u.path}/v3/domains/example.com HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
print(answer(), flush=True)
"#;
    let out = env
        .launch_command_timed("mailer", &["python3", "-c", RAW])
        .current_dir("/")
        .output()
        .expect("launch");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "HTTP/1.1 403 Forbidden\nHTTP/1.1 200 OK\n",
        "{out:?}"
    );
    assert_eq!(up.requests().len(), 1);
}

/// Refusals cost an agent nothing to make: their lines are written at `audit_rate` a second,
/// as its kernel denials are, and the rest are counted, never lost: in the next line written
/// (`not_written_before`) and in `status`. Every call is still counted by decision.
#[test]
fn an_agent_flooding_refused_calls_writes_audit_rate_lines_a_second_and_the_rest_are_counted() {
    privileged!();
    let up = Upstream::start();
    let dir = TempDir::new();
    let secret = secret_file(&dir, 0o600);
    let mut env = DaemonEnv::new();
    env.set_daemon_extra("audit_rate = 10\n");
    env.write_config(&config(&up, &secret));
    env.start();
    const CALLS: usize = 300;
    let calls = vec!["DELETE /v3/domains/example.com"; CALLS];
    let out = agent(&env, &calls).output().expect("launch");
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    assert_eq!(statuses(&got), vec![403; CALLS]);
    // Every call counted by decision, whatever was written.
    agentwatch_tests::wait_until(
        "every call counted",
        std::time::Duration::from_secs(10),
        || env.status()["mailer"]["apis"]["mail"]["calls"]["denied"] == CALLS,
    );
    let written = env
        .audit_lines()
        .into_iter()
        .filter(|l| l["kind"] == "api_call")
        .collect::<Vec<_>>();
    let said_before: u64 = written
        .iter()
        .map(|l| l["not_written_before"].as_u64().unwrap_or(0))
        .sum();
    let status = env.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status");
    let not_written = status["gateway"]["agent_lines_not_written"]
        .as_u64()
        .expect("agent_lines_not_written");
    // Written and not written add up to every call; at 10 a second, 300 calls over one
    // connection cannot all be written (they would take 30 s).
    assert_eq!(
        written.len() as u64 + not_written,
        CALLS as u64,
        "{written:#?}"
    );
    assert!(not_written > 0, "{written:#?}");
    assert!(said_before <= not_written, "{said_before} > {not_written}");
    assert!(
        written.iter().all(|l| l["decision"] == "denied"),
        "{written:#?}"
    );
    // The upstream saw none of them.
    assert!(up.requests().is_empty());
}
