//! Per-agent syscall counts: the userspace half of `agentwatch-ebpf/src/syscalls.rs`.
//!
//! The sys_enter hook costs every syscall on the host (about 200 ns on the project's machines),
//! so it is attached only while some agent has `monitor.syscalls = true`.

use std::path::Path;

use aya::{Ebpf, programs::RawTracePoint, programs::links::FdLink};

use crate::bpf::{KernelError, Link, load_program};

pub const PROGRAM: &str = "syscalls_sys_enter";

fn program(ebpf: &mut Ebpf) -> Result<&mut RawTracePoint, KernelError> {
    crate::bpf::program(ebpf, PROGRAM)
}

/// Loads (verifies) the program.
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    load_program(PROGRAM, program(ebpf)?, RawTracePoint::load)
}

/// Attaches the sys_enter hook (pinned under `pin_dir` when given; an earlier pin is adopted).
pub(crate) fn attach(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Link, KernelError> {
    Link::pinned_or_attach(pin_dir, PROGRAM, || {
        let prog = program(ebpf)?;
        let id = prog
            .attach("sys_enter")
            .map_err(|source| KernelError::Program {
                name: PROGRAM,
                source,
            })?;
        let link = prog.take_link(id).map_err(|source| KernelError::Program {
            name: PROGRAM,
            source,
        })?;
        // Raw tracepoint links are always fd-based.
        Ok(FdLink::from(link))
    })
}

/// Is the sys_enter hook pinned (attached by an earlier daemon) under `pin_dir`?
pub(crate) fn pinned(pin_dir: &Path) -> bool {
    pin_dir.join(PROGRAM).exists()
}
