//! Which host ports have listening sockets, and on which addresses, from the kernel's
//! socket tables (`/proc/net/{tcp,tcp6,udp,udp6}` of the agent's network namespace).
//!
//! Discovery needs it: a workload that binds `127.0.0.1` is reachable from its own
//! node only, so its endpoint must not be handed to callers elsewhere. Reading the
//! tables costs one pass over the host's sockets, shared by every workload.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::spec::Protocol;

/// TCP state `LISTEN` in `/proc/net/tcp*`.
const TCP_LISTEN: &str = "0A";
/// UDP state of a bound, unconnected socket (`TCP_CLOSE` reused) in `/proc/net/udp*`.
const UDP_BOUND: &str = "07";

/// Addresses that listen on each port, by protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listeners {
    tcp: HashMap<u16, Vec<IpAddr>>,
    udp: HashMap<u16, Vec<IpAddr>>,
}

impl Listeners {
    /// Reads the socket tables of the current network namespace (blocking; a missing
    /// table, such as `tcp6` on a host without IPv6, counts as empty).
    pub fn read() -> io::Result<Listeners> {
        let mut l = Listeners::default();
        for (file, proto) in [
            ("/proc/net/tcp", Protocol::Tcp),
            ("/proc/net/tcp6", Protocol::Tcp),
            ("/proc/net/udp", Protocol::Udp),
            ("/proc/net/udp6", Protocol::Udp),
        ] {
            match std::fs::read_to_string(file) {
                Ok(text) => l.add_table(proto, &text),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(l)
    }

    /// Adds the listening sockets of one table's text.
    pub fn add_table(&mut self, proto: Protocol, text: &str) {
        let want = match proto {
            Protocol::Tcp => TCP_LISTEN,
            Protocol::Udp => UDP_BOUND,
        };
        let map = match proto {
            Protocol::Tcp => &mut self.tcp,
            Protocol::Udp => &mut self.udp,
        };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(_slot), Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if state != want {
                continue;
            }
            if let Some((ip, port)) = parse_local(local) {
                map.entry(port).or_default().push(ip);
            }
        }
    }

    /// Whether every socket listening on `port` is bound to a loopback address;
    /// `None` when nothing listens there (or not in this network namespace).
    pub fn loopback_only(&self, port: u16, proto: Protocol) -> Option<bool> {
        let map = match proto {
            Protocol::Tcp => &self.tcp,
            Protocol::Udp => &self.udp,
        };
        let ips = map.get(&port).filter(|v| !v.is_empty())?;
        Some(ips.iter().all(is_loopback))
    }
}

fn is_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6), as the kernel prints them:
/// the address in host byte order per 32-bit word, the port in big-endian hex.
fn parse_local(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word =
        |hex: &str| -> Option<[u8; 4]> { Some(u32::from_str_radix(hex, 16).ok()?.to_le_bytes()) };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:0051 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 0100007F:0052 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0052 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
   1: 00000000000000000000000000000000:0053 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0 100 0 0 10 0
";

    #[test]
    fn tells_loopback_from_any_address() {
        let mut l = Listeners::default();
        l.add_table(Protocol::Tcp, TCP);
        l.add_table(Protocol::Tcp, TCP6);
        assert_eq!(l.loopback_only(8080, Protocol::Tcp), Some(true));
        assert_eq!(l.loopback_only(80, Protocol::Tcp), Some(false));
        // An established connection is not a listener.
        assert_eq!(l.loopback_only(81, Protocol::Tcp), None);
        // 127.0.0.1 and ::1: still loopback only.
        assert_eq!(l.loopback_only(82, Protocol::Tcp), Some(true));
        assert_eq!(l.loopback_only(83, Protocol::Tcp), Some(false));
        assert_eq!(l.loopback_only(80, Protocol::Udp), None);
    }

    #[test]
    fn sees_real_sockets() {
        let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let l = Listeners::read().unwrap();
        let port = |s: std::io::Result<std::net::SocketAddr>| s.unwrap().port();
        assert_eq!(
            l.loopback_only(port(lo.local_addr()), Protocol::Tcp),
            Some(true)
        );
        assert_eq!(
            l.loopback_only(port(any.local_addr()), Protocol::Tcp),
            Some(false)
        );
        assert_eq!(
            l.loopback_only(port(udp.local_addr()), Protocol::Udp),
            Some(true)
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let mut l = Listeners::default();
        l.add_table(
            Protocol::Tcp,
            "header\n0: zz:1 0 0A\n1:\n\n2: 0100007F:XYZ 0 0A\n",
        );
        assert_eq!(l, Listeners::default());
    }
}
