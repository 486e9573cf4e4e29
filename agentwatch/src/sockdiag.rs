//! Open sockets of an agent, and closing those its policy no longer admits.
//!
//! The egress hooks judge a call when it is made. A reload that removes a rule (or a hostname
//! rule, whose learned addresses go with it) would leave a TCP connection or a connected UDP
//! socket opened under the old rule sending on. After such a reload the daemon lists the
//! agent's sockets with the kernel's socket diagnostics (NETLINK_SOCK_DIAG, what `ss` reads)
//! and closes each one whose peer the new policy refuses with SOCK_DESTROY (what `ss -K` does;
//! CONFIG_INET_DIAG_DESTROY, which Debian's kernels have): the agent's next send on it fails
//! (ECONNABORTED), and TCP's peer gets a reset. Chosen over a per-packet re-judgement in the
//! kernel because that would cost every packet of every agent a rule lookup for an event as
//! rare as a reload, and over the sock_destroy kfunc (6.5+, BPF iterators) because it works on
//! every kernel this project supports.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// linux/sock_diag.h and linux/inet_diag.h.
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// The request's filter attribute, and its `cgroup == ID` test (Linux 5.9+).
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_CGROUP_COND: u8 = 13;
/// `struct inet_diag_bc_op` ({code: u8, yes: u8, no: u16}) and the u64 cgroup id after it.
const BC_CGROUP_OP: usize = 4 + 8;
/// A JMP op (no operand).
const BC_JMP_OP: usize = 4;
/// Ids one filter tests: its jumps (`no`, 16 bits) reach past the end, and the attribute's
/// length is 16 bits too.
const BC_MAX_CGROUPS: usize = 1024;

/// TCP states (also what UDP sockets report: ESTABLISHED once connected).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LISTEN: u8 = 10;

const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ: usize = 8 + SOCKID;
/// `struct inet_diag_msg`.
const MSG: usize = 4 + SOCKID + 20;

/// One socket as the kernel listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSocket {
    /// `libc::AF_INET` or `libc::AF_INET6`.
    pub family: u8,
    /// `libc::IPPROTO_TCP` or `libc::IPPROTO_UDP`.
    pub protocol: u8,
    /// TCP state (UDP: [`TCP_ESTABLISHED`] when connected).
    pub state: u8,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The cgroup the socket was made in (0 if the kernel did not say).
    pub cgroup_id: u64,
    /// The kernel's `inet_diag_sockid`, as listed: what SOCK_DESTROY names it by.
    id: [u8; SOCKID],
}

impl OpenSocket {
    /// Does it send to one peer (a TCP connection, a connected UDP socket)?
    pub fn connected(&self) -> bool {
        self.peer.port() != 0
            && (self.state == TCP_ESTABLISHED
                || (self.protocol == libc::IPPROTO_TCP as u8
                    && matches!(self.state, TCP_SYN_SENT | TCP_CLOSE_WAIT)))
    }
}

/// A NETLINK_SOCK_DIAG socket.
fn open() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A request: netlink header, then `inet_diag_req_v2`, then the filter (if any).
fn request(kind: u16, flags: u16, family: u8, protocol: u8, id: &[u8; SOCKID]) -> Vec<u8> {
    request_filtered(kind, flags, family, protocol, id, &[])
}

fn request_filtered(
    kind: u16,
    flags: u16,
    family: u8,
    protocol: u8,
    id: &[u8; SOCKID],
    bytecode: &[u8],
) -> Vec<u8> {
    let attr = if bytecode.is_empty() {
        0
    } else {
        4 + bytecode.len()
    };
    let len = NLMSG_HDR + REQ + attr;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // the kernel's port
    m.extend_from_slice(&[family, protocol, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(id);
    if attr > 0 {
        m.extend_from_slice(&(attr as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(bytecode);
    }
    m
}

/// The filter "the socket's cgroup is one of `cgroups`". The kernel checks that every jump
/// lands on an op reached by the `yes` jumps from the start, so the ops follow one another:
/// per id a test whose match goes on to a JMP to the end (kept) and whose miss skips that JMP
/// to the next test; the last miss jumps past the end (dropped).
fn cgroup_filter(cgroups: &[u64]) -> Vec<u8> {
    debug_assert!(!cgroups.is_empty() && cgroups.len() <= BC_MAX_CGROUPS);
    let pair = BC_CGROUP_OP + BC_JMP_OP;
    let total = cgroups.len() * pair;
    let mut bc = Vec::with_capacity(total);
    let op = |bc: &mut Vec<u8>, code: u8, yes: usize, no: usize| {
        bc.push(code);
        bc.push(yes as u8);
        bc.extend_from_slice(&(no as u16).to_ne_bytes());
    };
    for (i, id) in cgroups.iter().enumerate() {
        let left = total - i * pair;
        let miss = if i + 1 == cgroups.len() {
            left + 4
        } else {
            pair
        };
        op(&mut bc, INET_DIAG_BC_CGROUP_COND, BC_CGROUP_OP, miss);
        bc.extend_from_slice(&id.to_ne_bytes());
        // A JMP always takes `no`: to the end, kept.
        op(&mut bc, INET_DIAG_BC_JMP, BC_JMP_OP, left - BC_CGROUP_OP);
    }
    bc
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sends `msg`, alive for the call, to the kernel (the socket's default peer).
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receives into `buf`, alive and writable for the call.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Every TCP and UDP socket made in one of `cgroups`, filtered in the kernel.
///
/// Why not a dump of every socket, filtered here: a dump longer than one reply (about 32 KiB, a few
/// hundred sockets) is resumed by position in the kernel's hash chains, and a socket removed
/// between two replies shifts that position, so a socket open all along can be skipped (seen:
/// a unit test missed its own socket while another test suite churned sockets). Filtered in
/// the kernel, an agent's sockets fit in one reply, which is taken in one pass.
pub fn list_in(cgroups: &[u64]) -> io::Result<Vec<OpenSocket>> {
    let mut out = Vec::new();
    for chunk in cgroups.chunks(BC_MAX_CGROUPS) {
        let filter = cgroup_filter(chunk);
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for protocol in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
                dump_filtered(family, protocol, &filter, &mut out)?;
            }
        }
    }
    Ok(out)
}

fn dump_filtered(
    family: u8,
    protocol: u8,
    filter: &[u8],
    out: &mut Vec<OpenSocket>,
) -> io::Result<()> {
    let fd = open()?;
    send(
        &fd,
        &request_filtered(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            protocol,
            &[0; SOCKID],
            filter,
        ),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&fd, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
            let len = u32_at(&buf, at).ok_or_else(bad)? as usize;
            let kind = u16_at(&buf, at + 4).ok_or_else(bad)?;
            if len < NLMSG_HDR || at + len > n {
                return Err(bad());
            }
            let body = &buf[at + NLMSG_HDR..at + len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = u32_at(body, 0).ok_or_else(bad)? as i32;
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse(body, protocol) {
                        out.push(s);
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// One `inet_diag_msg` and its attributes.
fn parse(body: &[u8], protocol: u8) -> Option<OpenSocket> {
    if body.len() < MSG {
        return None;
    }
    let (family, state) = (body[0], body[1]);
    let mut id = [0u8; SOCKID];
    id.copy_from_slice(&body[4..4 + SOCKID]);
    // Ports are big-endian; addresses are in network order, IPv4 in the first 4 bytes.
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |bytes: &[u8]| -> IpAddr {
        if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[..16]);
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    let local = SocketAddr::new(addr(&id[4..20]), sport);
    let peer = SocketAddr::new(addr(&id[20..36]), dport);
    let mut cgroup_id = 0;
    let mut at = MSG;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)?;
        if len < 4 || at + len > body.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup_id = u64::from_ne_bytes(body.get(at + 4..at + 12)?.try_into().ok()?);
        }
        at += (len + 3) & !3;
    }
    Some(OpenSocket {
        family,
        protocol,
        state,
        local,
        peer,
        cgroup_id,
        id,
    })
}

/// The TCP socket whose own address is `local` and whose peer is `peer`, if the host has one:
/// one exact look-up (no dump). The gateway asks this of each connection it accepts, with the
/// addresses reversed, to learn the cgroup of the socket that called it.
pub fn find_tcp(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<OpenSocket>> {
    let family = match (local, peer) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET as u8,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => libc::AF_INET6 as u8,
        _ => return Ok(None),
    };
    let mut id = [0u8; SOCKID];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&peer.port().to_be_bytes());
    let put = |slot: &mut [u8], ip: IpAddr| match ip {
        IpAddr::V4(a) => slot[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => slot[..16].copy_from_slice(&a.octets()),
    };
    put(&mut id[4..20], local.ip());
    put(&mut id[20..36], peer.ip());
    // Interface 0 (any); cookie INET_DIAG_NOCOOKIE: not checked.
    id[40..48].copy_from_slice(&[0xff; 8]);
    let fd = open()?;
    send(
        &fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST,
            family,
            libc::IPPROTO_TCP as u8,
            &id,
        ),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(&fd, &mut buf)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let len = u32_at(&buf[..n], 0).ok_or_else(bad)? as usize;
    if len < NLMSG_HDR || len > n {
        return Err(bad());
    }
    let body = &buf[NLMSG_HDR..len];
    match u16_at(&buf[..n], 4).ok_or_else(bad)? {
        NLMSG_ERROR => match u32_at(body, 0).map(|e| -(e as i32)) {
            Some(libc::ENOENT) => Ok(None),
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Err(bad()),
        },
        SOCK_DIAG_BY_FAMILY => Ok(parse(body, libc::IPPROTO_TCP as u8)),
        _ => Err(bad()),
    }
}

/// Closes `s` (SOCK_DESTROY). A socket already gone is not an error.
pub fn destroy(s: &OpenSocket) -> io::Result<()> {
    let fd = open()?;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            s.family,
            s.protocol,
            &s.id,
        ),
    )?;
    let mut buf = [0u8; 512];
    let n = recv(&fd, &mut buf)?;
    let kind = u16_at(&buf[..n], 4);
    if kind != Some(NLMSG_ERROR) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SOCK_DESTROY: no acknowledgement",
        ));
    }
    match u32_at(&buf[..n], NLMSG_HDR).map(|e| e as i32) {
        Some(0) => Ok(()),
        Some(e) if -e == libc::ENOENT => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(-e)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SOCK_DESTROY: short acknowledgement",
        )),
    }
}

const _: () = assert!(size_of::<libc::nlmsghdr>() == NLMSG_HDR);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_a_connected_udp_socket_of_this_process_with_its_cgroup() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(peer.local_addr().unwrap()).unwrap();
        // Filtered by this process's cgroup, as the daemon lists an agent's: an unfiltered
        // dump of a busy host may skip a socket (see `list_in`).
        let own = own_cgroup_id();
        let all = list_in(&[own]).unwrap();
        assert!(all.iter().all(|o| o.cgroup_id == own), "{all:?}");
        let found = all
            .iter()
            .find(|o| o.local == s.local_addr().unwrap())
            .expect("listed");
        assert_eq!(found.peer, peer.local_addr().unwrap());
        assert!(found.connected());
        assert_ne!(found.cgroup_id, 0);
        let unconnected = all
            .iter()
            .find(|o| o.local == peer.local_addr().unwrap())
            .expect("listed");
        assert!(!unconnected.connected());
    }

    /// The id (inode) of this process's cgroup v2.
    fn own_cgroup_id() -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        let root = crate::cgroup::cgroup2_mount().expect("cgroup2 mounted");
        std::fs::metadata(root.join(path.trim_start_matches('/')))
            .unwrap()
            .ino()
    }

    #[test]
    fn a_filter_of_many_cgroups_keeps_exactly_their_sockets() {
        let own = own_cgroup_id();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // More ids than one filter holds, this process's last: several filters, one dump each.
        let mut ids: Vec<u64> = (1..=2 * BC_MAX_CGROUPS as u64)
            .map(|i| u64::MAX - i)
            .collect();
        assert!(list_in(&ids).unwrap().is_empty());
        ids.push(own);
        let found = list_in(&ids).unwrap();
        assert!(found.iter().any(|o| o.local == s.local_addr().unwrap()));
        assert!(found.iter().all(|o| o.cgroup_id == own));
    }

    #[test]
    fn finds_the_calling_end_of_a_tcp_connection_exactly() {
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(any).unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (served, from) = listener.accept().unwrap();
            // As the gateway asks: the socket at the peer's address, whose peer is us.
            let found = find_tcp(from, served.local_addr().unwrap())
                .unwrap()
                .expect("found");
            assert_eq!(found.local, client.local_addr().unwrap());
            assert_eq!(found.peer, listener.local_addr().unwrap());
            assert_eq!(found.state, TCP_ESTABLISHED);
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            assert_ne!(found.cgroup_id, 0, "{own}");
            // A port nobody has: nothing, not an error.
            let mut gone = from;
            gone.set_port(1);
            assert_eq!(find_tcp(gone, served.local_addr().unwrap()).unwrap(), None);
        }
    }
}
