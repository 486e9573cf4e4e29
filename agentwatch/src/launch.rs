//! `agentwatch launch`: run a command inside a guarded agent's cgroup.

use std::{
    ffi::OsString,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cgroup::{self, Cgroup},
    config::Config,
};

/// Moves this process into agent `name`'s cgroup and execs `cmd`; returns only on failure.
/// Refuses unless the cgroup exists *and* has the egress programs attached: an agent is never
/// started unguarded.
pub fn launch(config: &Config, name: &str, cmd: &[OsString]) -> Result<std::convert::Infallible> {
    let agent = config.agent(name).with_context(|| {
        let known: Vec<&str> = config.agents.iter().map(|a| a.name.as_str()).collect();
        format!(
            "unknown agent `{name}` (configured: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )
    })?;
    let (program, args) = cmd.split_first().context("no command given after `--`")?;
    let path = cgroup::cgroup2_mount()?.join(&agent.cgroup);
    let cg = Cgroup::open(&path).with_context(|| {
        format!("agent `{name}` is not guarded: its cgroup {} does not exist (is `agentwatch run` running?)", path.display())
    })?;
    let guarded = attached_programs(&cg)?;
    if guarded == 0 {
        bail!(
            "agent `{name}` is not guarded: no egress program is attached to {} (is `agentwatch run` running?)",
            path.display()
        );
    }
    cg.add_pid(0)
        .with_context(|| format!("joining agent `{name}`"))?;
    let err = Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("running {}", program.to_string_lossy()))
}

/// Number of programs attached to `cg` on the cgroup/connect4 hook (BPF_PROG_QUERY).
pub fn attached_programs(cg: &Cgroup) -> Result<u32> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: [u32; 9],
    }
    let dir = cg.dir()?;
    let mut attr = QueryAttr {
        target_fd: u32::try_from(dir.as_raw_fd()).context("bad fd")?,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a zero-filled attr of the size we pass; prog_ids is null, so the
    // kernel only writes prog_cnt and attach_flags into attr.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("querying the programs attached to {}", cg.path().display()));
    }
    Ok(attr.prog_cnt)
}
