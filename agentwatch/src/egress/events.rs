//! Egress records from the ring buffer: denied and capped calls, and their audit lines.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agentwatch_common::{
    EVENT_EGRESS_CAPPED, EVENT_EGRESS_DENIED, EVENT_EGRESS_WOULD_DENY, EgressEvent, HOOK_CONNECT,
    HOOK_ROUTE, PROTO_TCP, PROTO_UDP,
};
use serde_json::json;

use crate::{
    audit::KernelLine,
    bpf::{c_string, read_record},
};

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
    /// `connect`, `sendmsg`, or `route`: a packet with a routing header or IP options,
    /// refused as it left (`pid` 0: the packet may leave in softirq, where no task is its
    /// sender; `dest` is its real next hop).
    pub hook: &'static str,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}

impl EgressAttempt {
    /// `egress_denied` / `egress_capped` (pid, tid, comm, proto, dest "ip:port", hook).
    pub fn audit_line(&self) -> KernelLine {
        KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: self.kind,
            pid: self.pid,
            fields: json!({
                "pid": self.pid,
                "tid": self.tid,
                "comm": self.comm,
                "proto": self.proto,
                "dest": self.dest.to_string(),
                "hook": self.hook,
            }),
        }
    }
}

/// Decodes an egress record (`kind` is its first word); None for other kinds.
pub fn decode(kind: u32, bytes: &[u8]) -> Option<EgressAttempt> {
    if kind != EVENT_EGRESS_DENIED && kind != EVENT_EGRESS_CAPPED && kind != EVENT_EGRESS_WOULD_DENY
    {
        return None;
    }
    read_record::<EgressEvent>(bytes).map(|e| egress(&e))
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
        kind: match e.kind {
            EVENT_EGRESS_CAPPED => "egress_capped",
            EVENT_EGRESS_WOULD_DENY => "egress_would_deny",
            _ => "egress_denied",
        },
        agent_id: e.agent,
        tid: e.pid,
        pid: e.tgid,
        comm: c_string(&e.comm),
        proto: proto_name(e.proto),
        dest: dest_addr(e.family, e.addr, e.port),
        hook: match e.hook {
            HOOK_CONNECT => "connect",
            HOOK_ROUTE => "route",
            _ => "sendmsg",
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
