//! Crash points for fault tests (debug builds only): `AGENTWATCH_CRASH_AT=POINT` or
//! `POINT:N` makes the daemon SIGKILL itself the first (or Nth) time it reaches POINT, so a
//! test can kill it inside a reload, a guard, a kill switch or a DNS answer deterministically
//! rather than by luck. Release builds compile every point to nothing.
//!
//! Points: `reload.prepared` (every changed agent's new rules written beside the live ones,
//! nothing switched), `reload.switched_one` (the first agent switched, the others not),
//! `guard.state` (a new agent's state written, no program attached yet), `kill.denied` (the
//! kill switch revoked egress, no process killed yet), `dns.admitted` (an answer's addresses
//! written into the kernel, the reply not sent).

/// Crashes here if the environment says so (debug builds).
#[cfg(debug_assertions)]
pub fn point(name: &str) {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let v = std::env::var("AGENTWATCH_CRASH_AT").ok()?;
        Some(match v.split_once(':') {
            Some((p, n)) => (p.to_owned(), n.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    if let Some((point, nth)) = at
        && point == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth
    {
        tracing::warn!(point = name, "crash point reached: SIGKILL");
        // SAFETY: kill(2) on our own pid; SIGKILL, as a crash or an OOM kill would end us.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Release builds: no crash points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_name: &str) {}
