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
    collections::HashSet,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSock, TracePoint, links::FdLink},
};

use crate::{
    bpf::{KernelError, ignore_missing, load_program, map_err, program, take_map},
    cgroup::Cgroup,
    link::Link,
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

/// The maps the escape check keeps: which agent each process belongs to, and which cgroups are
/// nested below an agent's.
pub struct SocketMaps {
    /// tgid -> agent key (the agent cgroup's id, the key of `AGENTS`).
    tasks: HashMap<MapData, u32, u64>,
    /// cgroup id -> agent key, for every cgroup below an agent's own.
    nested: HashMap<MapData, u64, u64>,
}

impl SocketMaps {
    /// Loads (verifies) the programs and takes the maps out of the object.
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        load_program(
            CGROUP_PROGRAM,
            program::<CgroupSock>(ebpf, CGROUP_PROGRAM)?,
            CgroupSock::load,
        )?;
        for (name, _, _) in HOST_PROGRAMS {
            load_program(name, program::<TracePoint>(ebpf, name)?, TracePoint::load)?;
        }
        Ok(Self {
            tasks: take_map(ebpf, "TASKS")?,
            nested: take_map(ebpf, "NESTED")?,
        })
    }

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
    /// Returns how many there are.
    pub(crate) fn sync_nested(
        &mut self,
        agent_key: u64,
        cgroup: &Cgroup,
    ) -> Result<usize, KernelError> {
        let mut want = HashSet::new();
        for dir in descendants(cgroup.path()) {
            if let Ok(id) = Cgroup::open(&dir).and_then(|c| c.id()) {
                want.insert(id);
            }
        }
        for &id in &want {
            self.nested
                .insert(id, agent_key, 0)
                .map_err(map_err("NESTED"))?;
        }
        self.drop_nested(agent_key, &want)?;
        Ok(want.len())
    }

    /// Forgets everything about the agent keyed `agent_key` (it is no longer guarded): its
    /// nested cgroups and its processes, so none of them counts as an escape any more.
    pub(crate) fn forget(&mut self, agent_key: u64) -> Result<(), KernelError> {
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
        let stale: Vec<u64> = self
            .nested
            .iter()
            .filter_map(Result::ok)
            .filter(|&(id, key)| key == agent_key && !keep.contains(&id))
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            ignore_missing(self.nested.remove(&id), "NESTED")?;
        }
        Ok(())
    }
}

/// Every cgroup folder below `root` (not `root` itself).
fn descendants(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
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
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    pin_dir: Option<&Path>,
) -> Result<Link, KernelError> {
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
) -> Result<Vec<Link>, KernelError> {
    crate::link::attach_tracepoints(ebpf, &HOST_PROGRAMS, pin_dir)
}
