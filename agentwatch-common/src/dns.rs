//! Hostname rules: the DNS forwarder's ports per agent, the addresses its answers admitted, and
//! the resolver a redirected socket asked.

/// DNS traffic (UDP and TCP) of an agent with hostname rules goes to its forwarder.
pub const DNS_PORT: u16 = 53;

/// Most hostname rules one learned address carries at once (each with its own expiry). A name
/// matched by more rules than this keeps the ones that expire last.
pub const DNS_RANGES: usize = 8;

/// Query verdicts the forwarder counts per agent (`DNS_COUNTS`, written by the daemon only;
/// pinned, so the counts survive daemon restarts like the kernel's own).
pub const DNS_ALLOWED: usize = 0;
pub const DNS_DENIED: usize = 1;
pub const DNS_FAILED: usize = 2;
pub const DNS_MALFORMED: usize = 3;
/// Learn mode: no rule allows the name, but it was answered (nothing is denied in learn mode).
pub const DNS_WOULD_DENY: usize = 4;
pub const DNS_VERDICTS: usize = 5;

/// Where agent `id`'s forwarder listens on loopback (127.0.0.1 and ::1), host byte order;
/// 0: not listening (the redirected call is denied: fail closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPorts {
    pub udp4: u16,
    pub tcp4: u16,
    pub udp6: u16,
    pub tcp6: u16,
}

/// Key of a learned address: the agent, and the address as the egress hook judges it (IPv4,
/// also v4-mapped, in the first 4 bytes with family 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub agent: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// What one hostname rule admits towards a learned address, until `expires_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsRange {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) deadline: the kernel itself stops admitting at it,
    /// also while the daemon is down.
    pub expires_ns: u64,
    /// Identity of the rule (from its text), so a reload keeps exactly the entries whose rule
    /// is still configured.
    pub rule: u64,
    pub lo: u16,
    pub hi: u16,
    /// `PROTO_BIT_*` set.
    pub protos: u8,
    pub _pad: [u8; 3],
}

/// Value of a learned address: the rules that admit it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsValue {
    /// Valid entries in `ranges`, `<= DNS_RANGES`.
    pub count: u32,
    pub _pad: u32,
    pub ranges: [DnsRange; DNS_RANGES],
}

impl DnsValue {
    /// The first unexpired range's rule that admits `port` for protocol index `proto` at
    /// `now_ns`, if any.
    #[inline(always)]
    pub fn admitting_rule(&self, proto: u8, port: u16, now_ns: u64) -> Option<u64> {
        let bit = 1u8 << (proto & 7);
        let mut i = 0;
        while i < DNS_RANGES {
            if i as u32 >= self.count {
                break;
            }
            let r = &self.ranges[i];
            if r.protos & bit != 0 && r.lo <= port && port <= r.hi && now_ns < r.expires_ns {
                return Some(r.rule);
            }
            i += 1;
        }
        None
    }

    /// Does some unexpired range admit `port` for protocol index `proto` at `now_ns`?
    #[inline(always)]
    pub fn admits(&self, proto: u8, port: u16, now_ns: u64) -> bool {
        self.admitting_rule(proto, port, now_ns).is_some()
    }
}

/// The resolver a redirected socket asked, keyed by socket cookie: replies from the forwarder
/// (`fwd_port` on loopback) are shown to the agent as coming from here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrig {
    /// Network byte order; IPv4 in the first 4 bytes with family 4.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub fwd_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<DnsPorts>() == 8);
const _: () = assert!(core::mem::size_of::<DnsKey>() == 24);
const _: () = assert!(core::mem::size_of::<DnsRange>() == 24);
const _: () = assert!(core::mem::size_of::<DnsValue>() == 8 + 24 * DNS_RANGES);
const _: () = assert!(core::mem::size_of::<DnsOrig>() == 24);
