//! The control socket: one JSON request line in, one JSON response line out.
//!
//! The socket is a Unix socket (mode 0600, or 0660 with `daemon.admin_group`); the daemon also
//! checks every peer's credentials (SO_PEERCRED) and refuses anyone who is not root or in the
//! admin group, so a socket made world-writable by mistake still lets nobody in.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request of the CLI to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {
        /// Each agent's rules with the calls each admitted.
        #[serde(default)]
        rules: bool,
    },
    Freeze {
        agent: String,
    },
    Thaw {
        agent: String,
    },
    Kill {
        agent: String,
    },
    Approve {
        agent: String,
        /// Keep the learned baselines (default: learn them again from now).
        #[serde(default)]
        keep_baseline: bool,
        /// Not the breaker: let this one held API call through.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<u64>,
    },
    /// Refuse held API call `call` of `agent`.
    Deny {
        agent: String,
        call: u64,
    },
    Reload,
    /// Where to put a process of `agent` (the CLI then moves itself there and execs).
    Launch {
        agent: String,
    },
    /// The last `lines` lines of the audit trail (at most 1,000), oldest first (`top`).
    Recent {
        lines: usize,
    },
    /// Reopens `agent`'s egress lease for `seconds` from now.
    Extend {
        agent: String,
        seconds: u64,
    },
    /// Proposes `agent`'s least-privilege policy from what it did.
    Learn {
        agent: String,
        /// Widen IPv4 addresses into networks of this length (when two or more share one).
        #[serde(default)]
        widen_v4: Option<u8>,
        #[serde(default)]
        widen_v6: Option<u8>,
    },
}

/// The daemon's answer: `{"ok":true,"data":...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Response {
    pub fn ok(data: Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    /// The data of a successful response, or the daemon's error message.
    pub fn into_result(self) -> Result<Value, String> {
        if self.ok {
            Ok(self.data)
        } else {
            Err(self.error.unwrap_or_else(|| "the daemon refused".into()))
        }
    }

    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            data: Value::Null,
        }
    }
}

/// Largest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agentwatch daemon at {path}: {source} (is `agentwatch run` running, and are you root?)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agentwatch daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agentwatch daemon sent a response this client does not understand: {0}")]
    Protocol(#[from] serde_json::Error),
    #[error("the agentwatch daemon closed the connection without answering (refused?)")]
    NoAnswer,
    #[error(
        "the agentwatch daemon did not answer within {} (busy or stuck? see its log)",
        humantime::format_duration(*.0)
    )]
    Timeout(Duration),
}

/// Sends one request and waits for its response (`timeout` bounds each read and write).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // A socket timeout surfaces as EAGAIN, which would read "Resource temporarily unavailable".
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::Timeout(timeout)
        }
        _ => ClientError::Io(e),
    };
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    match (&stream).write_all(&line) {
        Ok(()) => {}
        // The daemon answers a refused peer at once and hangs up: read that answer.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(timed_out(e)),
    }
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(timed_out)?;
    if answer.trim().is_empty() {
        return Err(ClientError::NoAnswer);
    }
    Ok(serde_json::from_str(&answer)?)
}

/// Is `uid`/`gid` (and the peer's supplementary groups, read from /proc) allowed in?
pub fn authorized(uid: u32, gid: u32, pid: Option<i32>, admin_gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    let Some(admin) = admin_gid else {
        return false;
    };
    if gid == admin {
        return true;
    }
    // SO_PEERCRED carries only the primary group; supplementary ones are in /proc/<pid>/status.
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:").map(str::to_owned))
        })
        .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(admin)))
}

/// The gid of group `name` (from the group database).
pub fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_never_answers_is_reported_as_a_timeout() {
        let dir = std::env::temp_dir().join(format!("agentwatch-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        // Accepts (the kernel queues the connection) and never reads or answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = call(
            &path,
            &Request::Status { rules: false },
            Duration::from_millis(200),
        )
        .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the agentwatch daemon did not answer within 200ms (busy or stuck? see its log)"
        );
    }

    #[test]
    fn requests_are_small_tagged_json() {
        let r = Request::Freeze {
            agent: "mailer".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"freeze","agent":"mailer"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status { rules: false }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"learn","agent":"a","widen_v4":24}"#)
                .unwrap(),
            Request::Learn {
                agent: "a".into(),
                widen_v4: Some(24),
                widen_v6: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        let ok = serde_json::to_string(&Response::ok(serde_json::json!({"n": 1}))).unwrap();
        assert_eq!(ok, r#"{"ok":true,"data":{"n":1}}"#);
        let err = serde_json::to_string(&Response::err("unknown agent `x`")).unwrap();
        assert_eq!(err, r#"{"ok":false,"error":"unknown agent `x`"}"#);
    }

    #[test]
    fn only_root_or_admins_are_authorized() {
        assert!(authorized(0, 0, None, None));
        assert!(!authorized(1000, 1000, None, None));
        assert!(authorized(1000, 4242, None, Some(4242)));
        assert!(!authorized(1000, 1000, None, Some(4242)));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-agentwatch"), None);
    }
}
