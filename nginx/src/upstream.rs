//! Where `dispatch_http_call` sends a call: the cluster name is the name of an nginx
//! `upstream NAME { server ...; }` block, or a literal `IP:port`. The worker copies the
//! upstream blocks' resolved addresses into a table at start ([`crate::worker`]); picking
//! a peer is pure and unit-tested here.

use std::cell::RefCell;
use std::net::SocketAddr;

/// Most `upstream` blocks the table keeps (an nginx configuration has a handful).
pub const MAX_CLUSTERS: usize = 1024;
/// Most addresses kept for one cluster.
pub const MAX_PEERS_PER_CLUSTER: usize = 256;

/// One address to connect to: a `struct sockaddr` as nginx resolved it (or as built from
/// a literal), and its text for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The raw `sockaddr` bytes (`sockaddr_in`, `sockaddr_in6` or `sockaddr_un`).
    pub sockaddr: Vec<u8>,
    /// How nginx names it (`127.0.0.1:8080`).
    pub name: String,
}

/// An `upstream` block: its name and the addresses of its usable servers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// The block's name.
    pub name: String,
    /// The addresses, in configuration order.
    pub peers: Vec<Peer>,
    next: usize,
}

impl Cluster {
    /// A cluster with `peers` (at most [`MAX_PEERS_PER_CLUSTER`] are kept).
    pub fn new(name: &str, mut peers: Vec<Peer>) -> Cluster {
        peers.truncate(MAX_PEERS_PER_CLUSTER);
        Cluster {
            name: name.to_string(),
            peers,
            next: 0,
        }
    }

    /// The next peer, round-robin (server weights are not used).
    fn pick(&mut self) -> Option<Peer> {
        if self.peers.is_empty() {
            return None;
        }
        let p = self.peers[self.next % self.peers.len()].clone();
        self.next = (self.next + 1) % self.peers.len();
        Some(p)
    }
}

/// The clusters a worker knows.
#[derive(Debug, Default)]
pub struct Clusters {
    clusters: Vec<Cluster>,
}

impl Clusters {
    /// A table of `clusters` (at most [`MAX_CLUSTERS`] are kept).
    pub fn new(mut clusters: Vec<Cluster>) -> Clusters {
        clusters.truncate(MAX_CLUSTERS);
        Clusters { clusters }
    }

    /// The peer for the next call to `name`: an upstream block's next server (names
    /// compare without case, as nginx's do), else `name` read as a literal `IP:port`.
    pub fn resolve(&mut self, name: &str) -> Option<Peer> {
        if let Some(c) = self
            .clusters
            .iter_mut()
            .find(|c| c.name.eq_ignore_ascii_case(name))
        {
            return c.pick();
        }
        literal(name)
    }
}

/// A literal `IP:port` (`127.0.0.1:8080`, `[::1]:8080`) as a peer.
pub fn literal(name: &str) -> Option<Peer> {
    let addr: SocketAddr = name.parse().ok()?;
    Some(Peer {
        sockaddr: sockaddr_bytes(&addr),
        name: addr.to_string(),
    })
}

/// The `struct sockaddr_in` / `sockaddr_in6` bytes for `addr`, in the C layout.
pub fn sockaddr_bytes(addr: &SocketAddr) -> Vec<u8> {
    use nginx_sys::{in6_addr, in_addr, sockaddr_in, sockaddr_in6, AF_INET, AF_INET6};
    fn raw<T>(v: &T) -> Vec<u8> {
        // SAFETY: plain C structs without padding holes that matter (zeroed first).
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: all-zero is a valid sockaddr_in.
            let mut s: sockaddr_in = unsafe { std::mem::zeroed() };
            s.sin_family = AF_INET as _;
            s.sin_port = a.port().to_be();
            s.sin_addr = in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            raw(&s)
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut s: sockaddr_in6 = unsafe { std::mem::zeroed() };
            s.sin6_family = AF_INET6 as _;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo().to_be();
            s.sin6_scope_id = a.scope_id();
            // SAFETY: all-zero is a valid in6_addr; the union is written as bytes.
            let mut ip: in6_addr = unsafe { std::mem::zeroed() };
            ip.__in6_u.__u6_addr8 = a.ip().octets();
            s.sin6_addr = ip;
            raw(&s)
        }
    }
}

thread_local! {
    /// This worker's table, filled at worker start from the configuration.
    static CLUSTERS: RefCell<Clusters> = RefCell::new(Clusters::default());
}

/// Replaces this worker's table.
pub fn install(clusters: Clusters) {
    CLUSTERS.with(|c| *c.borrow_mut() = clusters);
}

/// The peer for the next call to `name` in this worker (see [`Clusters::resolve`]).
pub fn resolve(name: &str) -> Option<Peer> {
    CLUSTERS.with(|c| c.borrow_mut().resolve(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn peer(addr: &str) -> Peer {
        literal(addr).unwrap()
    }

    #[test]
    fn named_clusters_round_robin_and_ignore_case() {
        let mut t = Clusters::new(vec![
            Cluster::new("upstream", vec![peer("127.0.0.1:1"), peer("127.0.0.1:2")]),
            Cluster::new("other", vec![peer("[::1]:3")]),
        ]);
        let names: Vec<String> = (0..5)
            .map(|_| t.resolve("upstream").unwrap().name)
            .collect();
        assert_eq!(
            names,
            [
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:1"
            ]
        );
        assert_eq!(t.resolve("UpStream").unwrap().name, "127.0.0.1:2");
        assert_eq!(t.resolve("other").unwrap().name, "[::1]:3");
    }

    #[test]
    fn unknown_names_and_empty_clusters_resolve_to_nothing() {
        let mut t = Clusters::new(vec![Cluster::new("empty", vec![])]);
        assert_eq!(t.resolve("empty"), None);
        assert_eq!(t.resolve("nope"), None);
        assert_eq!(t.resolve(""), None);
        assert_eq!(t.resolve("127.0.0.1"), None);
        assert_eq!(t.resolve("localhost:80"), None);
        assert_eq!(t.resolve("127.0.0.1:99999"), None);
    }

    #[test]
    fn literals_become_sockaddrs() {
        let mut t = Clusters::default();
        let p = t.resolve("127.0.0.1:8080").unwrap();
        assert_eq!(p.name, "127.0.0.1:8080");
        assert_eq!(p.sockaddr.len(), size_of::<nginx_sys::sockaddr_in>());
        // family (host order), port (network order), address (network order).
        assert_eq!(
            u16::from_ne_bytes([p.sockaddr[0], p.sockaddr[1]]),
            nginx_sys::AF_INET as u16
        );
        assert_eq!(&p.sockaddr[2..4], &8080u16.to_be_bytes());
        assert_eq!(&p.sockaddr[4..8], &Ipv4Addr::LOCALHOST.octets());
        let p6 = t.resolve("[::1]:443").unwrap();
        assert_eq!(p6.sockaddr.len(), size_of::<nginx_sys::sockaddr_in6>());
        assert_eq!(
            u16::from_ne_bytes([p6.sockaddr[0], p6.sockaddr[1]]),
            nginx_sys::AF_INET6 as u16
        );
        assert_eq!(&p6.sockaddr[2..4], &443u16.to_be_bytes());
        assert_eq!(&p6.sockaddr[8..24], &Ipv6Addr::LOCALHOST.octets());
    }

    #[test]
    fn a_named_cluster_wins_over_a_literal() {
        let mut t = Clusters::new(vec![Cluster::new(
            "127.0.0.1:80",
            vec![peer("127.0.0.1:9")],
        )]);
        assert_eq!(t.resolve("127.0.0.1:80").unwrap().name, "127.0.0.1:9");
    }

    #[test]
    fn tables_are_bounded() {
        let many: Vec<Peer> = (0..MAX_PEERS_PER_CLUSTER + 10)
            .map(|i| peer(&format!("127.0.0.1:{}", i + 1)))
            .collect();
        let c = Cluster::new("big", many);
        assert_eq!(c.peers.len(), MAX_PEERS_PER_CLUSTER);
        let t = Clusters::new(vec![Cluster::default(); MAX_CLUSTERS + 1]);
        assert_eq!(t.clusters.len(), MAX_CLUSTERS);
    }
}
