//! Kernel events (denied calls, execs, refused sockets, escapes) from the ring buffer into the
//! audit trail, and the count of events the kernel could not queue.

use std::{collections::HashSet, time::Duration};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use serde_json::{Value, json};
use tokio::io::unix::AsyncFd;

use super::{Shared, State, lock};
use crate::{
    audit,
    events::{self, Event},
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
        // A process someone else moved out of its agent runs unguarded until it dies: end it
        // before anything else, not even waiting for the state lock.
        // Its name first: the kernel reports the writer's, and the process is about to go.
        let (moved_comm, killed_by_daemon) = match &event {
            Event::Escape(e) if e.moved_doomed => (proc_comm(e.pid), kill(e.pid)),
            _ => (None, false),
        };
        if !written.is_empty() && id_of(&event).is_some_and(|id| written.remove(&id)) {
            continue;
        }
        let s = lock(state);
        match event {
            Event::Egress(e) => s.audit_event(
                e.agent_id,
                e.ts_ns,
                e.kind,
                json!({
                    "pid": e.pid,
                    "tid": e.tid,
                    "comm": e.comm,
                    "proto": e.proto,
                    "dest": e.dest.to_string(),
                    "hook": e.hook,
                }),
            ),
            Event::Exec(e) => {
                // The kernel knows the parent only for forks it saw; ask /proc otherwise.
                let ppid = if e.ppid != 0 {
                    e.ppid
                } else {
                    proc_ppid(e.pid).unwrap_or(0)
                };
                if e.kind == "exec_denied" {
                    tracing::warn!(pid = e.pid, path = %e.path, "exec denied: killed");
                }
                s.audit_event(
                    e.agent_id,
                    e.ts_ns,
                    e.kind,
                    json!({
                        "pid": e.pid,
                        "ppid": ppid,
                        "comm": e.comm,
                        "path": e.path,
                    }),
                );
            }
            Event::Socket(e) => {
                tracing::warn!(pid = e.pid, family = %e.family, sock_type = %e.sock_type, action = e.action, "socket denied");
                s.audit_event(
                    e.agent_id,
                    e.ts_ns,
                    "socket_denied",
                    json!({
                        "pid": e.pid,
                        "tid": e.tid,
                        "comm": e.comm,
                        "family": e.family,
                        "type": e.sock_type,
                        "protocol": e.protocol,
                        "action": e.action,
                    }),
                );
            }
            Event::Escape(e) => {
                tracing::warn!(pid = e.pid, writer = e.writer, to = %e.to, "cgroup escape");
                s.audit_event(
                    e.agent_id,
                    e.ts_ns,
                    "cgroup_escape",
                    json!({
                        "pid": e.pid,
                        "comm": if e.pid == e.writer { Some(e.comm.clone()) } else { moved_comm.clone() },
                        "writer": e.writer,
                        "writer_comm": e.comm,
                        "to": e.to,
                        "action": if e.moved_killed { "killed" } else if killed_by_daemon { "killed_by_daemon" } else { "doomed" },
                        "writer_killed": e.writer_killed,
                    }),
                );
            }
            Event::Unknown { kind, len } => {
                tracing::warn!(kind, len, "unknown event kind from the kernel");
            }
        }
        // The ring buffer forgets a record when its item is dropped: only once its line is
        // written, so a daemon killed in between finds the record again when it restarts.
        // (The kernel's per-agent audit rate bounds how often this waits.)
        s.audit.sync();
        drop(s);
        drop(item);
    }
}

/// The identity of a record's audit line (see [`State::audit_event`]).
fn id_of(e: &Event) -> Option<audit::RecordId> {
    let (ts, kind, pid) = match e {
        Event::Egress(e) => (e.ts_ns, e.kind, e.pid),
        Event::Exec(e) => (e.ts_ns, e.kind, e.pid),
        Event::Socket(e) => (e.ts_ns, "socket_denied", e.pid),
        Event::Escape(e) => (e.ts_ns, "cgroup_escape", e.pid),
        Event::Unknown { .. } => return None,
    };
    Some(audit::RecordId {
        kernel_ts_ns: ts,
        kind: kind.to_owned(),
        pid,
    })
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
fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// The parent pid of `pid` from /proc (None if it is gone).
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
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
    /// Audits a kernel event of agent `agent_id` at its kernel timestamp.
    /// Audits a kernel record. `kernel_ts_ns` (the record's CLOCK_MONOTONIC time) with the
    /// kind and pid identifies it, so a restarted daemon can tell a record it reads again from
    /// one it never wrote.
    fn audit_event(&self, agent_id: u32, ts_ns: u64, kind: &str, mut fields: Value) {
        let agent = self.agents.name_of(agent_id).unwrap_or("");
        fields["kernel_ts_ns"] = json!(ts_ns);
        self.audit
            .record_at(events::wall_time(ts_ns), agent, kind, fields);
    }
}
