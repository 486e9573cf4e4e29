//! `agentwatch launch`: run a command inside a guarded agent's cgroup.

use std::{
    ffi::OsString,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    cgroup::Cgroup,
    control::{self, Request},
    harden,
};

/// Asks the daemon at `socket` where agent `name` lives, moves this process there, hardens it
/// ([`crate::harden`]: own cgroup namespace, the agent's `user`, no dangerous capabilities,
/// no_new_privs) and execs `cmd`; returns only on failure. Refuses unless the cgroup has the
/// egress programs attached: an agent is never started unguarded, nor less hardened.
pub fn launch(socket: &Path, name: &str, cmd: &[OsString]) -> Result<std::convert::Infallible> {
    let (program, args) = cmd.split_first().context("no command given after `--`")?;
    let response = control::call(
        socket,
        &Request::Launch {
            agent: name.to_owned(),
        },
        Duration::from_secs(10),
    )?;
    let data = response.into_result().map_err(anyhow::Error::msg)?;
    let path = data["cgroup"]
        .as_str()
        .context("the daemon did not say where the agent lives")?;
    let run_as = run_as(name, &data)?;
    let cg = Cgroup::open(path)?;
    if attached_programs(&cg)? == 0 {
        bail!("agent `{name}` is not guarded: no egress program is attached to {path}");
    }
    cg.add_pid(0)
        .with_context(|| format!("joining agent `{name}`"))?;
    harden::harden(run_as.as_ref())
        .with_context(|| format!("hardening agent `{name}`; the command was not run"))?;
    if let Some(u) = &run_as {
        reachable(name, u, program)?;
    }
    let mut command = Command::new(program);
    command.args(args);
    // The agent's API scopes: the gateway's URL and a phantom token each, and the variables
    // its SDKs read (never a real key: the daemon keeps those).
    for pair in data["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (pair[0].as_str(), pair[1].as_str()) {
            command.env(k, v);
        }
    }
    if let Some(u) = &run_as {
        // What login and systemd's User= give a process, so the command finds its own home.
        command
            .env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    let err = command.exec();
    let who = run_as
        .as_ref()
        .map_or_else(|| "root".to_owned(), |u| format!("uid {}", u.uid));
    Err(err).with_context(|| format!("running {} as {who}", program.to_string_lossy()))
}

/// Whom the daemon says agent `name` runs as: None for root, else the user to become.
/// Resolved before anything changes, so an unknown user leaves no trace.
fn run_as(name: &str, data: &Value) -> Result<Option<harden::User>> {
    match data.get("user") {
        Some(Value::String(u)) if u == "root" => Ok(None),
        Some(Value::String(u)) => Ok(Some(
            harden::lookup_user(u)
                .with_context(|| format!("agent `{name}`"))?
                .with_context(|| {
                    format!(
                        "agent `{name}` runs as user `{u}`, but there is no user `{u}` on this host"
                    )
                })?,
        )),
        // No user: a uid of its own, which the daemon gives with the group and home.
        Some(Value::Null) => {
            let id = |key: &str| {
                data[key]
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .with_context(|| format!("the daemon did not say agent `{name}`'s {key}"))
            };
            let (uid, gid) = (id("uid")?, id("gid")?);
            if uid == 0 || gid == 0 {
                bail!("the daemon gave agent `{name}` uid {uid} / gid {gid}; refusing root");
            }
            let home = data["home"]
                .as_str()
                .with_context(|| format!("the daemon did not say agent `{name}`'s home"))?;
            Ok(Some(harden::User {
                name: format!("agentwatch-{name}"),
                uid,
                gid,
                groups: Vec::new(),
                home: home.into(),
            }))
        }
        // Absent: a daemon that does not say, so nothing is promised about the user either
        // way; refuse rather than guess.
        _ => bail!("the daemon did not say which user agent `{name}` runs as"),
    }
}

/// After the switch to the agent's user: can it use the working directory and run the
/// command? Said plainly now, instead of a bare "Permission denied" from exec or from the
/// first relative path the command opens.
fn reachable(name: &str, u: &harden::User, program: &std::ffi::OsStr) -> Result<()> {
    let can = |path: &Path, mode: libc::c_int| -> bool {
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: faccessat with a C string; AT_EACCESS judges with the effective ids, which
        // are the agent's now.
        unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) == 0 }
    };
    let cwd = std::env::current_dir();
    if !can(Path::new("."), libc::R_OK | libc::X_OK) {
        let shown = cwd.map_or_else(|_| "?".to_owned(), |p| p.display().to_string());
        bail!(
            "agent `{name}` runs as uid {}, which cannot read the working directory {shown}; \
             start it from a directory that uid can read (its home is {}), or give the agent a \
             `user` who can",
            u.uid,
            u.home.display()
        );
    }
    let path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') && !can(path, libc::X_OK) {
        bail!(
            "agent `{name}` runs as uid {}, which cannot execute {} (or search a folder on its \
             path); the command was not run",
            u.uid,
            path.display()
        );
    }
    Ok(())
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
