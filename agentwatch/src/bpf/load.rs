//! What loading the object needs from the running kernel: tracefs mounted, RLIMIT_MEMLOCK
//! raised, and the offsets the programs read kernel structures and tracepoint records at (from
//! the kernel's BTF and tracefs formats), set as the object's read-only globals.

use std::path::{Path, PathBuf};

use aya::EbpfLoader;

use super::KernelError;

/// What the loader learned of the running kernel, read once before the object is loaded.
pub struct LoadEnv {
    /// `child_pid`'s offset in this kernel's `sched_process_fork` record.
    pub fork_child_pid: u32,
    /// The LSM programs' offsets; None when BPF LSM is not active or its fields are unknown
    /// (the tracepoints stand in).
    lsm: Option<LsmOffsets>,
    clone: [u32; 5],
    files: [u32; 10],
    walk: [u32; 10],
}

impl LoadEnv {
    /// Prepares the host (tracefs, memlock) and reads the kernel's layouts: the kernel's BTF is
    /// parsed once (megabytes from sysfs) for every set of offsets.
    pub fn probe() -> Result<Self, KernelError> {
        raise_memlock();
        ensure_tracefs()?;
        let fork_child_pid = tracepoint_field_offset("sched", "sched_process_fork", "child_pid")?;
        let btf = super::btf::Btf::vmlinux()
            .inspect_err(|e| tracing::warn!("reading the kernel's BTF: {e}"))
            .ok();
        Ok(Self {
            fork_child_pid,
            lsm: lsm_offsets(btf.as_ref()),
            clone: clone_offsets(btf.as_ref()),
            files: file_offsets(btf.as_ref()),
            walk: walk_offsets(btf.as_ref()),
        })
    }

    /// Will the LSM programs be tried (BPF LSM active, its fields found)?
    pub fn lsm(&self) -> bool {
        self.lsm.is_some()
    }

    /// Sets the object's globals from what was read.
    pub fn set_globals<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        let (files, walk, clone) = (&self.files, &self.walk, &self.clone);
        loader
            .override_global("FILE_F_INODE", &files[0], true)
            .override_global("INODE_I_INO", &files[1], true)
            .override_global("INODE_I_SB", &files[2], true)
            .override_global("SB_S_DEV", &files[3], true)
            .override_global("EXEC_BPRM_FILE", &files[4], true)
            .override_global("EXEC_TASK_MM", &files[5], true)
            .override_global("EXEC_MM_EXE_FILE", &files[6], true)
            .override_global("FILES_TASK_FILES", &files[7], true)
            .override_global("FILES_FILES_FDT", &files[8], true)
            .override_global("FILES_FDT_FD", &files[9], true)
            .override_global("FILES_F_MODE", &walk[8], true)
            .override_global("FILES_F_PATH_MNT", &walk[0], true)
            .override_global("FILES_F_PATH_DENTRY", &walk[1], true)
            .override_global("FILES_DENTRY_PARENT", &walk[2], true)
            .override_global("FILES_DENTRY_INODE", &walk[3], true)
            .override_global("FILES_MOUNT_MNT", &walk[4], true)
            .override_global("FILES_MOUNT_MNT_ROOT", &walk[5], true)
            .override_global("FILES_MOUNT_PARENT", &walk[6], true)
            .override_global("FILES_MOUNT_MOUNTPOINT", &walk[7], true)
            .override_global("FILES_MOUNT_NS", &walk[9], true)
            .override_global("NEW_TASK_CGROUPS", &clone[0], true)
            .override_global("NEW_CSS_SET_DFL_CGRP", &clone[1], true)
            .override_global("NEW_CGROUP_KN", &clone[2], true)
            .override_global("NEW_KERNFS_NODE_ID", &clone[3], true)
            .override_global("NEW_TASK_TGID", &clone[4], true);
        if let Some(o) = &self.lsm {
            loader
                .override_global("FILE_F_PATH", &o.file_f_path, true)
                .override_global("FILE_F_MODE", &o.file_f_mode, true)
                .override_global("BPRM_FILENAME", &o.bprm_filename, true)
                .override_global("TASK_TGID", &o.task_tgid, true)
                .override_global("TAMPER_F_MODE", &o.file_f_mode, true)
                .override_global("DENTRY_D_INODE", &o.dentry_d_inode, true);
        }
    }
}

/// Is BPF LSM active on this kernel (`bpf` among /sys/kernel/security/lsm)?
pub fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .is_ok_and(|l| l.trim().split(',').any(|m| m == "bpf"))
}

/// Offsets the LSM programs read, from the running kernel's BTF.
struct LsmOffsets {
    file_f_path: u32,
    file_f_mode: u32,
    bprm_filename: u32,
    task_tgid: u32,
    dentry_d_inode: u32,
}

/// The LSM programs' offsets when this kernel runs BPF LSM, else None (the tracepoints stand
/// in: files detected, execs and packet sockets killed). Said in the log either way, and by
/// `status` and `check`.
fn lsm_offsets(btf: Option<&super::btf::Btf>) -> Option<LsmOffsets> {
    if !bpf_lsm_active() {
        tracing::info!(
            "BPF LSM is not active (no `bpf` in /sys/kernel/security/lsm): file opens are \
             detected, execs and packet sockets killed, rather than refused"
        );
        return None;
    }
    let btf = btf?;
    let offsets = (|| {
        Ok::<_, super::btf::BtfError>(LsmOffsets {
            file_f_path: btf.member_offset("file", "f_path")?,
            file_f_mode: btf.member_offset("file", "f_mode")?,
            bprm_filename: btf.member_offset("linux_binprm", "filename")?,
            task_tgid: btf.member_offset("task_struct", "tgid")?,
            dentry_d_inode: btf.member_offset("dentry", "d_inode")?,
        })
    })();
    match offsets {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(
                "BPF LSM is active but the kernel's BTF does not say where the LSM programs' \
                 fields are ({e}): falling back to detection"
            );
            None
        }
    }
}

/// Offsets the clone-into-cgroup check reads a new task's cgroup id and tgid with
/// (`task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`,
/// `task_struct.tgid`), from the running kernel's BTF. All zero when the BTF does not say:
/// the check then takes every clone into a cgroup by an agent task for an escape.
fn clone_offsets(btf: Option<&super::btf::Btf>) -> [u32; 5] {
    let Some(btf) = btf else {
        return [0; 5];
    };
    let offsets = (|| {
        Ok::<_, super::btf::BtfError>([
            btf.member_offset("task_struct", "cgroups")?,
            btf.member_offset("css_set", "dfl_cgrp")?,
            btf.member_offset("cgroup", "kn")?,
            btf.member_offset("kernfs_node", "id")?,
            btf.member_offset("task_struct", "tgid")?,
        ])
    })();
    offsets.unwrap_or_else(|e| {
        tracing::warn!(
            "the kernel's BTF does not say where a task's cgroup is ({e}): every \
             clone3(CLONE_INTO_CGROUP) of an agent task is taken for an escape"
        );
        [0; 5]
    })
}

/// Offsets that reach a file's identity (`file.f_inode`, `inode.i_ino`, `inode.i_sb`,
/// `super_block.s_dev`) and the file an exec opened (`linux_binprm.file`, `task_struct.mm`,
/// `mm_struct.exe_file`) and the file behind an fd (`task_struct.files`, `files_struct.fdt`,
/// `fdtable.fd`), from the running kernel's BTF, with or without BPF LSM: the exec allow-list
/// judges the file itself with them, and the file guard's tracepoints identify the file an
/// open got. All zero when the BTF does not say: execs are then judged on the path given to
/// execve (said in the log), and the daemon judges each open on the path string alone.
fn file_offsets(btf: Option<&super::btf::Btf>) -> [u32; 10] {
    let offsets = btf.ok_or_else(|| "no BTF".to_owned()).and_then(|btf| {
        (|| {
            Ok::<_, super::btf::BtfError>([
                btf.member_offset("file", "f_inode")?,
                btf.member_offset("inode", "i_ino")?,
                btf.member_offset("inode", "i_sb")?,
                btf.member_offset("super_block", "s_dev")?,
                btf.member_offset("linux_binprm", "file")?,
                btf.member_offset("task_struct", "mm")?,
                btf.member_offset("mm_struct", "exe_file")?,
                btf.member_offset("task_struct", "files")?,
                btf.member_offset("files_struct", "fdt")?,
                btf.member_offset("fdtable", "fd")?,
            ])
        })()
        .map_err(|e| e.to_string())
    });
    offsets.unwrap_or_else(|e| {
        tracing::warn!(
            "the kernel's BTF does not say how to reach an exec'd file ({e}): exec allow-lists \
             are judged on the path given to execve, which another mount namespace or a \
             chroot can put another program behind"
        );
        [0; 10]
    })
}

/// Offsets that lead from an opened file up through its directories and mounts (see
/// agentwatch-ebpf's `files::allowed_dir`): `file.f_path` plus `path.mnt` and plus
/// `path.dentry`, `dentry.d_parent`, `dentry.d_inode`, `mount.mnt`, `mount.mnt` plus
/// `vfsmount.mnt_root`, `mount.mnt_parent`, `mount.mnt_mountpoint`, `file.f_mode` (how the
/// file was opened) and `mount.mnt_ns` (which tells the kernel's internal mounts: pipes,
/// sockets). All zero when the BTF
/// does not say (then, without BPF LSM, every open of an agent with a file list goes to the
/// daemon, said in the log).
fn walk_offsets(btf: Option<&super::btf::Btf>) -> [u32; 10] {
    let offsets = btf.ok_or_else(|| "no BTF".to_owned()).and_then(|btf| {
        (|| {
            let f_path = btf.member_offset("file", "f_path")?;
            let mnt = btf.member_offset("mount", "mnt")?;
            Ok::<_, super::btf::BtfError>([
                f_path + btf.member_offset("path", "mnt")?,
                f_path + btf.member_offset("path", "dentry")?,
                btf.member_offset("dentry", "d_parent")?,
                btf.member_offset("dentry", "d_inode")?,
                mnt,
                mnt + btf.member_offset("vfsmount", "mnt_root")?,
                btf.member_offset("mount", "mnt_parent")?,
                btf.member_offset("mount", "mnt_mountpoint")?,
                btf.member_offset("file", "f_mode")?,
                btf.member_offset("mount", "mnt_ns")?,
            ])
        })()
        .map_err(|e| e.to_string())
    });
    match offsets {
        // Zero is the "unknown" mark on the kernel side: every one of these is past a first
        // member on every kernel, so a zero here means a layout this code does not know.
        Ok(o) if o.iter().all(|&v| v != 0) => o,
        Ok(o) => {
            tracing::warn!(
                "unexpected file and mount layout in the kernel's BTF ({o:?}): without BPF LSM, \
                 every open of an agent with a file list goes to the daemon to be judged"
            );
            [0; 10]
        }
        Err(e) => {
            tracing::warn!(
                "the kernel's BTF does not say how to walk up from a file ({e}): without BPF \
                 LSM, every open of an agent with a file list goes to the daemon to be judged"
            );
            [0; 10]
        }
    }
}

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

/// The offset of `field` in tracepoint `category/name`'s record, from its format file: record
/// layouts change between kernels (the fork record's comms became `__data_loc` after 6.12).
fn tracepoint_field_offset(category: &str, name: &str, field: &str) -> Result<u32, KernelError> {
    let candidates = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ];
    let path = candidates
        .iter()
        .map(|root| Path::new(root).join(category).join(name).join("format"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            Path::new(candidates[0])
                .join(category)
                .join(name)
                .join("format")
        });
    let pin_err = |source| KernelError::Pin {
        path: path.clone(),
        source,
    };
    let format = std::fs::read_to_string(&path).map_err(pin_err)?;
    parse_field_offset(&format, field).ok_or_else(|| {
        pin_err(std::io::Error::other(format!(
            "no field `{field}` with an offset in the tracepoint's format"
        )))
    })
}

/// `offset:N` of the line declaring `field` in a tracepoint format
/// (`\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;`).
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.split_whitespace().last()?;
        if name.split('[').next()? != field {
            return None;
        }
        let offset = rest
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

/// Waits until every BPF program that was running when it was called has finished: an RCU
/// grace period, through membarrier(MEMBARRIER_CMD_GLOBAL), which calls synchronize_rcu()
/// (BPF programs run inside RCU read-side sections). Before removing entries that a program
/// may have found through a value it read just before that value changed (the old rule
/// generation after a flip): without it a call that read the old generation, then lost its CPU
/// (seen in a TCG guest, 1 wrong verdict in 37,716 during 100 reloads), found its rules gone
/// and was denied.
pub fn wait_for_running_programs() {
    /// linux/membarrier.h.
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // Only nohz_full kernels refuse it: wait far longer than any program runs.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) failed ({}): old rule generations are removed \
                 100 ms after a reload's flip instead of after an RCU grace period",
                std::io::Error::last_os_error()
            );
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_says_how_to_walk_up_from_a_file() {
        // Every supported kernel has BTF (the daemon needs it for the LSM and exec offsets).
        let btf = crate::bpf::btf::Btf::vmlinux().expect("the running kernel's BTF");
        let o = walk_offsets(Some(&btf));
        assert!(o.iter().all(|&v| v != 0), "{o:?}");
        // `path` is { mnt, dentry }: the two sums are 8 bytes apart.
        assert_eq!(o[1], o[0] + 8, "{o:?}");
        // mnt_root is the vfsmount's first member.
        assert_eq!(o[5], o[4], "{o:?}");
        assert_eq!(walk_offsets(None), [0; 10]);
    }

    #[test]
    fn finds_a_field_offset_in_a_tracepoint_format() {
        // 6.1's record (comms inline) and 6.18's (comms as __data_loc).
        let v61 = "name: sched_process_fork\nID: 300\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(v61, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(v61, "parent_comm"), Some(8));
        let v618 = "format:\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(v618, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(v618, "pid"), None);
        assert_eq!(parse_field_offset("", "child_pid"), None);
    }
}
