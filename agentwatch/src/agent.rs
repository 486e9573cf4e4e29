//! Guarded agents: the userspace half of `agentwatch-ebpf/src/agent.rs`.
//!
//! [`Agents`] owns the loaded kernel object and, per agent, its id, cgroup, live rule
//! generation and links. The order of every operation is chosen so that no call of an agent is
//! ever judged without a complete policy: state and rules are written before programs attach,
//! a new rule generation is complete before one map write makes it live.

use std::collections::BTreeMap;

use agentwatch_common::{AGENT_FLAG_DENY_ALL, AgentCounters, AgentState, MAX_AGENTS, rule_scope};
use aya::{
    maps::{MapData, RingBuf},
    programs::links::FdLink,
};

use crate::{
    cgroup::Cgroup,
    egress::{self, CompiledRules},
    kernel::{Kernel, KernelError},
};

/// One guarded agent.
struct Guarded {
    id: u32,
    cgroup: Cgroup,
    cgroup_id: u64,
    state: AgentState,
    rules: CompiledRules,
    /// Dropping these detaches the programs.
    links: Vec<FdLink>,
}

/// What [`Agents::counters`] and friends report about one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: u32,
    pub cgroup_id: u64,
}

/// The set of guarded agents and the kernel object that guards them.
pub struct Agents {
    kernel: Kernel,
    by_name: BTreeMap<String, Guarded>,
}

impl Agents {
    /// Loads the kernel object; no agent is guarded yet.
    pub fn load() -> Result<Self, KernelError> {
        Ok(Self {
            kernel: Kernel::load()?,
            by_name: BTreeMap::new(),
        })
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The event ring buffer (one reader).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.kernel.take_events()
    }

    fn free_id(&self) -> Result<u32, KernelError> {
        // Id 0 counts calls that match no agent; agents use 1.. .
        (1..MAX_AGENTS)
            .find(|id| self.by_name.values().all(|g| g.id != *id))
            .ok_or(KernelError::NoAgentSlot(MAX_AGENTS - 1))
    }

    /// Starts guarding `cgroup` as agent `name` with `rules`, and returns its id. Rules and
    /// state are in the kernel before the programs attach: the first call is already judged.
    pub fn guard(
        &mut self,
        name: &str,
        cgroup: Cgroup,
        rules: CompiledRules,
    ) -> Result<u32, KernelError> {
        let id = self.free_id()?;
        let cgroup_id = cgroup.id()?;
        let state = AgentState {
            id,
            generation: 0,
            flags: 0,
            _pad: 0,
        };
        let scope = rule_scope(id, 0);
        self.kernel.egress.write(scope, &rules)?;
        self.write_state(cgroup_id, state)?;
        let links = match egress::attach(&mut self.kernel.ebpf, &cgroup) {
            Ok(links) => links,
            Err(e) => {
                self.undo_state(cgroup_id);
                let _ = self.kernel.egress.clear(scope, &rules);
                return Err(e);
            }
        };
        self.by_name.insert(
            name.to_owned(),
            Guarded {
                id,
                cgroup,
                cgroup_id,
                state,
                rules,
                links,
            },
        );
        Ok(id)
    }

    /// Replaces the rules of agent `name` atomically: the new rules go into the agent's other
    /// generation, one map write makes that generation live, then the old one is cleared. A
    /// destination allowed (or denied) by both policies is allowed (denied) at every instant.
    pub fn set_rules(&mut self, name: &str, rules: CompiledRules) -> Result<(), KernelError> {
        let g = self
            .by_name
            .get(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        let (id, cgroup_id, mut state) = (g.id, g.cgroup_id, g.state);
        let old_scope = rule_scope(id, state.generation);
        let new_gen = state.generation ^ 1;
        let new_scope = rule_scope(id, new_gen);
        if let Err(e) = self.kernel.egress.write(new_scope, &rules) {
            let _ = self.kernel.egress.clear(new_scope, &rules);
            return Err(e);
        }
        state.generation = new_gen;
        self.write_state(cgroup_id, state)?;
        let old_rules = {
            let g = self
                .by_name
                .get_mut(name)
                .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
            g.state = state;
            std::mem::replace(&mut g.rules, rules)
        };
        self.kernel.egress.clear(old_scope, &old_rules)
    }

    /// Denies all egress of agent `name` (`deny_all = true`) whatever its rules, or lifts that.
    pub fn set_deny_all(&mut self, name: &str, deny_all: bool) -> Result<(), KernelError> {
        let g = self
            .by_name
            .get(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        let mut state = g.state;
        if deny_all {
            state.flags |= AGENT_FLAG_DENY_ALL;
        } else {
            state.flags &= !AGENT_FLAG_DENY_ALL;
        }
        let cgroup_id = g.cgroup_id;
        self.write_state(cgroup_id, state)?;
        if let Some(g) = self.by_name.get_mut(name) {
            g.state = state;
        }
        Ok(())
    }

    /// Stops guarding agent `name`: detaches its programs, then removes its state and rules.
    /// Its processes keep running, unguarded. Returns its cgroup.
    pub fn unguard(&mut self, name: &str) -> Result<Cgroup, KernelError> {
        let g = self
            .by_name
            .remove(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        drop(g.links);
        self.undo_state(g.cgroup_id);
        self.kernel
            .egress
            .clear(rule_scope(g.id, g.state.generation), &g.rules)?;
        Ok(g.cgroup)
    }

    /// The id and cgroup id of agent `name`.
    pub fn info(&self, name: &str) -> Option<AgentInfo> {
        self.by_name.get(name).map(|g| AgentInfo {
            id: g.id,
            cgroup_id: g.cgroup_id,
        })
    }

    /// The cgroup of agent `name`.
    pub fn cgroup(&self, name: &str) -> Option<&Cgroup> {
        self.by_name.get(name).map(|g| &g.cgroup)
    }

    /// Names of the guarded agents, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Name of the agent with kernel id `id`.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        self.by_name
            .iter()
            .find(|(_, g)| g.id == id)
            .map(|(n, _)| n.as_str())
    }

    /// Counters of agent `name`, summed over CPUs.
    pub fn counters(&self, name: &str) -> Result<AgentCounters, KernelError> {
        let g = self
            .by_name
            .get(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        self.kernel.counters(g.id)
    }

    /// Kernel ids of the links of agent `name` (for diagnostics and leak checks).
    pub fn link_ids(&self, name: &str) -> Vec<u32> {
        self.by_name
            .get(name)
            .map(|g| {
                g.links
                    .iter()
                    .filter_map(|l| l.info().ok().map(|i| i.id()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn write_state(&mut self, cgroup_id: u64, state: AgentState) -> Result<(), KernelError> {
        self.kernel
            .agents
            .insert(cgroup_id, state, 0)
            .map_err(|source| KernelError::Map {
                name: "AGENTS",
                source,
            })
    }

    fn undo_state(&mut self, cgroup_id: u64) {
        if let Err(e) = self.kernel.agents.remove(&cgroup_id) {
            tracing::warn!(cgroup_id, "removing agent state: {e}");
        }
    }
}
