//! Kernel events (denied calls, execs, refused sockets, escapes) from the ring buffer into the
//! audit trail, and the count of events the kernel could not queue.

use std::{collections::HashSet, time::Duration};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::io::unix::AsyncFd;

use super::{Shared, State, lock};
use crate::{
    audit,
    events::{self, Event},
    files,
};

/// Reads the ring buffer for as long as the daemon runs. `written` are the records whose lines
/// the trail already ends with ([`audit::recent_kernel_records`]): a daemon killed after
/// writing a line but before the ring buffer forgot its record finds that record again, and
/// skips it.
pub(super) async fn read_events(
    state: Shared,
    ring: RingBuf<MapData>,
    mut written: HashSet<audit::RecordId>,
) -> Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always reports that same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    loop {
        // Events that arrived while no daemon ran are in the pinned buffer: drain first.
        drain(ring.get_mut(), &state, &mut written);
        let mut guard = ring.readable_mut().await?;
        drain(guard.get_inner_mut(), &state, &mut written);
        guard.clear_ready();
    }
}

fn drain(ring: &mut RingBuf<MapData>, state: &Shared, written: &mut HashSet<audit::RecordId>) {
    while let Some(item) = ring.next() {
        let event = events::decode(&item);
        // Without BPF LSM: the agent whose open the daemon found outside its list.
        let mut act_on_file = None;
        // An agent that tried to reach agentwatch itself: its breaker trips (`tamper`).
        let mut act_on_tamper = None;
        let line = match &event {
            Event::Egress(e) => e.audit_line(),
            Event::Exec(e) => {
                if e.kind == "exec_denied" {
                    tracing::warn!(pid = e.pid, path = %e.path, "exec denied: killed");
                }
                e.audit_line()
            }
            Event::Socket(e) => {
                tracing::warn!(pid = e.pid, family = %e.family, sock_type = %e.sock_type, action = e.action, "socket denied");
                e.audit_line()
            }
            Event::Escape(e) => {
                // A process someone else moved out of its agent runs unguarded until it dies:
                // end it before anything else, not even waiting for the state lock (its name
                // first: the kernel reports the writer's).
                let (moved_comm, mut found_in, killed) = if e.moved_doomed {
                    (proc_comm(e.pid), proc_cgroup(e.pid), kill(e.pid))
                } else {
                    (None, None, false)
                };
                if e.to.is_empty() && found_in.is_none() && e.dst_id != 0 {
                    // The child was already dead (the kernel ended it at its first socket()):
                    // its cgroup is named by the id the kernel read.
                    found_in = cgroup_path_of(e.dst_id);
                }
                tracing::warn!(pid = e.pid, writer = e.writer, to = %e.to, clone = e.clone, "cgroup escape");
                e.audit_line(moved_comm, killed, found_in)
            }
            Event::File(f) if f.refused => {
                tracing::warn!(pid = f.pid, path = %f.path, access = f.access(), "file open refused");
                // A refused hard link has no path by nature; any other refusal with none is
                // one the kernel could not name (`bpf_d_path` failed: refused all the same).
                let from = if f.path.is_empty() && !f.link {
                    files::PathFrom::Unknown
                } else {
                    files::PathFrom::Passed
                };
                f.audit_line(&f.path, from)
            }
            Event::File(f) => {
                // Judged here, outside the lock: resolving reads /proc.
                let Some(rules) = lock(state).agents.files_of(f.agent_id) else {
                    continue;
                };
                let (path, from) = f.resolve();
                if files::admitted(&rules, &path, f.write) {
                    continue;
                }
                tracing::warn!(pid = f.pid, path = %path, from = ?from, access = f.access(), "file open outside the list (detected)");
                act_on_file = Some(f.agent_id);
                f.audit_line(&path, from)
            }
            Event::Tamper(t) => {
                tracing::warn!(
                    pid = t.pid,
                    what = t.what,
                    arg = t.arg,
                    "tamper refused in the kernel"
                );
                act_on_tamper = Some(t.agent_id);
                t.audit_line(&lock(state).protected)
            }
            Event::Unknown { kind, len } => {
                tracing::warn!(kind, len, "unknown event kind from the kernel");
                continue;
            }
        };
        if !written.is_empty() && written.remove(&line.id()) {
            continue;
        }
        let mut s = lock(state);
        s.audit_event(line);
        if let Some(id) = act_on_file
            && let Some(name) = s.agents.name_of(id).map(str::to_owned)
        {
            *s.files_detected.entry(name.clone()).or_default() += 1;
            s.trip_on_file(&name);
        }
        // The ring buffer forgets a record when its item is dropped: only once its line is
        // written, so a daemon killed in between finds the record again when it restarts.
        // (The kernel's per-agent audit rate bounds how often this waits.)
        if let Some(id) = act_on_tamper
            && let Some(name) = s.agents.name_of(id).map(str::to_owned)
        {
            s.trip_on(&name, "tamper");
        }
        s.audit.flush();
        drop(s);
        drop(item);
    }
}

/// SIGKILLs `pid`; false if it is already gone.
fn kill(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

/// The name (comm) of process `pid` from /proc (None if it is gone).
/// The cgroup2 path of process `pid` (`0::` in /proc/PID/cgroup), as the kernel's escape
/// records name destinations.
fn proc_cgroup(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// The cgroup2 path (from the mount's root, as the kernel names them) of the cgroup with id
/// `id` (its directory's inode number), found by walking the hierarchy. Only for the rare
/// clone escape whose child is already gone.
fn cgroup_path_of(id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let root = crate::cgroup::cgroup2_mount().ok()?;
    let dir = std::iter::once(root.clone())
        .chain(crate::sockets::descendants(&root))
        .find(|dir| std::fs::metadata(dir).is_ok_and(|m| m.ino() == id))?;
    let rel = dir.strip_prefix(&root).ok()?;
    Some(format!("/{}", rel.display()))
}

fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// The kernel counts events it could not queue; report every increase, never drop silently.
pub(super) async fn watch_lost(state: Shared) -> Result<()> {
    let mut seen = lock(&state).agents.kernel().events_lost()?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let s = lock(&state);
        let lost = s.agents.kernel().events_lost()?;
        if lost > seen {
            tracing::warn!(
                lost = lost - seen,
                "event ring buffer was full: events lost"
            );
            s.audit_daemon(
                "events_lost",
                json!({ "count": lost - seen, "total": lost }),
            );
            seen = lost;
        }
    }
}

impl State {
    /// Audits a kernel record's line at the record's time. `kernel_ts_ns` (the record's
    /// CLOCK_MONOTONIC time) with the kind and pid identifies it, so a restarted daemon can
    /// tell a record it reads again from one it never wrote.
    fn audit_event(&self, line: audit::KernelLine) {
        let agent = self.agents.name_of(line.agent_id).unwrap_or("");
        let mut fields = line.fields;
        fields["kernel_ts_ns"] = json!(line.ts_ns);
        self.audit
            .record_at(events::wall_time(line.ts_ns), agent, line.kind, fields);
    }
}
