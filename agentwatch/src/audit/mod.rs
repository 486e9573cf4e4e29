//! The audit trail: one JSON object per line, appended.
//!
//! Every part of the daemon hands its records to an [`Audit`] handle; one writer thread
//! ([`writer`]) owns the file and writes them in the order they were handed in. Rate limits,
//! summaries, rotation and the hash chain belong to that writer, so no other module ever writes
//! a line itself. Records are queued, not written, when `record` returns: [`Audit::sync`] waits
//! until everything queued before it is written and on disk (the control socket does so before
//! answering, so a command's audit line is in the file when the command returns).
//!
//! Every line carries `prev`, the hex SHA-256 of the line before it ([`chain`]); [`verify`]
//! checks a trail against it without a daemon (`agentwatch audit verify`).

mod chain;
pub mod verify;
mod writer;

use std::{
    collections::HashSet,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use serde_json::Value;

pub use chain::{START, link};
use writer::{Message, Record};
pub use writer::{Rotation, rfc3339, rotated};

/// Where audit records go. Cloning shares the writer.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Message>,
    /// Lines the writer could not write (full or read-only disk), since the daemon started.
    lost: Arc<AtomicU64>,
}

impl Audit {
    /// Opens `path` for appending (creating its folder), or stdout for `-`, and starts the
    /// writer thread. An error here (no such folder, no permission) is reported at once.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_rotating(path, None)
    }

    /// Like [`Audit::open`], rotating the file as `rotation` says.
    pub fn open_rotating(path: &Path, rotation: Option<Rotation>) -> io::Result<Self> {
        let lost = Arc::new(AtomicU64::new(0));
        let tx = writer::start(path, rotation, Arc::clone(&lost))?;
        Ok(Self { tx, lost })
    }

    /// Lines that could not be written since the daemon started (each is also in the count of
    /// the `audit_lines_lost` line written when the trail works again).
    pub fn lines_lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Queues one record: `ts` (now, RFC 3339 UTC), `agent` and `kind` first, then `fields`.
    pub fn record(&self, agent: &str, kind: &str, fields: Value) {
        self.record_at(time::OffsetDateTime::now_utc(), agent, kind, fields);
    }

    /// Queues a record about the daemon itself (policy reloads, lost events): `agent` is null.
    pub fn record_daemon(&self, kind: &str, fields: Value) {
        self.send(time::OffsetDateTime::now_utc(), None, kind, fields);
    }

    /// Like [`Audit::record`] with the time of the event itself.
    pub fn record_at(&self, ts: time::OffsetDateTime, agent: &str, kind: &str, fields: Value) {
        self.send(ts, Some(agent.to_owned()), kind, fields);
    }

    fn send(&self, ts: time::OffsetDateTime, agent: Option<String>, kind: &str, fields: Value) {
        let record = Record {
            ts,
            agent,
            kind: kind.to_owned(),
            fields,
        };
        if self.tx.send(Message::Record(record)).is_err() {
            // Only after the writer thread died (it logs why); nothing else can be done here.
            tracing::error!(kind, "audit writer is gone: record not written");
        }
    }

    /// Waits until every record queued before this call is written and on disk (fsync), or
    /// failed (logged).
    pub fn sync(&self) {
        self.wait(true);
    }

    /// Waits until every record queued before this call is written to the file, without an
    /// fsync: enough where the point is that a killed daemon's lines are in the trail (the
    /// kernel holds them; they reach the disk within a second), at a fraction of the cost.
    pub fn flush(&self) {
        self.wait(false);
    }

    fn wait(&self, durable: bool) {
        let (done, done_rx) = mpsc::channel();
        if self.tx.send(Message::Sync { durable, done }).is_ok() {
            let _ = done_rx.recv();
        }
    }
}

/// What one kernel record becomes in the trail (each concern builds its own kinds).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelLine {
    /// The agent's kernel id (the daemon names it).
    pub agent_id: u32,
    /// The record's CLOCK_MONOTONIC time: the line's `ts`, and `kernel_ts_ns`.
    pub ts_ns: u64,
    pub kind: &'static str,
    /// The process the line is about (with `ts_ns` and `kind`: the line's [`RecordId`]).
    pub pid: u32,
    /// Everything after `ts`, `agent`, `kind`.
    pub fields: Value,
}

impl KernelLine {
    pub fn id(&self) -> RecordId {
        RecordId {
            kernel_ts_ns: self.ts_ns,
            kind: self.kind.to_owned(),
            pid: self.pid,
        }
    }
}

/// Identifies the audit line of one kernel record: its CLOCK_MONOTONIC time, kind and pid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordId {
    pub kernel_ts_ns: u64,
    pub kind: String,
    pub pid: u32,
}

/// How much of the trail's end [`recent_kernel_records`] reads: far more than the one line a
/// killed daemon can have written without the ring buffer forgetting its record.
const TAIL: u64 = 64 * 1024;

/// The kernel records among the last lines of the trail at `path` (none for stdout or a
/// missing file).
pub fn recent_kernel_records(path: &Path) -> HashSet<RecordId> {
    use std::io::{Read as _, Seek as _};
    let mut out = HashSet::new();
    let Ok(mut f) = std::fs::File::open(path) else {
        return out;
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(TAIL);
    let mut text = String::new();
    if f.seek(io::SeekFrom::Start(start)).is_err() || f.read_to_string(&mut text).is_err() {
        return out;
    }
    // The first line may be cut by the seek: only whole lines parse.
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(ts), Some(kind), Some(pid)) = (
            v["kernel_ts_ns"].as_u64(),
            v["kind"].as_str(),
            v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
        ) {
            out.insert(RecordId {
                kernel_ts_ns: ts,
                kind: kind.to_owned(),
                pid,
            });
        }
    }
    out
}

/// The last whole line of the trail at `path` (or, when that file is empty or missing, of
/// `<path>.1`: a daemon that stopped just after a rotation), parsed. None for stdout, a new
/// trail, or a tail that holds no whole JSON line. Read before a new writer opens the trail, it
/// is the last line the previous daemon wrote.
pub fn last_record(path: &Path) -> Option<Value> {
    use std::io::{Read as _, Seek as _};
    if path == Path::new("-") {
        return None;
    }
    let last_of = |p: &Path| -> Option<Value> {
        let mut f = std::fs::File::open(p).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(io::SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok()?;
        // From the end: a torn last line (a write cut short) is not JSON; the one before is.
        String::from_utf8_lossy(&bytes)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    };
    let empty = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
    if empty {
        last_of(&rotated(path, 1))
    } else {
        last_of(path)
    }
}

/// The time of a line's `ts` as the writer writes it (`2026-11-21T23:59:01.123456Z`, see
/// [`rfc3339`]); None for anything else.
pub fn parse_ts(ts: &str) -> Option<time::OffsetDateTime> {
    let (date, rest) = ts.split_once('T')?;
    let rest = rest.strip_suffix('Z')?;
    let mut d = date.splitn(3, '-').map(str::parse::<u32>);
    let (year, month, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, micros) = rest.split_once('.').unwrap_or((rest, "0"));
    let mut t = hms.splitn(3, ':').map(str::parse::<u8>);
    let (hour, minute, second) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let micros: u32 = micros.parse().ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    let time = time::Time::from_hms_micro(hour, minute, second, micros).ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc())
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
    use serde_json::json;

    #[test]
    fn parse_ts_reads_what_the_writer_writes() {
        let ts =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).unwrap();
        assert_eq!(parse_ts(&rfc3339(ts)), Some(ts));
        assert_eq!(
            parse_ts("2026-11-21T23:59:01Z").map(|t| t.second()),
            Some(1)
        );
        assert_eq!(parse_ts("2026-11-21 23:59:01Z"), None);
        assert_eq!(parse_ts("2026-13-21T23:59:01.5Z"), None);
    }

    #[test]
    fn last_record_is_the_last_whole_line_or_that_of_the_rotated_file() {
        let dir = scratch("last");
        let path = dir.join("a.jsonl");
        assert_eq!(last_record(&path), None);
        let audit = Audit::open(&path).unwrap();
        audit.record("a", "frozen", json!({}));
        audit.record("a", "thawed", json!({}));
        audit.sync();
        assert_eq!(last_record(&path).unwrap()["kind"], "thawed");
        // A torn last line: the one before it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, br#"{"ts":"2026-"#).unwrap();
        assert_eq!(last_record(&path).unwrap()["kind"], "thawed");
        // Stopped just after a rotation: the live file is empty.
        std::fs::rename(&path, rotated(&path, 1)).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert_eq!(last_record(&path).unwrap()["kind"], "thawed");
        assert_eq!(last_record(Path::new("-")), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn writes_one_json_object_per_line() {
        let dir = std::env::temp_dir().join(format!("aw-audit-{}", std::process::id()));
        let path = dir.join("a.jsonl");
        let audit = Audit::open(&path).unwrap();
        let ts =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        audit.record_at(
            ts,
            "mailer",
            "egress_denied",
            json!({"pid": 7, "dest": "10.0.0.1:443"}),
        );
        audit.record("mailer", "frozen", json!({"actor_uid": 0}));
        audit.sync();
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

    #[test]
    fn rotates_at_the_size_and_keeps_the_newest_files() {
        let dir = std::env::temp_dir().join(format!("aw-audit-rot-{}", std::process::id()));
        let path = dir.join("a.jsonl");
        let audit = Audit::open_rotating(
            &path,
            Some(Rotation {
                max_size: 1000,
                keep: 2,
            }),
        )
        .unwrap();
        for i in 0..100 {
            audit.record("a", "egress_denied", json!({ "n": i }));
        }
        audit.sync();
        let read = |p: &Path| -> Vec<Value> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (live, one, two) = (
            read(&path),
            read(&rotated(&path, 1)),
            read(&rotated(&path, 2)),
        );
        assert!(!rotated(&path, 3).exists());
        for f in [&path, &rotated(&path, 1), &rotated(&path, 2)] {
            assert!(std::fs::metadata(f).unwrap().len() <= 1000);
        }
        // The newest lines, in order and without a gap, across the three files.
        let ns: Vec<u64> = two
            .iter()
            .chain(&one)
            .chain(&live)
            .map(|l| l["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns.last(), Some(&99));
        assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "{ns:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aw-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The raw lines of `files`, in order.
    fn raw_lines(files: &[PathBuf]) -> Vec<String> {
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn prev_of(line: &str) -> String {
        let v: Value = serde_json::from_str(line).unwrap();
        v["prev"].as_str().unwrap().to_owned()
    }

    /// Every line's `prev` is the link of the raw line before it; the first chains to "".
    fn assert_chained(lines: &[String]) {
        assert_eq!(prev_of(&lines[0]), START);
        for (i, w) in lines.windows(2).enumerate() {
            assert_eq!(prev_of(&w[1]), link(w[0].as_bytes()), "line {}", i + 2);
        }
    }

    #[test]
    fn prev_is_the_last_field_and_only_the_writer_sets_it() {
        let dir = scratch("prev");
        let path = dir.join("a.jsonl");
        let audit = Audit::open(&path).unwrap();
        audit.record("a", "frozen", json!({"actor_uid": 0, "prev": "forged"}));
        audit.record("a", "thawed", json!({"actor_uid": 0}));
        audit.sync();
        let lines = raw_lines(&[path]);
        assert!(lines[0].starts_with(r#"{"ts":""#), "{}", lines[0]);
        assert!(
            lines[0].ends_with(&format!(r#","actor_uid":0,"prev":"{START}"}}"#)),
            "{}",
            lines[0]
        );
        assert_chained(&lines);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_chain_runs_on_across_rotation() {
        let dir = scratch("chain-rot");
        let path = dir.join("a.jsonl");
        let rotation = Some(Rotation {
            max_size: 1000,
            keep: 10,
        });
        let audit = Audit::open_rotating(&path, rotation).unwrap();
        for i in 0..30 {
            audit.record("a", "egress_denied", json!({ "n": i }));
        }
        audit.sync();
        let files: Vec<PathBuf> = (1..=10)
            .rev()
            .map(|n| rotated(&path, n))
            .filter(|p| p.exists())
            .chain([path.clone()])
            .collect();
        assert!(files.len() >= 4, "{files:?}");
        for f in &files {
            // `prev` counts in the size: no file outgrows it.
            assert!(std::fs::metadata(f).unwrap().len() <= 1000);
        }
        // Each file's first line chains to the last line of the file before it.
        let lines = raw_lines(&files);
        assert_eq!(lines.len(), 30);
        assert_chained(&lines);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_restarted_writer_goes_on_from_the_last_line() {
        let dir = scratch("restart");
        let path = dir.join("a.jsonl");
        let rotation = Some(Rotation {
            max_size: 1000,
            keep: 10,
        });
        for round in 0..3 {
            let audit = Audit::open_rotating(&path, rotation).unwrap();
            for i in 0..4 {
                audit.record("a", "egress_denied", json!({ "round": round, "n": i }));
            }
            audit.sync();
        }
        let files: Vec<PathBuf> = (1..=10)
            .rev()
            .map(|n| rotated(&path, n))
            .filter(|p| p.exists())
            .chain([path.clone()])
            .collect();
        let lines = raw_lines(&files);
        assert_eq!(lines.len(), 12);
        assert_chained(&lines);

        // Stopped between a rotation and the new file's first line: the live file is empty
        // (or gone), and the chain goes on from the last line of `.1`.
        std::fs::rename(&path, rotated(&path, 1)).unwrap();
        std::fs::write(&path, b"").unwrap();
        let last_of_one = raw_lines(&[rotated(&path, 1)]).pop().unwrap();
        let audit = Audit::open_rotating(&path, rotation).unwrap();
        audit.record("a", "thawed", json!({}));
        audit.sync();
        let live = raw_lines(std::slice::from_ref(&path));
        assert_eq!(prev_of(&live[0]), link(last_of_one.as_bytes()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
