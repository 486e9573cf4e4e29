//! `cargo xtask chaos`: the daemon SIGKILLed `rounds` times at crash points inside reloads,
//! guards, kill switches and DNS answers, and at random moments of reload storms, while an
//! agent probes; zero wrong verdicts expected (tests/tests/chaos.rs, run long).

use anyhow::{Result, bail};

use crate::{cargo_env, is_root};

pub fn chaos(rounds: usize) -> Result<()> {
    if !is_root() {
        bail!("chaos loads BPF programs and makes cgroups: run it as root");
    }
    // Debug build: the crash points exist only there.
    cargo_env(&["build", "--bins"], &[])?;
    cargo_env(
        &[
            "test",
            "--package",
            "agentwatch-tests",
            "--test",
            "chaos",
            "--",
            "--ignored",
            "--nocapture",
            "fifty_crashes",
        ],
        &[("AGENTWATCH_CHAOS_ROUNDS", &rounds.to_string())],
    )
}
