//! Exec and fork telemetry and the exec allow-list: the userspace half of
//! `agentwatch-ebpf/src/exec.rs`.

use std::path::Path;

use agentwatch_common::{EXEC_PATH_MAX, ExecKey};
use aya::{Ebpf, programs::TracePoint, programs::links::FdLink};

use crate::{kernel::KernelError, link::Link};

/// The tracepoint programs: (name in the object, category, tracepoint).
pub const PROGRAMS: [(&str, &str, &str); 2] = [
    ("exec_sched_process_exec", "sched", "sched_process_exec"),
    ("exec_sched_process_fork", "sched", "sched_process_fork"),
];

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut TracePoint, KernelError> {
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// Loads (verifies) the programs.
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    for (name, _, _) in PROGRAMS {
        program(ebpf, name)?
            .load()
            .map_err(|source| KernelError::Program { name, source })?;
    }
    Ok(())
}

/// Attaches the tracepoints host-wide (they act only on agents' tasks), pinned under
/// `pin_dir` when given; pins of an earlier daemon are adopted.
pub(crate) fn attach(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Vec<Link>, KernelError> {
    let mut links = Vec::new();
    for (name, category, tracepoint) in PROGRAMS {
        links.push(Link::pinned_or_attach(pin_dir, name, || {
            let prog = program(ebpf, name)?;
            let id = prog
                .attach(category, tracepoint)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            FdLink::try_from(link).map_err(|source| KernelError::Link { name, source })
        })?);
    }
    Ok(links)
}

/// Why a path cannot be on an exec allow-list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecPathError {
    #[error("`{0}` is longer than {EXEC_PATH_MAX} bytes")]
    TooLong(String),
    #[error("`{0}` contains a NUL byte")]
    Nul(String),
}

/// The allow-list key of `path` for agent `agent` (NUL-padded, as the kernel builds it).
pub fn exec_key(agent: u32, path: &Path) -> Result<ExecKey, ExecPathError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    let shown = || path.display().to_string();
    if bytes.len() > EXEC_PATH_MAX {
        return Err(ExecPathError::TooLong(shown()));
    }
    if bytes.contains(&0) {
        return Err(ExecPathError::Nul(shown()));
    }
    let mut key = ExecKey {
        agent,
        ..ExecKey::default()
    };
    key.path[..bytes.len()].copy_from_slice(bytes);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_nul_padded_and_bounded() {
        let k = exec_key(3, Path::new("/usr/bin/curl")).unwrap();
        assert_eq!(k.agent, 3);
        assert_eq!(&k.path[..13], b"/usr/bin/curl");
        assert!(k.path[13..].iter().all(|&b| b == 0));
        let long = format!("/{}", "x".repeat(EXEC_PATH_MAX));
        assert!(matches!(
            exec_key(1, Path::new(&long)),
            Err(ExecPathError::TooLong(_))
        ));
        let max = format!("/{}", "x".repeat(EXEC_PATH_MAX - 1));
        assert!(exec_key(1, Path::new(&max)).is_ok());
    }
}
