//! The DNS listeners: UDP and TCP on one address, feeding [`crate::dns::respond`].
//!
//! Each query is answered from the latest published [`Resolver`] (a `watch`, read
//! without waiting), so lookups never queue behind the agent loop. UDP is served by
//! a few dedicated threads blocking on one socket (the kernel wakes them directly; no
//! async task shares their core's turn); TCP connections (RFC 7766: length-prefixed,
//! several queries per connection) get a task each, at most [`MAX_TCP_CONNECTIONS`]
//! at once, closed after [`TCP_IDLE`] without a query. Everything stops on the
//! shutdown token: the UDP threads notice within [`UDP_POLL`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dns::{respond, DnsConfig, Outcome, Transport};
use crate::resolve::Resolver;

/// TCP connections served at once; more wait in the kernel's accept queue.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection without a query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Largest UDP query read (bigger datagrams are cut, then answered FORMERR).
const UDP_BUF: usize = 4096;
/// How often a UDP thread waiting for a query checks for shutdown.
pub const UDP_POLL: Duration = Duration::from_millis(200);

/// Counters of the DNS server, for `/metrics`.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Answers by response code: NOERROR, NXDOMAIN, REFUSED, FORMERR, NOTIMP, SERVFAIL.
    answers: [AtomicU64; 6],
    /// Queries that could not be parsed (answered FORMERR).
    malformed: AtomicU64,
    /// Packets that got no answer (shorter than a header, or responses).
    dropped: AtomicU64,
    /// Answers with TC set.
    truncated: AtomicU64,
    /// Queries over UDP.
    udp: AtomicU64,
    /// Queries over TCP.
    tcp: AtomicU64,
}

/// Response codes [`DnsStats`] counts, in its order.
pub const RCODES: [&str; 6] = [
    "noerror", "nxdomain", "refused", "formerr", "notimp", "servfail",
];

/// A copy of [`DnsStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsCounts {
    /// Answers by response code, in [`RCODES`] order.
    pub answers: [u64; 6],
    /// Queries that could not be parsed.
    pub malformed: u64,
    /// Packets that got no answer.
    pub dropped: u64,
    /// Answers with TC set.
    pub truncated: u64,
    /// Queries over UDP.
    pub udp: u64,
    /// Queries over TCP.
    pub tcp: u64,
}

impl DnsStats {
    fn count(&self, outcome: &Outcome, transport: Transport) {
        let bump = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        bump(match transport {
            Transport::Udp => &self.udp,
            Transport::Tcp => &self.tcp,
        });
        match outcome {
            Outcome::Answered { rcode, truncated } => {
                let i = match *rcode {
                    ResponseCode::NoError => 0,
                    ResponseCode::NXDomain => 1,
                    ResponseCode::Refused => 2,
                    ResponseCode::FormErr => 3,
                    ResponseCode::NotImp => 4,
                    _ => 5,
                };
                bump(&self.answers[i]);
                if *truncated {
                    bump(&self.truncated);
                }
            }
            Outcome::Malformed => {
                bump(&self.malformed);
                bump(&self.answers[3]);
            }
            Outcome::Dropped => bump(&self.dropped),
        }
    }

    /// The counters now.
    pub fn counts(&self) -> DnsCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsCounts {
            answers: std::array::from_fn(|i| get(&self.answers[i])),
            malformed: get(&self.malformed),
            dropped: get(&self.dropped),
            truncated: get(&self.truncated),
            udp: get(&self.udp),
            tcp: get(&self.tcp),
        }
    }
}

/// Bound DNS sockets, not yet serving.
pub struct DnsServer {
    udp: std::net::UdpSocket,
    tcp: TcpListener,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (with port 0: one free port for both).
    pub async fn bind(addr: SocketAddr) -> io::Result<DnsServer> {
        let udp = std::net::UdpSocket::bind(addr)?;
        udp.set_read_timeout(Some(UDP_POLL))?;
        let bound = udp.local_addr()?;
        let tcp = TcpListener::bind(bound).await?;
        Ok(DnsServer { udp, tcp })
    }

    /// The address both sockets are bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Serves on tasks of `tracker` until `stop` is cancelled.
    pub fn spawn(
        self,
        resolvers: watch::Receiver<Arc<Resolver>>,
        cfg: Arc<DnsConfig>,
        stats: Arc<DnsStats>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> io::Result<()> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        for _ in 0..threads {
            let sock = self.udp.try_clone()?;
            let (resolvers, cfg, stats, stop) =
                (resolvers.clone(), cfg.clone(), stats.clone(), stop.clone());
            tracker.spawn_blocking(move || serve_udp(sock, resolvers, cfg, stats, stop));
        }
        tracker.spawn(serve_tcp(
            self.tcp,
            resolvers,
            cfg,
            stats,
            stop,
            tracker.clone(),
        ));
        Ok(())
    }
}

/// One UDP thread: blocks on the socket, answers, until `stop`.
fn serve_udp(
    sock: std::net::UdpSocket,
    resolvers: watch::Receiver<Arc<Resolver>>,
    cfg: Arc<DnsConfig>,
    stats: Arc<DnsStats>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; UDP_BUF];
    while !stop.is_cancelled() {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux: not fatal.
                tracing::debug!("dns: receive failed: {e}");
                continue;
            }
        };
        let resolver = resolvers.borrow().clone();
        let reply = respond(&resolver, &cfg, &buf[..n], Transport::Udp);
        stats.count(&reply.outcome, Transport::Udp);
        if let Some(bytes) = reply.bytes {
            if let Err(e) = sock.send_to(&bytes, peer) {
                tracing::debug!(%peer, "dns: send failed: {e}");
            }
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    resolvers: watch::Receiver<Arc<Resolver>>,
    cfg: Arc<DnsConfig>,
    stats: Arc<DnsStats>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let (conn, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("dns: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (resolvers, cfg, stats, stop) =
            (resolvers.clone(), cfg.clone(), stats.clone(), stop.clone());
        tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                r = serve_conn(conn, &resolvers, &cfg, &stats) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "dns: tcp connection ended: {e}");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Answers length-prefixed queries on one connection until it closes or idles.
async fn serve_conn(
    mut conn: TcpStream,
    resolvers: &watch::Receiver<Arc<Resolver>>,
    cfg: &DnsConfig,
    stats: &DnsStats,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let n = usize::from(u16::from_be_bytes(len));
        buf.resize(n, 0);
        tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query not sent in time"))??;
        let resolver = resolvers.borrow().clone();
        let reply = respond(&resolver, cfg, &buf, Transport::Tcp);
        stats.count(&reply.outcome, Transport::Tcp);
        let Some(bytes) = reply.bytes else {
            continue;
        };
        let mut out = Vec::with_capacity(bytes.len() + 2);
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(&bytes);
        conn.write_all(&out).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::resolve::InOrder;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn serves_udp_and_tcp_and_counts() {
        let mut catalog = Catalog {
            generation: 1,
            ..Catalog::default()
        };
        catalog
            .nodes
            .insert("n1".into(), std::net::IpAddr::from([10, 1, 2, 3]));
        let (_tx, rx) = watch::channel(Arc::new(Resolver::build(catalog, &InOrder, None)));
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let stats = Arc::new(DnsStats::default());
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        server
            .spawn(
                rx,
                Arc::new(DnsConfig::new("shoal", 1).unwrap()),
                stats.clone(),
                stop.clone(),
                &tracker,
            )
            .unwrap();

        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.send_to(&query("n1.node.shoal."), addr).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.answers.len(), 1);
        // Garbage: FORMERR, counted.
        udp.send_to(&[0, 1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 9], addr)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();

        // Two queries on one TCP connection.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        for name in ["n1.node.shoal.", "example.org."] {
            let q = query(name);
            tcp.write_all(&(q.len() as u16).to_be_bytes())
                .await
                .unwrap();
            tcp.write_all(&q).await.unwrap();
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).await.unwrap();
            let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut body).await.unwrap();
            Message::from_vec(&body).unwrap();
        }
        let c = stats.counts();
        assert_eq!((c.udp, c.tcp, c.malformed), (2, 2, 1));
        assert_eq!(c.answers[0], 2, "two NOERROR");
        assert_eq!(c.answers[2], 1, "one REFUSED");
        stop.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("every DNS task stops on the token");
    }
}
