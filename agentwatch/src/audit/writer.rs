//! The one writer of the audit trail: a thread that owns the file.
//!
//! A thread rather than an async task because every write is blocking file I/O, and a slow disk
//! must stall the trail, never the daemon's tasks (the kernel keeps counting meanwhile).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::mpsc,
};

use serde_json::{Map, Value, json};

/// One record to write.
pub(super) struct Record {
    pub ts: time::OffsetDateTime,
    /// None: a record about the daemon itself (`agent` is null in the line).
    pub agent: Option<String>,
    pub kind: String,
    pub fields: Value,
}

pub(super) enum Message {
    Record(Record),
    /// Answered once every earlier message is handled.
    Sync(mpsc::Sender<()>),
}

/// When the trail is rotated: at `max_size` bytes, keeping `keep` rotated files
/// (`<path>.1` the newest, `<path>.<keep>` the oldest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub max_size: u64,
    pub keep: u32,
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        size: u64,
        rotation: Option<Rotation>,
    },
}

impl Sink {
    fn open(path: &Path, rotation: Option<Rotation>) -> io::Result<Self> {
        if path == Path::new("-") {
            return Ok(Self::Stdout);
        }
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::File {
            path: path.to_owned(),
            size: file.metadata()?.len(),
            file,
            rotation,
        })
    }

    /// One write per line: a reader never sees half a line from this writer. A line that
    /// would take the file past its maximum size goes to a new file.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Self::File {
                path,
                file,
                size,
                rotation,
            } => {
                if let Some(r) = rotation
                    && *size > 0
                    && *size + line.len() as u64 > r.max_size
                {
                    rotate(path, r.keep)?;
                    *file = OpenOptions::new().create(true).append(true).open(&*path)?;
                    *size = 0;
                }
                file.write_all(line)?;
                *size += line.len() as u64;
                Ok(())
            }
        }
    }
}

/// `<path>.N` of a rotated trail.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// Shifts `<path>.1..<keep>` up by one (dropping the oldest) and moves `path` to `<path>.1`.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_file(rotated(path, keep)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    for n in (1..keep).rev() {
        match std::fs::rename(rotated(path, n), rotated(path, n + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Opens the sink and starts the writer thread; returns the queue into it.
pub(super) fn start(path: &Path, rotation: Option<Rotation>) -> io::Result<mpsc::Sender<Message>> {
    let mut sink = Sink::open(path, rotation)?;
    let (tx, rx) = mpsc::channel::<Message>();
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || {
            for message in rx {
                match message {
                    Message::Record(r) => {
                        if let Err(e) = sink.write_line(&line_of(r)) {
                            tracing::error!("writing the audit trail: {e}");
                        }
                    }
                    Message::Sync(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })?;
    Ok(tx)
}

/// The bytes of one line: `ts`, `agent`, `kind` first, then the record's fields, then `\n`.
fn line_of(r: Record) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("ts".into(), json!(rfc3339(r.ts)));
    obj.insert("agent".into(), json!(r.agent));
    obj.insert("kind".into(), json!(r.kind));
    if let Value::Object(f) = r.fields {
        obj.extend(f);
    }
    // Serialising a Value of strings and numbers cannot fail.
    let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    line.push(b'\n');
    line
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
