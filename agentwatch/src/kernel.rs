//! The embedded kernel object: loading it and owning its shared maps.
//!
//! One object holds every concern's programs; maps shared by all of them (agents, counters,
//! events) live here, each concern's own maps in its module (`egress`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use agentwatch_common::{
    AgentCounters, AgentLimits, AgentState, ExecKey, RuleKeyV4, RuleKeyV6, RuleValue, Settings,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues, RingBuf},
    programs::ProgramError,
};

use crate::egress::EgressMaps;

/// The kernel programs, built by build.rs from agentwatch-ebpf.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentwatch-ebpf"));

/// Errors of the kernel layer.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this binary was built without its eBPF programs (AYA_BUILD_SKIP was set); rebuild \
         after `cargo xtask setup`"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("attaching {name} to {cgroup}: {source}")]
    Attach {
        name: &'static str,
        cgroup: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this agentwatch needs {want:?}: it was \
         pinned by another version; `agentwatch run --cleanup` removes the old pins"
    )]
    IncompatiblePin {
        path: PathBuf,
        found: (u32, u32),
        want: (u32, u32),
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy: {0}")]
    Policy(String),
    #[error("agent `{0}` is already guarded")]
    AlreadyGuarded(String),
    #[error("unknown agent `{0}`")]
    UnknownAgent(String),
    #[error("all {0} agent slots are in use")]
    NoAgentSlot(u32),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// The loaded object and its shared maps.
pub struct Kernel {
    pub(crate) ebpf: Ebpf,
    pub(crate) agents: HashMap<MapData, u64, AgentState>,
    counters: PerCpuArray<MapData, AgentCounters>,
    lost: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    pub(crate) egress: EgressMaps,
    pub(crate) settings: Array<MapData, Settings>,
    pub(crate) limits: Array<MapData, AgentLimits>,
    pub(crate) exec_allow: HashMap<MapData, ExecKey, u8>,
    trips: Array<MapData, [u64; 4]>,
    pins: Option<PinDir>,
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// Every map of the object with the key and value sizes this build expects of it. A pinned map
/// of another layout (an older agentwatch) is refused rather than misread.
const MAPS: [(&str, u32, u32); 12] = [
    ("AGENTS", 8, size_of::<AgentState>() as u32),
    ("COUNTERS", 4, size_of::<AgentCounters>() as u32),
    ("EVENTS", 0, 0),
    ("EVENTS_LOST", 4, 8),
    ("SETTINGS", 4, size_of::<Settings>() as u32),
    ("BREAKER_TRIPS", 4, 32),
    ("LIMITS", 4, size_of::<AgentLimits>() as u32),
    ("EXEC_ALLOW", size_of::<ExecKey>() as u32, 1),
    ("PARENTS", 4, 4),
    ("SCRATCH", 4, size_of::<ExecKey>() as u32),
    (
        "RULES_V4",
        4 + size_of::<RuleKeyV4>() as u32,
        size_of::<RuleValue>() as u32,
    ),
    (
        "RULES_V6",
        4 + size_of::<RuleKeyV6>() as u32,
        size_of::<RuleValue>() as u32,
    ),
];

impl Kernel {
    /// Loads the embedded object with private maps (gone when this value is dropped), and
    /// verifies every program. Nothing is attached yet.
    pub fn load() -> Result<Self, KernelError> {
        Self::load_with(None)
    }

    /// Loads the embedded object with its maps pinned under `pins` (reusing maps pinned there
    /// by an earlier daemon: rules, agent state and counters carry over).
    pub fn load_pinned(pins: PinDir) -> Result<Self, KernelError> {
        Self::load_with(Some(pins))
    }

    fn load_with(pins: Option<PinDir>) -> Result<Self, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        raise_memlock();
        ensure_tracefs()?;
        let mut loader = EbpfLoader::new();
        if let Some(pins) = &pins {
            pins.create()?;
            for (name, key, value) in MAPS {
                let path = pins.map(name);
                if path.exists() {
                    let info = MapInfo::from_pin(&path)
                        .map_err(|source| KernelError::Map { name, source })?;
                    if (info.key_size(), info.value_size()) != (key, value) {
                        return Err(KernelError::IncompatiblePin {
                            path,
                            found: (info.key_size(), info.value_size()),
                            want: (key, value),
                        });
                    }
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let agents = take_map(&mut ebpf, "AGENTS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let lost = take_map(&mut ebpf, "EVENTS_LOST")?;
        let events = Some(take_map(&mut ebpf, "EVENTS")?);
        let egress = EgressMaps::load(&mut ebpf)?;
        let settings = take_map(&mut ebpf, "SETTINGS")?;
        let limits = take_map(&mut ebpf, "LIMITS")?;
        let exec_allow = take_map(&mut ebpf, "EXEC_ALLOW")?;
        let trips = take_map(&mut ebpf, "BREAKER_TRIPS")?;
        crate::exec::load(&mut ebpf)?;
        crate::syscalls::load(&mut ebpf)?;
        Ok(Self {
            ebpf,
            agents,
            counters,
            lost,
            events,
            egress,
            settings,
            limits,
            exec_allow,
            trips,
            pins,
        })
    }

    /// Where this object's maps and links are pinned, if they are.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// The event ring buffer; it has one reader, so it can be taken once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Counters of agent `id`, summed over CPUs.
    pub fn counters(&self, id: u32) -> Result<AgentCounters, KernelError> {
        let per_cpu = self
            .counters
            .get(&id, 0)
            .map_err(|source| KernelError::Map {
                name: "COUNTERS",
                source,
            })?;
        let mut sum = AgentCounters::default();
        for c in per_cpu.iter() {
            for (s, v) in sum.egress.iter_mut().zip(c.egress) {
                *s += v;
            }
            sum.connects += c.connects;
            sum.sends += c.sends;
            sum.syscalls += c.syscalls;
            sum.execs += c.execs;
            sum.execs_denied += c.execs_denied;
            sum.forks += c.forks;
        }
        Ok(sum)
    }

    /// Breaker trips of agent `id` by action (alert, deny, freeze, kill).
    pub fn trips(&self, id: u32) -> [u64; 4] {
        self.trips.get(&id, 0).unwrap_or_default()
    }

    /// Counts one trip of agent `id` with action index `action` (0..4).
    pub(crate) fn count_trip(&mut self, id: u32, action: usize) -> Result<(), KernelError> {
        let mut t = self.trips(id);
        if let Some(slot) = t.get_mut(action) {
            *slot += 1;
        }
        self.trips.set(id, t, 0).map_err(|source| KernelError::Map {
            name: "BREAKER_TRIPS",
            source,
        })
    }

    pub(crate) fn reset_trips(&mut self, id: u32) -> Result<(), KernelError> {
        self.trips
            .set(id, [0; 4], 0)
            .map_err(|source| KernelError::Map {
                name: "BREAKER_TRIPS",
                source,
            })
    }

    /// Zeroes the counters of slot `id`, so an agent that later gets the slot starts at 0.
    pub(crate) fn reset_counters(&mut self, id: u32) -> Result<(), KernelError> {
        let err = |source| KernelError::Map {
            name: "COUNTERS",
            source,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(MapError::IoError(e)))?;
        let zero = PerCpuValues::try_from(vec![AgentCounters::default(); cpus])
            .map_err(|e| err(MapError::IoError(e)))?;
        self.counters.set(id, zero, 0).map_err(err)
    }

    /// Events the kernel could not put in the ring buffer because it was full.
    pub fn events_lost(&self) -> Result<u64, KernelError> {
        let per_cpu = self.lost.get(&0, 0).map_err(|source| KernelError::Map {
            name: "EVENTS_LOST",
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Agent state entries in the kernel: (cgroup id, state).
    pub(crate) fn agent_states(&self) -> Vec<(u64, AgentState)> {
        self.agents.iter().filter_map(Result::ok).collect()
    }

    /// Kernel ids of the loaded programs (for diagnostics and leak checks).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok().map(|i| i.id()))
            .collect()
    }
}

/// Name of the host-wide links' folder under `links/`.
pub(crate) const HOST_LINKS: &str = "_host";

/// Tracepoints need tracefs; mount it where the kernel expects it when it is missing.
fn ensure_tracefs() -> Result<(), KernelError> {
    let events = Path::new("/sys/kernel/tracing/events");
    if events.exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .status();
    match status {
        Ok(s) if s.success() && events.exists() => Ok(()),
        _ => Err(KernelError::Pin {
            path: PathBuf::from("/sys/kernel/tracing"),
            source: std::io::Error::other(
                "tracefs is not mounted and mounting it failed (mount -t tracefs tracefs /sys/kernel/tracing)",
            ),
        }),
    }
}

/// The folder on bpffs where one daemon pins its maps (`maps/`) and links (`links/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Folder of one agent's links; the cgroup id is part of the name, so the pins of a cgroup
    /// that was removed and made again are not mistaken for the new one's.
    pub(crate) fn agent_links(&self, name: &str, cgroup_id: u64) -> PathBuf {
        self.root.join("links").join(format!("{name}@{cgroup_id}"))
    }

    pub(crate) fn links_root(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Folder of the host-wide links (exec/fork tracepoints, sys_enter). Agent names cannot
    /// start with `_`, so it never clashes with an agent's folder.
    pub(crate) fn host_links(&self) -> PathBuf {
        self.root.join("links").join(HOST_LINKS)
    }

    /// Creates the folders; bpffs must be mounted at or above the root.
    pub fn create(&self) -> Result<(), KernelError> {
        for dir in [self.root.join("maps"), self.root.join("links")] {
            fs::create_dir_all(&dir).map_err(|source| KernelError::Pin {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Is there anything pinned here?
    pub fn exists(&self) -> bool {
        self.root.join("maps").exists()
    }

    /// Detaches every pinned link and removes every pin and folder under the root. Returns the
    /// number of links detached. Processes of the agents keep running, unguarded.
    pub fn remove_all(&self) -> Result<usize, KernelError> {
        let mut links = 0;
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| KernelError::Pin { path, source }
        };
        if let Ok(agents) = fs::read_dir(self.links_root()) {
            for agent in agents.filter_map(Result::ok) {
                links += remove_link_dir(&agent.path())?;
            }
        }
        for sub in ["links", "maps"] {
            let dir = self.root.join(sub);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.filter_map(Result::ok) {
                    fs::remove_file(e.path()).map_err(pin_err(&e.path()))?;
                }
                fs::remove_dir(&dir).map_err(pin_err(&dir))?;
            }
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => Ok(links),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(links),
            Err(source) => Err(KernelError::Pin {
                path: self.root.clone(),
                source,
            }),
        }
    }
}

/// Removes the link pins in `dir` (removing a link's last reference detaches it), then `dir`.
/// Returns how many links were detached.
pub(crate) fn remove_link_dir(dir: &Path) -> Result<usize, KernelError> {
    let pin_err = |source| KernelError::Pin {
        path: dir.to_owned(),
        source,
    };
    let mut n = 0;
    for link in fs::read_dir(dir).map_err(pin_err)?.filter_map(Result::ok) {
        fs::remove_file(link.path()).map_err(pin_err)?;
        n += 1;
    }
    fs::remove_dir(dir).map_err(pin_err)?;
    Ok(n)
}

/// A map removal that found nothing to remove is not an error (clearing is idempotent).
pub(crate) fn ignore_missing(
    r: Result<(), MapError>,
    name: &'static str,
) -> Result<(), KernelError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(KernelError::Map { name, source }),
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it. Raising it
/// costs nothing and keeps older kernels from failing with a confusing EPERM.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised rlimit.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
