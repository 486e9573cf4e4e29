//! Decoding ring buffer records from the kernel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agentwatch_common::{
    ESCAPE_FLAG_MOVED_DOOMED, ESCAPE_FLAG_MOVED_KILLED, ESCAPE_FLAG_WRITER_KILLED,
    EVENT_CGROUP_ESCAPE, EVENT_EGRESS_CAPPED, EVENT_EGRESS_DENIED, EVENT_EXEC, EVENT_EXEC_DENIED,
    EVENT_SOCKET_DENIED, EVENT_SOCKET_KILLED, EgressEvent, EscapeEvent, ExecEvent, HOOK_CONNECT,
    PROTO_TCP, PROTO_UDP, SocketEvent,
};

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Egress(EgressAttempt),
    Exec(ExecRecord),
    Socket(SocketAttempt),
    Escape(EscapeRecord),
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

/// A socket an agent process was refused (raw inet socket) or killed for (packet socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAttempt {
    /// `refused` (EPERM) or `killed` (SIGKILL before socket() returned).
    pub action: &'static str,
    pub agent_id: u32,
    pub tid: u32,
    pub pid: u32,
    pub comm: String,
    /// `AF_*` name, e.g. `AF_PACKET`, or the number.
    pub family: String,
    /// `SOCK_*` name (flags masked off), e.g. `SOCK_RAW`, or the number.
    pub sock_type: String,
    pub protocol: u32,
    pub ts_ns: u64,
}

/// A process that left its agent's cgroup subtree (or was moved into another agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscapeRecord {
    /// The agent it left.
    pub agent_id: u32,
    /// The moved process.
    pub pid: u32,
    /// The process that wrote cgroup.procs (equals `pid` for a self-move), and its comm.
    pub writer: u32,
    pub comm: String,
    /// Destination cgroup path (in the cgroup2 hierarchy) and id.
    pub to: String,
    pub dst_id: u64,
    /// Killed in the kernel as it moved itself.
    pub moved_killed: bool,
    /// The writer, an agent process, was killed in the kernel.
    pub writer_killed: bool,
    /// The moved process could not be signalled from the hook: the daemon kills it when it
    /// reads this, the kernel at its next socket() call.
    pub moved_doomed: bool,
    pub ts_ns: u64,
}

fn c_string(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// A record of type `T` from the start of `bytes`, if they are long enough.
fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: the length was checked; a Pod type is plain old data for which any bytes are
        // a value, and the read is unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
    })
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Event {
    let kind = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    match kind {
        EVENT_EGRESS_DENIED | EVENT_EGRESS_CAPPED if let Some(e) = read::<EgressEvent>(bytes) => {
            Event::Egress(egress(&e))
        }
        EVENT_EXEC | EVENT_EXEC_DENIED if let Some(e) = read::<ExecEvent>(bytes) => {
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
        EVENT_SOCKET_DENIED | EVENT_SOCKET_KILLED if let Some(e) = read::<SocketEvent>(bytes) => {
            Event::Socket(SocketAttempt {
                action: if e.kind == EVENT_SOCKET_KILLED {
                    "killed"
                } else {
                    "refused"
                },
                agent_id: e.agent,
                tid: e.pid,
                pid: e.tgid,
                comm: c_string(&e.comm),
                family: family_name(e.family),
                sock_type: type_name(e.sock_type),
                protocol: e.protocol,
                ts_ns: e.ts_ns,
            })
        }
        EVENT_CGROUP_ESCAPE if let Some(e) = read::<EscapeEvent>(bytes) => {
            Event::Escape(EscapeRecord {
                agent_id: e.agent,
                pid: e.pid,
                writer: e.writer,
                comm: c_string(&e.comm),
                to: c_string(&e.dst_path),
                dst_id: e.dst_id,
                moved_killed: e.flags & ESCAPE_FLAG_MOVED_KILLED != 0,
                writer_killed: e.flags & ESCAPE_FLAG_WRITER_KILLED != 0,
                moved_doomed: e.flags & ESCAPE_FLAG_MOVED_DOOMED != 0,
                ts_ns: e.ts_ns,
            })
        }
        kind => Event::Unknown {
            kind,
            len: bytes.len(),
        },
    }
}

/// A destination as the egress hooks report it: `family` 4 or 6, an IPv4 address in the first
/// 4 bytes of `addr`.
pub fn dest_addr(family: u8, addr: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == 6 {
        IpAddr::V6(Ipv6Addr::from(addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

fn egress(e: &EgressEvent) -> EgressAttempt {
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
        dest: dest_addr(e.family, e.addr, e.port),
        hook: if e.hook == HOOK_CONNECT {
            "connect"
        } else {
            "sendmsg"
        },
        ts_ns: e.ts_ns,
    }
}

/// Name of an address family as in the C headers (the number when it has none here).
pub fn family_name(family: u32) -> String {
    match family {
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        n => n.to_string(),
    }
}

/// Name of a socket type, SOCK_NONBLOCK/SOCK_CLOEXEC masked off (the number when unnamed).
pub fn type_name(sock_type: u32) -> String {
    match sock_type & 0xf {
        1 => "SOCK_STREAM".into(),
        2 => "SOCK_DGRAM".into(),
        3 => "SOCK_RAW".into(),
        5 => "SOCK_SEQPACKET".into(),
        10 => "SOCK_PACKET".into(),
        n => n.to_string(),
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
