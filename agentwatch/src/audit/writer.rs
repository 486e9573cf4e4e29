//! The one writer of the audit trail: a thread that owns the file.
//!
//! A thread rather than an async task because every write is blocking file I/O, and a slow disk
//! must stall the trail, never the daemon's tasks (the kernel keeps counting meanwhile).
//!
//! The writer links the hash chain ([`super::chain`]): it alone knows the order lines reach the
//! file in, so it alone computes each line's `prev`. It keeps the last line's link in memory,
//! so the chain runs on across rotation, and reads it back from the file at start-up, so it
//! runs on across restarts.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};

use super::chain;

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
    /// Answered once every earlier message is handled; with `durable`, once it is also on
    /// disk (fsync).
    Sync {
        durable: bool,
        done: mpsc::Sender<()>,
    },
}

/// When the trail is rotated: at `max_size` bytes, keeping `keep` rotated files
/// (`<path>.1` the newest, `<path>.<keep>` the oldest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub max_size: u64,
    pub keep: u32,
}

/// A line written is on disk within this long (fsync), whatever else the writer is doing: a
/// power cut loses at most the last second of the trail.
const SYNC_EVERY: Duration = Duration::from_secs(1);

enum Out {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        size: u64,
        rotation: Option<Rotation>,
        /// The file ends in a line without its newline (a write cut short before this writer
        /// started, or one it could not take back): the next write starts with one.
        torn: bool,
    },
}

/// Where lines go, and the chain's end.
struct Sink {
    out: Out,
    /// The `prev` of the next line: the link of the last line in the trail.
    prev: String,
    /// Lines written since the last fsync.
    unsynced: bool,
}

impl Sink {
    /// Opens the trail and finds where its chain ends:
    /// - the file's last line, whole or torn. A torn line (a crash mid-write, a full disk) is
    ///   chained to as it is, bytes as on disk, and the next line starts on a line of its own:
    ///   the writer never rewrites what is in the trail, and `verify` reports exactly that line
    ///   (not JSON, or no newline) while the chain runs on intact after it;
    /// - an empty or missing file: the last line of `<path>.1`, if any (a daemon that stopped
    ///   between a rotation and the first line of the new file);
    /// - otherwise (a new trail, or stdout, where nothing can be read back): the empty string.
    fn open(path: &Path, rotation: Option<Rotation>) -> io::Result<Self> {
        if path == Path::new("-") {
            return Ok(Self {
                out: Out::Stdout,
                prev: chain::START.to_owned(),
                unsynced: false,
            });
        }
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let (prev, torn) = match chain::tail(path)? {
            Some(t) => (t.prev, t.torn),
            // The new file starts on a line of its own whatever `.1` ends with.
            None => match chain::tail(&rotated(path, 1))? {
                Some(t) => (t.prev, false),
                None => (chain::START.to_owned(), false),
            },
        };
        if torn {
            tracing::warn!(
                path = %path.display(),
                "the audit trail ends in an incomplete line (a write cut short by a crash or a \
                 full disk): the chain goes on from it as it is; `agentwatch audit verify` will \
                 name it"
            );
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            out: Out::File {
                path: path.to_owned(),
                size: file.metadata()?.len(),
                file,
                rotation,
                torn,
            },
            prev,
            unsynced: false,
        })
    }

    /// Writes `r` as the chain's next line. On an error nothing is in the trail and the chain
    /// is as it was (or, if a cut-short write could not be taken back, goes on from what is).
    fn write(&mut self, r: Record) -> io::Result<()> {
        let line = line_of(r, &self.prev);
        let link = chain::link(&line);
        self.out.write_line(&line, &mut self.prev)?;
        self.prev = link;
        self.unsynced = true;
        Ok(())
    }

    /// fsync, if anything was written since the last one.
    fn sync(&mut self) {
        if !self.unsynced {
            return;
        }
        self.unsynced = false;
        match &self.out {
            // A pipe or terminal has nothing to fsync; where the lines end up is the log
            // shipper's to make durable.
            Out::Stdout => {}
            Out::File { file, .. } => {
                if let Err(e) = file.sync_data() {
                    tracing::error!("fsync of the audit trail: {e}");
                }
            }
        }
    }
}

impl Out {
    /// Writes `line` and its newline in one write, so lines never interleave and a failed write
    /// can be taken back whole. A reader that reads while the write runs can still see a line's
    /// start without its end (the kernel publishes a write page by page): a line is written
    /// once its newline is there. A line that would take the file past its maximum size goes to
    /// a new file.
    /// `prev` is the chain's end, updated only when a failed write leaves a torn line behind.
    fn write_line(&mut self, line: &[u8], prev: &mut String) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                let mut buf = Vec::with_capacity(line.len() + 1);
                buf.extend_from_slice(line);
                buf.push(b'\n');
                out.write_all(&buf)?;
                out.flush()
            }
            Self::File {
                path,
                file,
                size,
                rotation,
                torn,
            } => {
                if let Some(r) = rotation
                    && *size > 0
                    && *size + line.len() as u64 + 1 > r.max_size
                {
                    // The rotated file is complete on disk before its name changes.
                    file.sync_data()?;
                    rotate(path, r.keep)?;
                    *file = OpenOptions::new().create(true).append(true).open(&*path)?;
                    *size = 0;
                    *torn = false;
                    sync_dir(path);
                }
                let lead = usize::from(*torn);
                let mut buf = Vec::with_capacity(lead + line.len() + 1);
                if *torn {
                    buf.push(b'\n');
                }
                buf.extend_from_slice(line);
                buf.push(b'\n');
                match write_counted(file, &buf) {
                    Ok(()) => {
                        *size += buf.len() as u64;
                        *torn = false;
                        Ok(())
                    }
                    Err((0, e)) => Err(e),
                    Err((written, e)) => {
                        // A short write (a full disk): take it back, so no line is ever half
                        // written by this writer.
                        match file
                            .metadata()
                            .and_then(|m| file.set_len(m.len().saturating_sub(written as u64)))
                        {
                            Ok(()) => {}
                            Err(t) => {
                                // It stays in the trail: chain to it as it is, as a restarted
                                // writer would, and `verify` names it.
                                tracing::error!(
                                    "taking back a cut-short audit line: {t}; it stays, \
                                     incomplete, and the chain goes on from it"
                                );
                                *size += written as u64;
                                if written > lead {
                                    *prev = chain::link(&buf[lead..written]);
                                    *torn = true;
                                } else {
                                    // Only the newline that ended an earlier torn line.
                                    *torn = false;
                                }
                            }
                        }
                        Err(e)
                    }
                }
            }
        }
    }
}

/// `write_all` that tells how much of `buf` reached the file when it fails.
fn write_counted(file: &mut File, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while written < buf.len() {
        match file.write(&buf[written..]) {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

/// fsyncs the folder of `path`, so the names a rotation gave survive a power cut. Best effort:
/// the lines themselves are safe either way.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), "fsync of the audit folder after rotation: {e}");
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

/// Opens the sink and starts the writer thread; returns the queue into it. `lost` counts the
/// lines that could not be written.
pub(super) fn start(
    path: &Path,
    rotation: Option<Rotation>,
    lost: Arc<AtomicU64>,
) -> io::Result<mpsc::Sender<Message>> {
    let sink = Sink::open(path, rotation)?;
    let (tx, rx) = mpsc::channel::<Message>();
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || run(sink, &rx, &lost))?;
    Ok(tx)
}

/// Lines that could not be written since the trail last worked: written into the trail, as an
/// `audit_lines_lost` line chained like any other, as soon as it works again, so the trail
/// itself says where it has a gap and how large.
struct Gap {
    count: u64,
    first: time::OffsetDateTime,
    last: time::OffsetDateTime,
    error: String,
}

impl Gap {
    fn record(&self) -> Record {
        Record {
            ts: time::OffsetDateTime::now_utc(),
            agent: None,
            kind: "audit_lines_lost".to_owned(),
            fields: serde_json::json!({
                "count": self.count,
                "first": rfc3339(self.first),
                "last": rfc3339(self.last),
                "error": self.error,
            }),
        }
    }
}

/// Writes `r`, or counts it into the gap. An open gap is written first: the trail says it
/// lost lines before it goes on.
fn write_or_count(sink: &mut Sink, gap: &mut Option<Gap>, r: Record, lost: &AtomicU64) -> bool {
    let ts = r.ts;
    if let Some(g) = gap.as_mut() {
        if sink.write(g.record()).is_err() {
            g.count += 1;
            g.last = ts;
            lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        tracing::warn!(
            lost = g.count,
            "the audit trail is writable again; an audit_lines_lost line marks the gap"
        );
        *gap = None;
    }
    match sink.write(r) {
        Ok(()) => true,
        Err(e) => {
            // Once per gap: a full disk would otherwise log as fast as the agents are denied.
            tracing::error!(
                "writing the audit trail: {e}; lines are counted (agentwatch_audit_lines_lost_total) \
                 until it works again, and the gap is then marked in it"
            );
            *gap = Some(Gap {
                count: 1,
                first: ts,
                last: ts,
                error: e.to_string(),
            });
            lost.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// The writer's loop: lines in the order they came, an fsync at most [`SYNC_EVERY`] after the
/// first line it did not cover (also under a steady flood, when the queue never runs dry).
fn run(mut sink: Sink, rx: &mpsc::Receiver<Message>, lost: &AtomicU64) {
    let mut first_unsynced: Option<Instant> = None;
    let mut gap: Option<Gap> = None;
    loop {
        let message = match first_unsynced {
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(t) => rx.recv_timeout(SYNC_EVERY.saturating_sub(t.elapsed())),
        };
        match message {
            Ok(Message::Record(r)) => {
                if write_or_count(&mut sink, &mut gap, r, lost) {
                    first_unsynced.get_or_insert_with(Instant::now);
                }
            }
            Ok(Message::Sync { durable, done }) => {
                if durable {
                    sink.sync();
                    first_unsynced = None;
                }
                let _ = done.send(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Every handle is gone: the daemon is stopping.
                sink.sync();
                return;
            }
        }
        if first_unsynced.is_some_and(|t| t.elapsed() >= SYNC_EVERY) {
            sink.sync();
            first_unsynced = None;
        }
    }
}

/// The bytes of one line, without its newline: `ts`, `agent`, `kind` first, then the record's
/// fields, then `prev`.
///
/// `prev` goes last: a line reads as what happened (`ts`, `agent`, `kind` first, as the
/// contract orders them) with the chain's plumbing after it; and every line ends the same way,
/// `"prev":"<64 hex digits>"}`, so a link can be checked with a shell (cut from the end,
/// `sha256sum`) as well as with `agentwatch audit verify`. A record's own `prev` field is
/// dropped: only the writer links the chain.
fn line_of(r: Record, prev: &str) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("ts".into(), json!(rfc3339(r.ts)));
    obj.insert("agent".into(), json!(r.agent));
    obj.insert("kind".into(), json!(r.kind));
    if let Value::Object(mut f) = r.fields {
        f.shift_remove("prev");
        obj.extend(f);
    }
    obj.insert("prev".into(), json!(prev));
    // Serialising a Value of strings and numbers cannot fail.
    serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
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
