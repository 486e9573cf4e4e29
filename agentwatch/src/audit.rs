//! The audit trail: one JSON object per line, appended, flushed line by line.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::{Map, Value, json};

/// Where audit lines go. Cloning shares the writer.
#[derive(Clone)]
pub struct Audit {
    out: Arc<Mutex<Sink>>,
}

enum Sink {
    Stdout,
    File(File),
}

impl Audit {
    /// Opens `path` for appending (creating its folder), or stdout for `-`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let sink = if path == Path::new("-") {
            Sink::Stdout
        } else {
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)?;
            }
            Sink::File(OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(Self {
            out: Arc::new(Mutex::new(sink)),
        })
    }

    /// Writes one record: `ts` (now, RFC 3339 UTC), `agent` and `kind` first, then `fields`.
    pub fn record(&self, agent: &str, kind: &str, fields: Value) -> io::Result<()> {
        self.record_at(time::OffsetDateTime::now_utc(), agent, kind, fields)
    }

    /// Writes a record about the daemon itself (policy reloads, lost events): `agent` is null.
    pub fn record_daemon(&self, kind: &str, fields: Value) -> io::Result<()> {
        self.write(time::OffsetDateTime::now_utc(), None, kind, fields)
    }

    /// Like [`Audit::record`] with the time of the event itself.
    pub fn record_at(
        &self,
        ts: time::OffsetDateTime,
        agent: &str,
        kind: &str,
        fields: Value,
    ) -> io::Result<()> {
        self.write(ts, Some(agent), kind, fields)
    }

    fn write(
        &self,
        ts: time::OffsetDateTime,
        agent: Option<&str>,
        kind: &str,
        fields: Value,
    ) -> io::Result<()> {
        let mut obj = Map::new();
        obj.insert("ts".into(), json!(rfc3339(ts)));
        obj.insert("agent".into(), json!(agent));
        obj.insert("kind".into(), json!(kind));
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let mut line = serde_json::to_vec(&Value::Object(obj)).map_err(io::Error::other)?;
        line.push(b'\n');
        // One write per line under the lock: lines from several tasks never interleave.
        let mut sink = self
            .out
            .lock()
            .map_err(|_| io::Error::other("audit lock poisoned"))?;
        match &mut *sink {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&line)?;
                out.flush()
            }
            Sink::File(f) => f.write_all(&line),
        }
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-21T23:59:01.123456Z`.
pub fn rfc3339(ts: time::OffsetDateTime) -> String {
    let ts = ts.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        ts.year(),
        u8::from(ts.month()),
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second(),
        ts.microsecond()
    )
}

/// The audit log path as shown to people.
pub fn describe(path: &Path) -> PathBuf {
    if path == Path::new("-") {
        PathBuf::from("stdout")
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_object_per_line() {
        let dir = std::env::temp_dir().join(format!("aw-audit-{}", std::process::id()));
        let path = dir.join("a.jsonl");
        let audit = Audit::open(&path).unwrap();
        let ts =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        audit
            .record_at(
                ts,
                "mailer",
                "egress_denied",
                json!({"pid": 7, "dest": "10.0.0.1:443"}),
            )
            .unwrap();
        audit
            .record("mailer", "frozen", json!({"actor_uid": 0}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["ts"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(lines[0]["agent"], "mailer");
        assert_eq!(lines[0]["kind"], "egress_denied");
        assert_eq!(lines[0]["pid"], 7);
        assert_eq!(lines[1]["kind"], "frozen");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
