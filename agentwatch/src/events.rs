//! Decoding ring buffer records from the kernel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agentwatch_common::{
    EVENT_EGRESS_CAPPED, EVENT_EGRESS_DENIED, EVENT_EXEC, EVENT_EXEC_DENIED, EgressEvent,
    ExecEvent, HOOK_CONNECT, PROTO_TCP, PROTO_UDP,
};

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Egress(EgressAttempt),
    Exec(ExecRecord),
    /// A record this daemon does not know (a newer kernel object); counted, not dropped silently.
    Unknown {
        kind: u32,
        len: usize,
    },
}

/// A denied or capped egress attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAttempt {
    /// `egress_denied` or `egress_capped`.
    pub kind: &'static str,
    pub agent_id: u32,
    /// Thread id.
    pub tid: u32,
    /// Process id.
    pub pid: u32,
    pub comm: String,
    pub proto: &'static str,
    pub dest: SocketAddr,
    /// `connect` or `sendmsg`.
    pub hook: &'static str,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}

/// An exec of an agent process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRecord {
    /// `exec` or `exec_denied` (killed by the allow-list).
    pub kind: &'static str,
    pub agent_id: u32,
    pub pid: u32,
    /// 0 when the fork predates the programs.
    pub ppid: u32,
    pub comm: String,
    pub path: String,
    pub ts_ns: u64,
}

fn c_string(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Event {
    let kind = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    match kind {
        EVENT_EGRESS_DENIED | EVENT_EGRESS_CAPPED if bytes.len() >= size_of::<EgressEvent>() => {
            // SAFETY: the length was checked; EgressEvent is plain old data of integers and the
            // read is unaligned.
            let e: EgressEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            Event::Egress(egress(&e))
        }
        EVENT_EXEC | EVENT_EXEC_DENIED if bytes.len() >= size_of::<ExecEvent>() => {
            // SAFETY: as above, for ExecEvent.
            let e: ExecEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            Event::Exec(ExecRecord {
                kind: if e.kind == EVENT_EXEC_DENIED {
                    "exec_denied"
                } else {
                    "exec"
                },
                agent_id: e.agent,
                pid: e.pid,
                ppid: e.ppid,
                comm: c_string(&e.comm),
                path: c_string(&e.path),
                ts_ns: e.ts_ns,
            })
        }
        kind => Event::Unknown {
            kind,
            len: bytes.len(),
        },
    }
}

fn egress(e: &EgressEvent) -> EgressAttempt {
    let ip = if e.family == 6 {
        IpAddr::V6(Ipv6Addr::from(e.addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]))
    };
    EgressAttempt {
        kind: if e.kind == EVENT_EGRESS_CAPPED {
            "egress_capped"
        } else {
            "egress_denied"
        },
        agent_id: e.agent,
        tid: e.pid,
        pid: e.tgid,
        comm: c_string(&e.comm),
        proto: proto_name(e.proto),
        dest: SocketAddr::new(ip, e.port),
        hook: if e.hook == HOOK_CONNECT {
            "connect"
        } else {
            "sendmsg"
        },
        ts_ns: e.ts_ns,
    }
}

/// Label of a `PROTO_*` index, as used in metrics and the audit trail.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "other",
    }
}

/// Converts a CLOCK_MONOTONIC timestamp of the kernel to wall-clock time.
pub fn wall_time(ts_ns: u64) -> time::OffsetDateTime {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let mono_now = i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec);
    let age = (mono_now - i128::from(ts_ns)).max(0);
    let wall = time::OffsetDateTime::now_utc();
    wall - time::Duration::nanoseconds(i64::try_from(age).unwrap_or(0))
}

#[cfg(test)]
mod tests {
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
