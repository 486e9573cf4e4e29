//! Records from the kernel's ring buffer. Each concern decodes its own kinds and says what
//! audit line each becomes (`egress::events`, `exec`, `sockets`); this only tells them apart.

pub use crate::{
    egress::events::{EgressAttempt, dest_addr, proto_name},
    exec::ExecRecord,
    files::FileRecord,
    sockets::{EscapeRecord, SocketAttempt},
    tamper::TamperRecord,
};

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Egress(EgressAttempt),
    Exec(ExecRecord),
    Socket(SocketAttempt),
    Escape(EscapeRecord),
    File(FileRecord),
    Tamper(TamperRecord),
    /// A record this daemon does not know (a newer kernel object); counted, not dropped silently.
    Unknown {
        kind: u32,
        len: usize,
    },
}

/// Decodes one ring buffer record (its first word is its kind).
pub fn decode(bytes: &[u8]) -> Event {
    let kind = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    crate::egress::events::decode(kind, bytes)
        .map(Event::Egress)
        .or_else(|| crate::exec::decode(kind, bytes).map(Event::Exec))
        .or_else(|| crate::sockets::decode_socket(kind, bytes).map(Event::Socket))
        .or_else(|| crate::sockets::decode_escape(kind, bytes).map(Event::Escape))
        .or_else(|| crate::files::decode(kind, bytes).map(Event::File))
        .or_else(|| crate::tamper::decode(kind, bytes).map(Event::Tamper))
        .unwrap_or(Event::Unknown {
            kind,
            len: bytes.len(),
        })
}

/// Converts a CLOCK_MONOTONIC time (a kernel timestamp, or a deadline ahead) to wall-clock time.
pub fn wall_time(ts_ns: u64) -> time::OffsetDateTime {
    let now = crate::bpf::ktime_ns();
    let ahead = i64::try_from(ts_ns.saturating_sub(now)).unwrap_or(i64::MAX);
    let behind = i64::try_from(now.saturating_sub(ts_ns)).unwrap_or(i64::MAX);
    time::OffsetDateTime::now_utc() + time::Duration::nanoseconds(ahead)
        - time::Duration::nanoseconds(behind)
}

#[cfg(test)]
mod tests {
    use agentwatch_common::{EVENT_EGRESS_DENIED, EgressEvent, HOOK_CONNECT, PROTO_TCP};

    use super::*;

    #[test]
    fn decodes_egress_events() {
        let mut e = EgressEvent {
            kind: EVENT_EGRESS_DENIED,
            agent: 3,
            pid: 11,
            tgid: 10,
            ts_ns: 5,
            port: 8443,
            family: 4,
            proto: PROTO_TCP,
            hook: HOOK_CONNECT,
            ..Default::default()
        };
        e.comm[..4].copy_from_slice(b"curl");
        e.addr[..4].copy_from_slice(&[127, 0, 0, 9]);
        // SAFETY: EgressEvent is plain old data.
        let bytes: [u8; size_of::<EgressEvent>()] = unsafe { std::mem::transmute(e) };
        let Event::Egress(a) = decode(&bytes) else {
            panic!("not egress")
        };
        assert_eq!(a.dest.to_string(), "127.0.0.9:8443");
        assert_eq!((a.pid, a.tid, a.agent_id), (10, 11, 3));
        assert_eq!(a.comm, "curl");
        assert_eq!(
            (a.proto, a.hook, a.kind),
            ("tcp", "connect", "egress_denied")
        );
        assert_eq!(
            decode(&bytes[..10]),
            Event::Unknown {
                kind: EVENT_EGRESS_DENIED,
                len: 10
            }
        );
    }
}
