//! Escape guards: the userspace half of `agentwatch-ebpf/src/sockets.rs`.
//!
//! - raw inet sockets are refused by a cgroup `sock_create` program attached to each agent's
//!   cgroup beside the egress programs;
//! - packet sockets (which no cgroup hook sees) cost the creating process its life, in the
//!   `sys_enter_socket` tracepoint;
//! - a process that leaves its agent's cgroup subtree (or is moved into another agent) is killed
//!   from the `cgroup_attach_task` tracepoint, or, when the hook cannot signal it (someone else
//!   moved it), by the daemon as soon as it reads the event (and by the kernel at its next
//!   socket() call).
//!
//! The escape check needs to know which agent a process came from: the kernel tracks forks and
//! moves in `TASKS`, the daemon seeds it with the processes an agent already has when it is
//! guarded, and keeps `NESTED` (cgroups below an agent's) up to date.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use agentwatch_common::{
    ESCAPE_FLAG_CLONE, ESCAPE_FLAG_MOVED_DOOMED, ESCAPE_FLAG_MOVED_KILLED, ESCAPE_FLAG_REFUSED,
    ESCAPE_FLAG_WRITER_KILLED, EVENT_CGROUP_ESCAPE, EVENT_SOCKET_DENIED, EVENT_SOCKET_KILLED,
    EscapeEvent, SocketEvent,
};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSock, RawTracePoint, TracePoint, links::FdLink},
};

use serde_json::json;

use crate::{
    audit::KernelLine,
    bpf::{
        KernelError, Link, LinkSet, c_string, ignore_missing, load::LoadEnv, load_program, map_err,
        program, read_record, take_map,
    },
    cgroup::Cgroup,
    concern::{Concern, History, Load, MapSpec, Policy, Slot},
};

/// The per-agent program (cgroup sock_create).
pub const CGROUP_PROGRAM: &str = "sockets_create";

/// The host-wide tracepoints: (name in the object, category, tracepoint). They act only on
/// agents' tasks (and on doomed processes); for anyone else they return at once. A syscall
/// tracepoint still costs every process on the host: the kernel sends every syscall of every
/// task down its slow path while one is attached (see README, "Security model").
pub const HOST_PROGRAMS: [(&str, &str, &str); 3] = [
    ("sockets_sys_enter_socket", "syscalls", "sys_enter_socket"),
    ("sockets_cgroup_attach_task", "cgroup", "cgroup_attach_task"),
    ("sockets_sched_process_exit", "sched", "sched_process_exit"),
];

/// The host-wide raw tracepoint that catches `clone3(CLONE_INTO_CGROUP)` out of an agent
/// (its record carries the new task and the clone flags; the plain tracepoint's does not carry
/// the task). Every fork on the host runs it; it returns at the flag test unless the flag is
/// set.
pub const RAW_HOST_PROGRAM: (&str, &str) = ("sockets_task_newtask", "task_newtask");

/// The maps the escape check keeps: which agent each process belongs to, and which cgroups are
/// nested below an agent's.
pub struct SocketMaps {
    /// tgid -> agent key (the agent cgroup's id, the key of `AGENTS`).
    tasks: HashMap<MapData, u32, u64>,
    /// cgroup id -> agent key, for every cgroup below an agent's own.
    nested: HashMap<MapData, u64, u64>,
    /// `nested` as written, by agent key. The daemon is the map's only writer, so it is read
    /// once (at load: an earlier daemon's entries) and the sweep's sync scans nothing: a
    /// scan walks every bucket of the map, and it ran once per agent a second.
    nested_of: StdHashMap<u64, HashSet<u64>>,
}

impl Load for SocketMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("TASKS", 4, 8),
        MapSpec::new("NESTED", 8, 8),
        MapSpec::new("DOOMED", 4, 4),
        MapSpec::new("DOOMED_COUNT", 4, 8),
    ];

    /// Loads (verifies) the programs and takes the maps out of the object.
    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        load_program(
            CGROUP_PROGRAM,
            program::<CgroupSock>(ebpf, CGROUP_PROGRAM)?,
            CgroupSock::load,
        )?;
        for (name, _, _) in HOST_PROGRAMS {
            load_program(name, program::<TracePoint>(ebpf, name)?, TracePoint::load)?;
        }
        let (raw, _) = RAW_HOST_PROGRAM;
        load_program(
            raw,
            program::<RawTracePoint>(ebpf, raw)?,
            RawTracePoint::load,
        )?;
        let nested: HashMap<MapData, u64, u64> = take_map(ebpf, "NESTED")?;
        let mut nested_of: StdHashMap<u64, HashSet<u64>> = StdHashMap::new();
        for (id, key) in nested.iter().filter_map(Result::ok) {
            nested_of.entry(key).or_default().insert(id);
        }
        Ok(Self {
            tasks: take_map(ebpf, "TASKS")?,
            nested,
            nested_of,
        })
    }
}

impl Concern for SocketMaps {
    fn name(&self) -> &'static str {
        "sockets"
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        match slot.history {
            // A cgroup new to the kernel has no processes or nested cgroups recorded (and
            // forgetting scans every process the kernel tracks).
            History::Fresh => Ok(()),
            _ => self.forget_cgroup(slot.cgroup_id),
        }
    }

    fn programs(&self) -> &'static [&'static str] {
        &[CGROUP_PROGRAM]
    }

    fn attach(
        &mut self,
        obj: &mut Ebpf,
        cgroup: &Cgroup,
        pin_dir: Option<&Path>,
        links: &mut LinkSet,
    ) -> Result<(), KernelError> {
        links.push(attach(obj, cgroup, pin_dir)?);
        Ok(())
    }
}

impl SocketMaps {
    /// Records `pids` as processes of the agent keyed `agent_key` (those already in its cgroup
    /// when it is guarded; later ones are recorded by the kernel at fork and at moves in).
    pub(crate) fn seed_tasks(&mut self, agent_key: u64, pids: &[u32]) -> Result<(), KernelError> {
        for &pid in pids {
            self.tasks
                .insert(pid, agent_key, 0)
                .map_err(map_err("TASKS"))?;
        }
        Ok(())
    }

    /// Makes `NESTED` hold exactly the cgroups below `cgroup` (the agent keyed `agent_key`).
    /// `nested`: whether it may have any ([`crate::cgroup::Events::has_nested`]); without,
    /// no walk. Returns how many there are.
    pub(crate) fn sync_nested(
        &mut self,
        agent_key: u64,
        cgroup: &Cgroup,
        nested: bool,
    ) -> Result<usize, KernelError> {
        let mut want = HashSet::new();
        let below = if nested {
            descendants(cgroup.path())
        } else {
            Vec::new()
        };
        for dir in below {
            if let Ok(id) = Cgroup::open(&dir).and_then(|c| c.id()) {
                want.insert(id);
            }
        }
        let have = self.nested_of.entry(agent_key).or_default();
        let new: Vec<u64> = want.difference(have).copied().collect();
        for id in new {
            self.nested
                .insert(id, agent_key, 0)
                .map_err(map_err("NESTED"))?;
            have.insert(id);
        }
        let n = want.len();
        self.drop_nested(agent_key, &want)?;
        Ok(n)
    }

    /// Forgets everything about the agent keyed `agent_key` (it is no longer guarded): its
    /// nested cgroups and its processes, so none of them counts as an escape any more.
    pub(crate) fn forget_cgroup(&mut self, agent_key: u64) -> Result<(), KernelError> {
        self.drop_nested(agent_key, &HashSet::new())?;
        let stale: Vec<u32> = self
            .tasks
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, key)| key == agent_key)
            .map(|(pid, _)| pid)
            .collect();
        for pid in stale {
            ignore_missing(self.tasks.remove(&pid), "TASKS")?;
        }
        Ok(())
    }

    fn drop_nested(&mut self, agent_key: u64, keep: &HashSet<u64>) -> Result<(), KernelError> {
        let Some(have) = self.nested_of.get_mut(&agent_key) else {
            return Ok(());
        };
        let stale: Vec<u64> = have.difference(keep).copied().collect();
        for id in stale {
            ignore_missing(self.nested.remove(&id), "NESTED")?;
            have.remove(&id);
        }
        if have.is_empty() {
            self.nested_of.remove(&agent_key);
        }
        Ok(())
    }
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
    /// By `clone3(CLONE_INTO_CGROUP)` (the child started outside), not by a move.
    pub clone: bool,
    /// Refused before anything left (BPF LSM): the clone failed with EPERM.
    pub refused: bool,
    pub ts_ns: u64,
}

impl SocketAttempt {
    /// `socket_denied` (pid, tid, comm, family, type, protocol, action).
    pub fn audit_line(&self) -> KernelLine {
        KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: "socket_denied",
            pid: self.pid,
            fields: json!({
                "pid": self.pid,
                "tid": self.tid,
                "comm": self.comm,
                "family": self.family,
                "type": self.sock_type,
                "protocol": self.protocol,
                "action": self.action,
            }),
        }
    }
}

impl EscapeRecord {
    /// `cgroup_escape` (pid and comm of the moved process, writer and writer_comm, to, action,
    /// writer_killed, via). The kernel reports the writer's comm; `moved_comm` is the moved
    /// process's when the daemon read it, and `killed_by_daemon` says the daemon ended it.
    /// `to` is the destination the kernel named, or for a clone the child's cgroup as the
    /// daemon read it (`found_in`) before ending it.
    pub fn audit_line(
        &self,
        moved_comm: Option<String>,
        killed_by_daemon: bool,
        found_in: Option<String>,
    ) -> KernelLine {
        let comm = if self.pid == self.writer {
            Some(self.comm.clone())
        } else {
            moved_comm
        };
        let to = if self.to.is_empty() {
            found_in.unwrap_or_default()
        } else {
            self.to.clone()
        };
        let action = if self.refused {
            "refused"
        } else if self.moved_killed {
            "killed"
        } else if killed_by_daemon {
            "killed_by_daemon"
        } else {
            "doomed"
        };
        KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: "cgroup_escape",
            pid: self.pid,
            fields: json!({
                "pid": self.pid,
                "comm": comm,
                "writer": self.writer,
                "writer_comm": self.comm,
                "to": to,
                "action": action,
                "writer_killed": self.writer_killed,
                "via": if self.clone { "clone3" } else { "move" },
            }),
        }
    }
}

/// Decodes a socket record (`kind` is its first word); None for other kinds.
pub fn decode_socket(kind: u32, bytes: &[u8]) -> Option<SocketAttempt> {
    if kind != EVENT_SOCKET_DENIED && kind != EVENT_SOCKET_KILLED {
        return None;
    }
    let e = read_record::<SocketEvent>(bytes)?;
    Some(SocketAttempt {
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

/// Decodes an escape record (`kind` is its first word); None for other kinds.
pub fn decode_escape(kind: u32, bytes: &[u8]) -> Option<EscapeRecord> {
    if kind != EVENT_CGROUP_ESCAPE {
        return None;
    }
    let e = read_record::<EscapeEvent>(bytes)?;
    Some(EscapeRecord {
        agent_id: e.agent,
        pid: e.pid,
        writer: e.writer,
        comm: c_string(&e.comm),
        to: c_string(&e.dst_path),
        dst_id: e.dst_id,
        moved_killed: e.flags & ESCAPE_FLAG_MOVED_KILLED != 0,
        writer_killed: e.flags & ESCAPE_FLAG_WRITER_KILLED != 0,
        moved_doomed: e.flags & ESCAPE_FLAG_MOVED_DOOMED != 0,
        clone: e.flags & ESCAPE_FLAG_CLONE != 0,
        refused: e.flags & ESCAPE_FLAG_REFUSED != 0,
        ts_ns: e.ts_ns,
    })
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

/// Every cgroup folder below `root` (not `root` itself).
pub(crate) fn descendants(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        if crate::cgroup::is_leaf(std::fs::metadata(&dir)) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
                todo.push(e.path());
            }
        }
    }
    out
}

/// Attaches the sock_create program to `cgroup` (single mode, pinned under `pin_dir` when
/// given; a pin of an earlier daemon is adopted).
fn attach(ebpf: &mut Ebpf, cgroup: &Cgroup, pin_dir: Option<&Path>) -> Result<Link, KernelError> {
    let dir = cgroup.dir()?;
    Link::pinned_or_attach(pin_dir, CGROUP_PROGRAM, || {
        let attach_err = |source| KernelError::Attach {
            name: CGROUP_PROGRAM,
            cgroup: cgroup.path().display().to_string(),
            source,
        };
        let prog = program::<CgroupSock>(ebpf, CGROUP_PROGRAM)?;
        let id = prog
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|source| KernelError::Link {
            name: CGROUP_PROGRAM,
            source,
        })
    })
}

/// Attaches the host-wide tracepoints (pinned under `pin_dir` when given; pins of an earlier
/// daemon are adopted).
pub(crate) fn attach_host(
    ebpf: &mut Ebpf,
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    crate::bpf::link::attach_tracepoints(ebpf, &HOST_PROGRAMS, pin_dir, links)?;
    let (name, tracepoint) = RAW_HOST_PROGRAM;
    links.push(Link::pinned_or_attach(pin_dir, name, || {
        let prog = program::<RawTracePoint>(ebpf, name)?;
        let id = prog
            .attach(tracepoint)
            .map_err(|source| KernelError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| KernelError::Program { name, source })?;
        Ok(FdLink::from(link))
    })?);
    Ok(())
}
