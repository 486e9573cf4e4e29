//! In-kernel hard caps: a rate limit per agent on connects, on sends and on the events it may
//! write to the ring buffer.
//!
//! Each cap is a GCRA (virtual scheduling) limiter: `tat` is the theoretical arrival time of the
//! next call. A call at `now` passes if `max(tat, now) - now <= tolerance`, and then moves
//! `tat` on by `interval`. This is a token bucket of `tolerance / interval + 1` tokens refilled
//! at one per `interval`, kept in one word updated with compare-and-swap, so concurrent CPUs
//! never let more through than the cap.

/// One cap; `interval_ns == 0` means no cap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    /// Nanoseconds per call at the capped rate (1e9 / calls per second).
    pub interval_ns: u64,
    /// How far ahead of now `tat` may run: (burst - 1) x interval.
    pub tolerance_ns: u64,
    /// Theoretical arrival time (CLOCK_MONOTONIC ns), advanced by the kernel.
    pub tat_ns: u64,
}

/// The caps of one agent, indexed by agent id in the `LIMITS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentLimits {
    pub connects: Cap,
    pub sends: Cap,
    /// Denied/capped egress and socket-denied events per second. Over it the kernel counts the
    /// event (`*_suppressed`, `SUPPRESSED`) instead of writing it, so one flooding agent cannot
    /// fill the ring buffer that every agent shares. Kills and escapes are never suppressed.
    pub events: Cap,
}

/// Burst allowed by a cap of `per_second`: a fifth of a second's worth, at least 1. Small, so
/// that "N per second" holds closely (at most N + burst in any one second).
pub const fn burst_of(per_second: u32) -> u32 {
    let b = per_second / 5;
    if b == 0 { 1 } else { b }
}

impl Cap {
    /// The cap for `per_second` calls per second (0 or None: no cap).
    pub const fn per_second(per_second: u32) -> Self {
        if per_second == 0 {
            return Self {
                interval_ns: 0,
                tolerance_ns: 0,
                tat_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / per_second as u64;
        Self {
            interval_ns,
            tolerance_ns: (burst_of(per_second) as u64 - 1) * interval_ns,
            tat_ns: 0,
        }
    }
}

const _: () = assert!(core::mem::size_of::<AgentLimits>() == 72);

/// A cap on outbound bytes per second, the same GCRA as [`Cap`] with a cost per byte: a packet
/// of `len` bytes moves `tat` on by `len x ps_per_byte / 1000` ns. `ps_per_byte == 0`: no cap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCap {
    /// Picoseconds per byte at the capped rate (1e12 / bytes per second).
    pub ps_per_byte: u64,
    /// How far ahead of now `tat` may run (the burst, in time).
    pub tolerance_ns: u64,
    /// Theoretical arrival time (CLOCK_MONOTONIC ns), advanced by the kernel.
    pub tat_ns: u64,
}

/// The largest packet a socket hands the IP layer at once (loopback and GSO send up to 64 KiB):
/// the burst of a byte cap is never smaller, or such a packet could never pass.
pub const MAX_PACKET: u64 = 65_536;

impl ByteCap {
    /// The cap for `per_second` bytes per second (0: no cap). Burst: a fifth of a second's
    /// worth, at least one largest packet.
    pub const fn per_second(per_second: u64) -> Self {
        if per_second == 0 {
            return Self {
                ps_per_byte: 0,
                tolerance_ns: 0,
                tat_ns: 0,
            };
        }
        let ps_per_byte = 1_000_000_000_000 / per_second;
        let burst = if per_second / 5 > MAX_PACKET {
            per_second / 5
        } else {
            MAX_PACKET
        };
        Self {
            ps_per_byte,
            tolerance_ns: burst * ps_per_byte / 1000,
            tat_ns: 0,
        }
    }
}

const _: () = assert!(core::mem::size_of::<ByteCap>() == 24);
