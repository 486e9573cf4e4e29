//! The tamper guard's records: what an agent was refused because it would reach agentwatch
//! itself (BPF LSM only; see agentwatch-ebpf/src/tamper.rs). Each becomes a `tamper_refused`
//! line, counts as an escape attempt, and trips the agent's breaker (signal `tamper`).

use agentwatch_common::{EVENT_TAMPER_REFUSED, TAMPER_BPF, TAMPER_SIGNAL, TamperEvent};
use serde_json::json;

use crate::{
    audit::KernelLine,
    bpf::{c_string, read_record},
};

/// A refused `bpf()` call or signal to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TamperRecord {
    pub agent_id: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `bpf` or `signal`.
    pub what: &'static str,
    /// The bpf command or the signal.
    pub arg: u32,
    /// The signalled daemon's pid (signals only).
    pub target: u32,
    pub ts_ns: u64,
}

/// Decodes a tamper record (`kind` is its first word); None for other kinds.
pub fn decode(kind: u32, bytes: &[u8]) -> Option<TamperRecord> {
    if kind != EVENT_TAMPER_REFUSED {
        return None;
    }
    let e = read_record::<TamperEvent>(bytes)?;
    Some(TamperRecord {
        agent_id: e.agent,
        pid: e.tgid,
        tid: e.pid,
        comm: c_string(&e.comm),
        what: match e.what {
            TAMPER_BPF => "bpf",
            TAMPER_SIGNAL => "signal",
            _ => "unknown",
        },
        arg: e.arg,
        target: e.target,
        ts_ns: e.ts_ns,
    })
}

/// Name of a bpf(2) command, as in the kernel's `enum bpf_cmd` (the number beyond these).
fn bpf_cmd(cmd: u32) -> String {
    const NAMES: [&str; 37] = [
        "BPF_MAP_CREATE",
        "BPF_MAP_LOOKUP_ELEM",
        "BPF_MAP_UPDATE_ELEM",
        "BPF_MAP_DELETE_ELEM",
        "BPF_MAP_GET_NEXT_KEY",
        "BPF_PROG_LOAD",
        "BPF_OBJ_PIN",
        "BPF_OBJ_GET",
        "BPF_PROG_ATTACH",
        "BPF_PROG_DETACH",
        "BPF_PROG_TEST_RUN",
        "BPF_PROG_GET_NEXT_ID",
        "BPF_MAP_GET_NEXT_ID",
        "BPF_PROG_GET_FD_BY_ID",
        "BPF_MAP_GET_FD_BY_ID",
        "BPF_OBJ_GET_INFO_BY_FD",
        "BPF_PROG_QUERY",
        "BPF_RAW_TRACEPOINT_OPEN",
        "BPF_BTF_LOAD",
        "BPF_BTF_GET_FD_BY_ID",
        "BPF_TASK_FD_QUERY",
        "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
        "BPF_MAP_FREEZE",
        "BPF_BTF_GET_NEXT_ID",
        "BPF_MAP_LOOKUP_BATCH",
        "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
        "BPF_MAP_UPDATE_BATCH",
        "BPF_MAP_DELETE_BATCH",
        "BPF_LINK_CREATE",
        "BPF_LINK_UPDATE",
        "BPF_LINK_GET_FD_BY_ID",
        "BPF_LINK_GET_NEXT_ID",
        "BPF_ENABLE_STATS",
        "BPF_ITER_CREATE",
        "BPF_LINK_DETACH",
        "BPF_PROG_BIND_MAP",
        "BPF_TOKEN_CREATE",
    ];
    usize::try_from(cmd)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| cmd.to_string(), |n| (*n).to_owned())
}

impl TamperRecord {
    /// `tamper_refused` (pid, tid, comm, what, and the bpf command or the signal and target).
    pub fn audit_line(&self) -> KernelLine {
        let mut fields = json!({
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "what": self.what,
        });
        if self.what == "signal" {
            fields["signal"] = json!(self.arg);
            fields["target_pid"] = json!(self.target);
        } else {
            fields["bpf_cmd"] = json!(bpf_cmd(self.arg));
        }
        KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: "tamper_refused",
            pid: self.pid,
            fields,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_kinds_into_their_lines() {
        let mut e = TamperEvent {
            kind: EVENT_TAMPER_REFUSED,
            agent: 2,
            pid: 41,
            tgid: 40,
            ts_ns: 9,
            what: TAMPER_BPF,
            arg: 7,
            ..Default::default()
        };
        e.comm[..7].copy_from_slice(b"python3");
        // SAFETY: TamperEvent is plain old data.
        let bytes: [u8; size_of::<TamperEvent>()] = unsafe { std::mem::transmute(e) };
        let r = decode(EVENT_TAMPER_REFUSED, &bytes).unwrap();
        let line = r.audit_line();
        assert_eq!(line.kind, "tamper_refused");
        assert_eq!(
            line.fields,
            json!({"pid": 40, "tid": 41, "comm": "python3", "what": "bpf", "bpf_cmd": "BPF_OBJ_GET"})
        );
        e.what = TAMPER_SIGNAL;
        e.arg = 9;
        e.target = 77;
        // SAFETY: as above.
        let bytes: [u8; size_of::<TamperEvent>()] = unsafe { std::mem::transmute(e) };
        let line = decode(EVENT_TAMPER_REFUSED, &bytes).unwrap().audit_line();
        assert_eq!(line.fields["signal"], 9);
        assert_eq!(line.fields["target_pid"], 77);
        assert_eq!(bpf_cmd(34), "BPF_LINK_DETACH");
        assert_eq!(bpf_cmd(99), "99");
        assert_eq!(decode(1, &bytes), None);
    }
}
