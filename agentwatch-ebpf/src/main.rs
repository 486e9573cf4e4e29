//! agentwatch's kernel programs. One module per concern, named like its userspace half
//! (`agentwatch/src/egress/mod.rs` loads and feeds `egress.rs` here); `agent.rs` (which agent
//! calls, and what a call is) and `limits.rs` (bounds and caps) are what they share.
#![no_std]
#![no_main]
// Compare-and-swap and atomic add on map values (caps, counters in hash maps).
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core_intrinsics: atomic cmpxchg and add on the BPF target"
)]

mod agent;
mod bytes;
mod dns;
mod egress;
mod exec;
mod files;
mod learn;
mod lease;
mod limits;
mod sockets;
mod syscalls;
mod tamper;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it only exists to link.
    loop {}
}

/// bpf_ringbuf_* and the cgroup helpers need a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
