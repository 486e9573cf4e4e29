//! Which of the capabilities that could switch agentwatch off or walk around it a process
//! still holds.
//!
//! `agentwatch launch` takes these away ([`crate::harden`]); an adopted agent (a systemd unit's
//! or a pod's cgroup) runs with whatever its unit gave it, so the daemon can only report them.
//! This module reads `CapEff`, `CapPrm`, `CapBnd` and `CapInh` from `/proc/PID/status`: a
//! capability in the effective or permitted set can be used now, one in the bounding set can be
//! gained again by executing a file that carries it (unless no_new_privs is set), and so can
//! one in the inheritable set (by executing a file whose inheritable set names it). No exec
//! or change of user id gains one outside these four, and none of them can grow beyond what
//! the four held, so what a process could ever hold is known at its first read (a new user
//! namespace's full sets count only inside that namespace).

use std::{fs, io};

use caps::Capability;

/// The capabilities `launch` drops and this module reports, and why each matters here:
/// CAP_SYS_ADMIN (detach programs, unmount bpffs, leave the cgroup namespace), CAP_NET_ADMIN
/// (routes, firewall, new interfaces), CAP_NET_RAW (raw and packet sockets that bypass the
/// connect hooks), CAP_BPF (load, detach or rewrite agentwatch's programs and maps),
/// CAP_PERFMON (tracing programs, reading kernel memory), CAP_SYS_PTRACE (take over or read
/// other processes, the daemon included), CAP_SYS_MODULE (load kernel code),
/// CAP_SYS_RAWIO (raw memory and device access).
pub const DANGEROUS: [Capability; 8] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_SYS_MODULE,
    Capability::CAP_SYS_RAWIO,
];

/// Reading or understanding a process's capability masks failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("reading /proc/{pid}/status: {source}")]
    Read { pid: u32, source: io::Error },
    #[error("/proc/PID/status has no `{0}:` line")]
    Missing(&'static str),
    #[error("/proc/PID/status: `{key}:` is not a hex mask: `{value}`")]
    BadMask { key: &'static str, value: String },
}

/// The [`DANGEROUS`] capabilities present in the effective, permitted, bounding or inheritable
/// mask of a `/proc/PID/status` text, in the order of [`DANGEROUS`]. Pure: no system access.
pub fn dangerous_in_status(status: &str) -> Result<Vec<Capability>, PrivilegeError> {
    let mut any = 0u64;
    for key in ["CapEff", "CapPrm", "CapBnd", "CapInh"] {
        any |= mask(status, key)?;
    }
    Ok(DANGEROUS
        .iter()
        .copied()
        .filter(|c| any & c.bitmask() != 0)
        .collect())
}

/// The [`DANGEROUS`] capabilities process `pid` holds (effective, permitted, bounding or
/// inheritable set).
pub fn dangerous_held(pid: u32) -> Result<Vec<Capability>, PrivilegeError> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| PrivilegeError::Read { pid, source })?;
    dangerous_in_status(&status)
}

/// [`dangerous_held`] for each of `pids` (e.g. an agent's cgroup.procs): the pids that hold at
/// least one, with what they hold, in the order given. A process that exited meanwhile is
/// skipped (that is normal for a list read a moment earlier); any other failure is an error.
pub fn dangerous_held_by(pids: &[u32]) -> Result<Vec<(u32, Vec<Capability>)>, PrivilegeError> {
    let mut out = Vec::new();
    for &pid in pids {
        match dangerous_held(pid) {
            Ok(held) if held.is_empty() => {}
            Ok(held) => out.push((pid, held)),
            Err(PrivilegeError::Read { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The hex mask on the `KEY:` line.
fn mask(status: &str, key: &'static str) -> Result<u64, PrivilegeError> {
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix(':')))
        .ok_or(PrivilegeError::Missing(key))?
        .trim();
    u64::from_str_radix(value, 16).map_err(|_| PrivilegeError::BadMask {
        key,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caps::CapSet;

    fn status(eff: &str, prm: &str, bnd: &str) -> String {
        status_inh(eff, prm, bnd, "0000000000000000")
    }

    fn status_inh(eff: &str, prm: &str, bnd: &str, inh: &str) -> String {
        format!(
            "Name:\tx\nCapInh:\t{inh}\nCapPrm:\t{prm}\nCapEff:\t{eff}\n\
             CapBnd:\t{bnd}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\n"
        )
    }

    /// One left only in the inheritable set (the bounding and permitted sets dropped it) comes
    /// back at the exec of a file whose inheritable set names it: it counts.
    #[test]
    fn the_inheritable_set_counts_too() {
        let s = status_inh(
            "0000000000000000",
            "0000000000000000",
            "0000000000000000",
            "0000000000200000",
        );
        assert_eq!(
            dangerous_in_status(&s).unwrap(),
            vec![Capability::CAP_SYS_ADMIN]
        );
    }

    #[test]
    fn full_root_holds_all_eight_in_order() {
        let s = status("000001ffffffffff", "000001ffffffffff", "000001ffffffffff");
        assert_eq!(dangerous_in_status(&s).unwrap(), DANGEROUS.to_vec());
    }

    #[test]
    fn nothing_held_is_empty() {
        // A non-root process with a bounding set that lacks all eight (what launch leaves).
        let bnd = !DANGEROUS.iter().fold(0u64, |m, c| m | c.bitmask()) & 0x1ff_ffff_ffff;
        let s = status(
            "0000000000000000",
            "0000000000000000",
            &format!("{bnd:016x}"),
        );
        assert_eq!(dangerous_in_status(&s).unwrap(), Vec::new());
    }

    #[test]
    fn each_set_counts_on_its_own() {
        // CAP_NET_RAW = 13 only effective+permitted, CAP_BPF = 39 only in the bounding set,
        // CAP_SYS_ADMIN = 21 only permitted; CAP_KILL (5) is not one of the eight.
        let s = status("0000000000002020", "0000000000202000", "0000008000000000");
        assert_eq!(
            dangerous_in_status(&s).unwrap(),
            vec![
                Capability::CAP_SYS_ADMIN,
                Capability::CAP_NET_RAW,
                Capability::CAP_BPF
            ]
        );
    }

    #[test]
    fn malformed_status_is_an_error() {
        assert!(matches!(
            dangerous_in_status("CapEff:\t0\nCapPrm:\t0\n"),
            Err(PrivilegeError::Missing("CapBnd"))
        ));
        let e = dangerous_in_status(&status("zz", "0", "0")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/proc/PID/status: `CapEff:` is not a hex mask: `zz`"
        );
    }

    #[test]
    fn own_process_matches_the_kernel_view() {
        // What capget/PR_CAPBSET_READ say about this (single-purpose) test thread, however the
        // test is run (root or not).
        let eff = caps::read(None, CapSet::Effective).unwrap();
        let prm = caps::read(None, CapSet::Permitted).unwrap();
        let inh = caps::read(None, CapSet::Inheritable).unwrap();
        let expected: Vec<Capability> = DANGEROUS
            .iter()
            .copied()
            .filter(|c| {
                eff.contains(c)
                    || prm.contains(c)
                    || inh.contains(c)
                    || caps::has_cap(None, CapSet::Bounding, *c).unwrap()
            })
            .collect();
        assert_eq!(dangerous_held(std::process::id()).unwrap(), expected);
        let me = std::process::id();
        let by = dangerous_held_by(&[me]).unwrap();
        if expected.is_empty() {
            assert!(by.is_empty());
        } else {
            assert_eq!(by, vec![(me, expected)]);
        }
    }

    #[test]
    fn exited_processes_are_skipped() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        assert_eq!(dangerous_held_by(&[gone]).unwrap(), Vec::new());
        assert!(matches!(
            dangerous_held(gone),
            Err(PrivilegeError::Read { pid, .. }) if pid == gone
        ));
    }
}
