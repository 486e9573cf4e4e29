//! The embedded kernel object: loading it and owning its shared maps.
//!
//! One object holds every concern's programs; maps shared by all of them (agents, counters,
//! events) live here, each concern's own maps in its module (`egress`).

use agentwatch_common::{AgentCounters, AgentState};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
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
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

impl Kernel {
    /// Loads the embedded object and verifies every program (nothing is attached yet).
    pub fn load() -> Result<Self, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        raise_memlock();
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        let agents = take_map(&mut ebpf, "AGENTS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let lost = take_map(&mut ebpf, "EVENTS_LOST")?;
        let events = Some(take_map(&mut ebpf, "EVENTS")?);
        let egress = EgressMaps::load(&mut ebpf)?;
        Ok(Self {
            ebpf,
            agents,
            counters,
            lost,
            events,
            egress,
        })
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
        }
        Ok(sum)
    }

    /// Events the kernel could not put in the ring buffer because it was full.
    pub fn events_lost(&self) -> Result<u64, KernelError> {
        let per_cpu = self.lost.get(&0, 0).map_err(|source| KernelError::Map {
            name: "EVENTS_LOST",
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Kernel ids of the loaded programs (for diagnostics and leak checks).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok().map(|i| i.id()))
            .collect()
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
