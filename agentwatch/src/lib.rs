//! agentwatch: an egress and syscall monitor with a kill switch for AI agents on Linux.
//!
//! Each agent is one cgroup v2. Kernel programs (agentwatch-ebpf) attached to that cgroup judge
//! every outbound connect/sendmsg against the agent's allow-list; this crate loads them, feeds
//! them the policy and turns what they report into an audit trail.
//!
//! Modules follow the concerns, each named like its kernel half and owning its programs and
//! maps: [`egress`] (allow-lists, caps, denial summaries), [`sockets`] (escape guards),
//! [`bytes`] (byte counts and caps), [`dns`] (hostname rules and their forwarder), [`exec`]
//! (exec allow-list), [`files`] (file guard, and the BPF LSM programs), [`lease`], [`learn`]
//! and [`syscalls`]. Each is a [`concern::Concern`]: [`agent`] writes one agent's policy
//! across them in one loop of phases; [`kernel`] loads the object and hands each concern its
//! part, with [`bpf`] (errors, loading, BTF, links, pins) below. The daemon ([`daemon`]) is a set of tasks around one policy, with
//! one audit writer ([`audit`]) and a pure breaker ([`breaker`]). Around them: [`cgroup`],
//! [`config`], [`events`], [`control`], [`metrics`], [`launch`] with [`harden`], and
//! [`privileges`] (what an agent's processes could use to switch agentwatch off).

pub mod agent;
pub mod audit;
pub mod bpf;
pub mod breaker;
pub mod bytes;
pub mod cgroup;
pub mod concern;
pub mod config;
pub mod control;
pub mod crash;
pub mod daemon;
pub mod demo;
pub mod dns;
pub mod egress;
pub mod events;
pub mod exec;
pub mod files;
pub mod gateway;
pub mod harden;
pub mod kernel;
pub mod launch;
pub mod learn;
pub mod lease;
pub mod metrics;
pub mod ownership;
pub mod peer;
pub mod privileges;
pub mod rules;
pub mod sockdiag;
pub mod sockets;
pub mod syscalls;
pub mod tamper;
pub mod top;
pub mod uids;
