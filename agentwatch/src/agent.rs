//! Guarded agents: the userspace half of `agentwatch-ebpf/src/agent.rs`.
//!
//! [`Agents`] owns the loaded kernel object and, per agent, its id, cgroup, live rule
//! generation and links. The order of every operation is chosen so that no call of an agent is
//! ever judged without a complete policy: state and rules are written before programs attach,
//! a new rule generation is complete before one map write makes it live, and a daemon that
//! re-adopts pinned agents never detaches anything.

use std::collections::{BTreeMap, HashSet};

use agentwatch_common::{AgentCounters, AgentState, MAX_AGENTS, rule_scope};
use aya::maps::{MapData, RingBuf};

use crate::{
    cgroup::Cgroup,
    egress::{self, AgentLink, CompiledRules},
    kernel::{Kernel, KernelError, PinDir},
};

/// One guarded agent.
struct Guarded {
    id: u32,
    cgroup: Cgroup,
    cgroup_id: u64,
    state: AgentState,
    rules: CompiledRules,
    links: Vec<AgentLink>,
}

/// What [`Agents::info`] reports about one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: u32,
    pub cgroup_id: u64,
    pub state: AgentState,
}

/// How [`Agents::guard`] found the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarding {
    /// New to the kernel: fresh id, counters from 0.
    New,
    /// Already in the kernel's pinned state (an earlier daemon): same id, counters and flags;
    /// its links were kept attached throughout.
    Adopted,
}

/// What [`Agents::forget_stale`] removed: agents a previous daemon guarded that are no longer
/// configured.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stale {
    pub states: usize,
    pub link_dirs: Vec<String>,
}

/// The set of guarded agents and the kernel object that guards them.
pub struct Agents {
    kernel: Kernel,
    by_name: BTreeMap<String, Guarded>,
}

impl Agents {
    /// Loads the kernel object with private maps; links are owned and detach on drop.
    pub fn load() -> Result<Self, KernelError> {
        Ok(Self {
            kernel: Kernel::load()?,
            by_name: BTreeMap::new(),
        })
    }

    /// Loads the kernel object with maps and links pinned under `pins`, so enforcement outlives
    /// this process; what an earlier daemon pinned there is reused.
    pub fn load_pinned(pins: PinDir) -> Result<Self, KernelError> {
        Ok(Self {
            kernel: Kernel::load_pinned(pins)?,
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
        let used: HashSet<u32> = self
            .kernel
            .agent_states()
            .into_iter()
            .map(|(_, s)| s.id)
            .chain(self.by_name.values().map(|g| g.id))
            .collect();
        // Id 0 counts calls that match no agent; agents use 1.. .
        (1..MAX_AGENTS)
            .find(|id| !used.contains(id))
            .ok_or(KernelError::NoAgentSlot(MAX_AGENTS - 1))
    }

    /// Starts guarding `cgroup` as agent `name` with `rules`. An agent the kernel already knows
    /// (pinned state of an earlier daemon) is adopted: same id, counters and flags, its pinned
    /// links kept attached, its rules replaced atomically.
    pub fn guard(
        &mut self,
        name: &str,
        cgroup: Cgroup,
        rules: CompiledRules,
    ) -> Result<Guarding, KernelError> {
        if self.by_name.contains_key(name) {
            return Err(KernelError::AlreadyGuarded(name.to_owned()));
        }
        let cgroup_id = cgroup.id()?;
        let existing = self.kernel.agents.get(&cgroup_id, 0).ok();
        let (state, how) = match existing {
            Some(mut state) => {
                let old = rule_scope(state.id, state.generation);
                let next = rule_scope(state.id, state.generation ^ 1);
                // The other generation may hold a half-written policy of a crashed daemon.
                self.kernel.egress.clear_scope(next)?;
                self.kernel.egress.write(next, &rules)?;
                state.generation ^= 1;
                self.write_state(cgroup_id, state)?;
                self.kernel.egress.clear_scope(old)?;
                (state, Guarding::Adopted)
            }
            None => {
                let id = self.free_id()?;
                let state = AgentState {
                    id,
                    generation: 0,
                    flags: 0,
                    _pad: 0,
                };
                // Leftovers of an agent that had this slot when a daemon crashed.
                self.kernel.egress.clear_scope(rule_scope(id, 0))?;
                self.kernel.egress.clear_scope(rule_scope(id, 1))?;
                self.kernel.reset_counters(id)?;
                self.kernel.egress.write(rule_scope(id, 0), &rules)?;
                self.write_state(cgroup_id, state)?;
                (state, Guarding::New)
            }
        };
        let pin_dir = self.kernel.pins().map(|p| p.agent_links(name, cgroup_id));
        let links = match egress::attach(&mut self.kernel.ebpf, &cgroup, pin_dir.as_deref()) {
            Ok(links) => links,
            Err(e) => {
                if how == Guarding::New {
                    self.undo_state(cgroup_id);
                    let _ = self.kernel.egress.clear(rule_scope(state.id, 0), &rules);
                }
                return Err(e);
            }
        };
        self.by_name.insert(
            name.to_owned(),
            Guarded {
                id: state.id,
                cgroup,
                cgroup_id,
                state,
                rules,
                links,
            },
        );
        Ok(how)
    }

    /// Replaces the rules of agent `name` atomically: the new rules go into the agent's other
    /// generation, one map write makes that generation live, then the old one is cleared. A
    /// destination allowed (or denied) by both policies is allowed (denied) at every instant.
    pub fn set_rules(&mut self, name: &str, rules: CompiledRules) -> Result<(), KernelError> {
        let g = self.get(name)?;
        let (id, cgroup_id, mut state) = (g.id, g.cgroup_id, g.state);
        let old_scope = rule_scope(id, state.generation);
        let new_scope = rule_scope(id, state.generation ^ 1);
        if let Err(e) = self.kernel.egress.write(new_scope, &rules) {
            let _ = self.kernel.egress.clear(new_scope, &rules);
            return Err(e);
        }
        state.generation ^= 1;
        self.write_state(cgroup_id, state)?;
        let g = self.get_mut(name)?;
        g.state = state;
        let old_rules = std::mem::replace(&mut g.rules, rules);
        self.kernel.egress.clear(old_scope, &old_rules)
    }

    /// Sets and clears `AGENT_FLAG_*` bits of agent `name` in one map write.
    pub fn update_flags(
        &mut self,
        name: &str,
        set: u32,
        clear: u32,
    ) -> Result<AgentState, KernelError> {
        let g = self.get(name)?;
        let mut state = g.state;
        state.flags = (state.flags | set) & !clear;
        let cgroup_id = g.cgroup_id;
        self.write_state(cgroup_id, state)?;
        self.get_mut(name)?.state = state;
        Ok(state)
    }

    /// Stops guarding agent `name`: detaches its programs (removing their pins), then removes
    /// its state, rules and counters. Its processes keep running, unguarded. Returns its cgroup.
    pub fn unguard(&mut self, name: &str) -> Result<Cgroup, KernelError> {
        let g = self
            .by_name
            .remove(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        for link in g.links {
            link.detach().map_err(|source| KernelError::Pin {
                path: g.cgroup.path().to_owned(),
                source,
            })?;
        }
        if let Some(pins) = self.kernel.pins() {
            let _ = std::fs::remove_dir(pins.agent_links(name, g.cgroup_id));
        }
        self.undo_state(g.cgroup_id);
        self.kernel
            .egress
            .clear(rule_scope(g.id, g.state.generation), &g.rules)?;
        self.kernel.reset_counters(g.id)?;
        Ok(g.cgroup)
    }

    /// Removes what an earlier daemon left for agents that are not guarded now: kernel state
    /// (and rules, counters) of other cgroups, and pinned links of other agents. Call it after
    /// guarding every configured agent.
    pub fn forget_stale(&mut self) -> Result<Stale, KernelError> {
        let mut stale = Stale::default();
        if let Some(pins) = self.kernel.pins().cloned() {
            let keep: HashSet<std::path::PathBuf> = self
                .by_name
                .iter()
                .map(|(n, g)| pins.agent_links(n, g.cgroup_id))
                .collect();
            if let Ok(dirs) = std::fs::read_dir(pins.links_root()) {
                for dir in dirs.filter_map(Result::ok).map(|d| d.path()) {
                    if keep.contains(&dir) {
                        continue;
                    }
                    let pin_err = |source| KernelError::Pin {
                        path: dir.clone(),
                        source,
                    };
                    for link in std::fs::read_dir(&dir)
                        .map_err(pin_err)?
                        .filter_map(Result::ok)
                    {
                        std::fs::remove_file(link.path()).map_err(pin_err)?;
                    }
                    std::fs::remove_dir(&dir).map_err(pin_err)?;
                    stale.link_dirs.push(
                        dir.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    );
                }
            }
        }
        let live: HashSet<u64> = self.by_name.values().map(|g| g.cgroup_id).collect();
        for (cgroup_id, state) in self.kernel.agent_states() {
            if live.contains(&cgroup_id) {
                continue;
            }
            self.undo_state(cgroup_id);
            self.kernel.egress.clear_scope(rule_scope(state.id, 0))?;
            self.kernel.egress.clear_scope(rule_scope(state.id, 1))?;
            self.kernel.reset_counters(state.id)?;
            stale.states += 1;
        }
        Ok(stale)
    }

    /// The id, cgroup id and kernel state of agent `name`.
    pub fn info(&self, name: &str) -> Option<AgentInfo> {
        self.by_name.get(name).map(|g| AgentInfo {
            id: g.id,
            cgroup_id: g.cgroup_id,
            state: g.state,
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
        self.kernel.counters(self.get(name)?.id)
    }

    /// Kernel ids of the links of agent `name` (for diagnostics and leak checks).
    pub fn link_ids(&self, name: &str) -> Vec<u32> {
        self.by_name
            .get(name)
            .map(|g| g.links.iter().filter_map(AgentLink::id).collect())
            .unwrap_or_default()
    }

    fn get(&self, name: &str) -> Result<&Guarded, KernelError> {
        self.by_name
            .get(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Guarded, KernelError> {
        self.by_name
            .get_mut(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))
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
