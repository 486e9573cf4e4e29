//! A concern is one unit: the programs and maps of one guard (egress, exec, files, sockets,
//! dns, lease, bytes, learn), loaded together, told an agent's policy in phases, forgotten
//! together, attached to an agent's cgroup together.
//!
//! [`crate::agent::Agents`] guards and re-applies with one loop over the concerns:
//! forget (a slot of unknown history), prepare all, apply all, switch (one map write of the
//! agent's state), attach, settle, then, once no program can still read what the switch
//! replaced, retire. The phase names carry the ordering rules that keep every call of an agent
//! judged by a complete policy at every instant:
//! - [`Concern::prepare`] writes beside the live policy: nothing the kernel judges by changes,
//!   but entries added that the old and the new policy both allow;
//! - [`Concern::apply`] writes what the kernel reads under the agent's current flags and
//!   generation just before the switch (caps, ports, deadlines);
//! - [`Concern::settle`] drops what only the old policy allowed, after the switch;
//! - [`Concern::retire`] removes what a program may have found through the state the switch
//!   replaced: after an RCU grace period ([`crate::bpf::load::wait_for_running_programs`]).

use std::{collections::HashSet, path::PathBuf, time::Duration};

use agentwatch_common::{
    AGENT_FLAG_DESTINATIONS, AGENT_FLAG_DNS, AGENT_FLAG_EXEC_ALLOW, AGENT_FLAG_FILES,
    AGENT_FLAG_GATEWAY, AGENT_FLAG_LEARN, AGENT_FLAG_MONITOR_SYSCALLS, DnsPorts, rule_scope,
};
use aya::Ebpf;

use crate::{
    bpf::{KernelError, LinkSet, load::LoadEnv},
    cgroup::Cgroup,
    rules::{egress::CompiledRules, files::FileRule},
};

/// Everything the kernel enforces for one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: CompiledRules,
    /// Hard caps per second (None: no cap).
    pub connects_per_second: Option<u32>,
    pub sends_per_second: Option<u32>,
    /// Denial events per second written one by one; the rest are counted and summarised.
    pub events_per_second: Option<u32>,
    /// Exec allow-list (None: any exec is allowed; Some(empty): every exec is killed).
    pub exec_allow: Option<Vec<PathBuf>>,
    /// File guard prefixes (None: no file guard; Some(empty): every open is outside).
    pub files: Option<Vec<FileRule>>,
    /// Count the agent's syscalls (attaches the host-wide sys_enter hook).
    pub monitor_syscalls: bool,
    /// The agent has hostname rules and its DNS forwarder listens here: its DNS calls go
    /// there, and addresses the forwarder learned for it are allowed.
    pub dns: Option<DnsPorts>,
    /// Egress lease: every call is denied from this long after the agent is guarded (or the
    /// lease extended) on.
    pub lease: Option<Duration>,
    /// Outbound bytes per second; over it packets are dropped in the kernel (None: no cap).
    pub egress_bytes_per_second: Option<u64>,
    /// Learn mode: what the allow-list would deny goes through, counted and reported.
    pub learn: bool,
    /// The most destination records, and the most exec records, the kernel keeps for this
    /// agent in learn mode (`daemon.learn_quota`; 0: no quota of its own).
    pub learn_quota: u64,
    /// The agent has API scopes: it may reach the gateway, also while its egress is revoked
    /// (the gateway refuses it then, with an answer).
    pub gateway: bool,
    /// Count the agent's distinct destinations per second (it has a breaker to judge them).
    pub count_destinations: bool,
}

impl From<CompiledRules> for Policy {
    fn from(rules: CompiledRules) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }
}

/// Flags owned by the policy (the rest belong to the kill switch and breaker).
pub const POLICY_FLAGS: u32 = AGENT_FLAG_DESTINATIONS
    | AGENT_FLAG_EXEC_ALLOW
    | AGENT_FLAG_MONITOR_SYSCALLS
    | AGENT_FLAG_DNS
    | AGENT_FLAG_LEARN
    | AGENT_FLAG_FILES
    | AGENT_FLAG_GATEWAY;

impl Policy {
    /// The agent state's flags this policy turns on (of [`POLICY_FLAGS`]).
    pub fn flags(&self) -> u32 {
        [
            (self.exec_allow.is_some(), AGENT_FLAG_EXEC_ALLOW),
            (self.monitor_syscalls, AGENT_FLAG_MONITOR_SYSCALLS),
            (self.dns.is_some(), AGENT_FLAG_DNS),
            (self.learn, AGENT_FLAG_LEARN),
            (self.files.is_some(), AGENT_FLAG_FILES),
            (self.gateway, AGENT_FLAG_GATEWAY),
            (self.count_destinations, AGENT_FLAG_DESTINATIONS),
        ]
        .into_iter()
        .filter(|&(on, _)| on)
        .fold(0, |f, (_, flag)| f | flag)
    }
}

/// What the kernel knew of a slot before this policy is written to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// New to the kernel, in a clean slot: one free since load, when
    /// [`Concern::sweep_free_slots`] cleared every free slot (a daemon that crashed while
    /// forgetting an agent leaves it half forgotten). A slot freed since is forgotten in full
    /// again before it is used. Guarding a fresh slot scans no map.
    Fresh,
    /// An earlier daemon's pinned agent: its live generation is whatever that daemon wrote
    /// (unknown here), and its other one may be half-written.
    Adopted,
    /// This daemon wrote the live policy itself.
    Live,
}

/// One agent's place in the kernel's maps, as a phase sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The agent's kernel id (index of the per-agent arrays).
    pub id: u32,
    /// The agent cgroup's id (key of `AGENTS`, `TASKS`, `NESTED`).
    pub cgroup_id: u64,
    /// The rule generation in force before the switch (0 or 1).
    pub generation: u32,
    pub history: History,
}

impl Slot {
    /// The rule scope in force before the switch.
    pub fn live_scope(&self) -> u32 {
        rule_scope(self.id, self.generation)
    }

    /// The rule scope a new policy is written to, and in force after the switch.
    pub fn next_scope(&self) -> u32 {
        rule_scope(self.id, self.generation ^ 1)
    }
}

/// One map of the object with the key and value sizes this build expects of it: a pinned map
/// of another layout (an older agentwatch) is refused rather than misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub key: u32,
    pub value: u32,
}

impl MapSpec {
    pub const fn new(name: &'static str, key: usize, value: usize) -> Self {
        // Map key and value sizes are u32 in the kernel; every layout here is far below.
        Self {
            name,
            key: key as u32,
            value: value as u32,
        }
    }
}

/// How a concern is made: the maps it declares (the pin check is built from them) and loading
/// (verifying) its programs and taking its maps out of the object.
pub trait Load: Sized {
    const MAPS: &'static [MapSpec];
    fn load(obj: &mut Ebpf, env: &LoadEnv) -> Result<Self, KernelError>;
}

/// What a concern does for an agent, phase by phase (see the module's docs for the order).
/// Every phase does nothing unless the concern says otherwise.
pub trait Concern {
    /// Its name, for logs and errors.
    fn name(&self) -> &'static str;

    /// At load, before any agent is guarded: removes, in one pass over its maps, what it keeps
    /// of every slot not in `live` (the ids in the kernel's agent state), which a daemon that
    /// crashed while forgetting an agent leaves behind. Every free slot is then clean, so
    /// guarding a [`History::Fresh`] one scans nothing: start-up is linear in agents.
    fn sweep_free_slots(&mut self, _live: &HashSet<u32>) -> Result<(), KernelError> {
        Ok(())
    }

    /// Clears slot `slot.id` (and what is keyed by `slot.cgroup_id`), so the next agent in it
    /// starts clean. `last`: the policy written there, when this daemon knows it (what it wrote
    /// is removed exactly, without scanning the maps).
    fn forget(&mut self, _slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        Ok(())
    }

    /// Writes beside the live policy what `new` adds.
    fn prepare(&mut self, _slot: Slot, _new: &Policy) -> Result<(), KernelError> {
        Ok(())
    }

    /// Undoes [`Concern::prepare`] of `prepared`, back to `live` (the switch did not happen).
    fn abort(
        &mut self,
        _slot: Slot,
        _prepared: &Policy,
        _live: &Policy,
    ) -> Result<(), KernelError> {
        Ok(())
    }

    /// Writes, just before the switch, what the kernel reads under any generation: `old` is
    /// the live policy (None: this daemon did not write it).
    fn apply(
        &mut self,
        _slot: Slot,
        _old: Option<&Policy>,
        _new: &Policy,
    ) -> Result<(), KernelError> {
        Ok(())
    }

    /// The names of the programs [`Concern::attach`] attaches to an agent's cgroup (their
    /// links' names).
    fn programs(&self) -> &'static [&'static str] {
        &[]
    }

    /// Does an agent under `policy` need this concern's programs on its cgroup? A program
    /// runs on every call of its hook, so a concern an agent does not use is not attached
    /// (pay only for what is used). Once attached, it stays attached while the agent is
    /// guarded: what an earlier policy started may still need it (a socket redirected).
    fn needed_by(&self, _policy: &Policy) -> bool {
        true
    }

    /// Attaches its programs to the agent's cgroup (pinned under `pin_dir`; pins of an earlier
    /// daemon adopted, never detached) and records what was attached in `links`, which undoes
    /// them if a later concern fails.
    fn attach(
        &mut self,
        _obj: &mut Ebpf,
        _cgroup: &Cgroup,
        _pin_dir: Option<&std::path::Path>,
        _links: &mut LinkSet,
    ) -> Result<(), KernelError> {
        Ok(())
    }

    /// After the switch: drops what only the old policy allowed (the slot's `generation` is
    /// still the one before the switch).
    fn settle(&mut self, _slot: Slot, _new: &Policy) -> Result<(), KernelError> {
        Ok(())
    }

    /// Once no program can still be reading it: removes what the switch replaced. `old`: the
    /// policy before the switch (None: this daemon did not write it; found by scanning).
    fn retire(
        &mut self,
        _slot: Slot,
        _old: Option<&Policy>,
        _new: &Policy,
    ) -> Result<(), KernelError> {
        Ok(())
    }
}
