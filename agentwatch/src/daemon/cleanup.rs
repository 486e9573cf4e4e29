//! `agentwatch run --cleanup`: uninstall.

use anyhow::{Context as _, Result};

use super::refuse_if_running;
use crate::{
    cgroup::{self, Cgroup},
    config::Config,
    kernel::PinDir,
};

/// `agentwatch run --cleanup`: detach and unpin everything under pin_dir, remove the agent
/// cgroups agentwatch created (when empty) and the control socket. For uninstall.
pub fn cleanup(config: &Config) -> Result<String> {
    refuse_if_running(&config.daemon.control_socket)
        .context("stop the daemon before `--cleanup`")?;
    let pins = PinDir::new(&config.daemon.pin_dir);
    let links = pins.remove_all()?;
    let mount = cgroup::cgroup2_mount()?;
    let mut removed = 0;
    let mut kept = Vec::new();
    for a in config.agents.iter().filter(|a| !a.adopted) {
        let path = mount.join(&a.cgroup);
        let Ok(cg) = Cgroup::open(&path) else {
            continue;
        };
        if cg.populated().unwrap_or(true) {
            kept.push(path.display().to_string());
        } else if cg.remove().is_ok() {
            removed += 1;
        }
    }
    let parent = mount.join(&config.daemon.cgroup_parent);
    if let Ok(cg) = Cgroup::open(&parent)
        && !cg.populated().unwrap_or(true)
        && std::fs::read_dir(&parent)
            .is_ok_and(|d| !d.filter_map(Result::ok).any(|e| e.path().is_dir()))
    {
        let _ = cg.remove();
    }
    let _ = std::fs::remove_file(&config.daemon.control_socket);
    let mut summary = format!(
        "detached {links} link(s), removed the pins under {} and {removed} agent cgroup(s)",
        config.daemon.pin_dir.display()
    );
    if !kept.is_empty() {
        summary.push_str(&format!(
            "; kept cgroups that still hold processes: {}",
            kept.join(", ")
        ));
    }
    Ok(summary)
}
