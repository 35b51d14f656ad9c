//! The QUIC endpoint: one quinn `Endpoint` that accepts and dials, a connection cache,
//! per-peer send queues and per-connection readers.
//!
//! Task layout (all on the runtime that called [`Net::bind`]):
//! - one accept loop, one task per inbound handshake (at most [`MAX_HANDSHAKES`]);
//! - per connection one `serve` task reading datagrams and accepting uni streams,
//!   with at most [`STREAM_READERS`] concurrent stream readers;
//! - per destination address one `peer_task` that owns dialling and sending to it, so
//!   concurrent sends share one dial and the queue in front of it is bounded;
//! - per reliable message one writer task, bounded by the peer's stream limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, ReadToEndError, SendDatagramError, VarInt};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::timeout;
use tracing::debug;

use crate::certs::{name_from_cert, validate_name, Identity};
use crate::tls;
use crate::NetError;

/// Messages waiting per destination (e.g. while dialling); beyond that sends are dropped.
pub(crate) const PEER_QUEUE: usize = 1024;
/// Concurrent stream readers per connection; further streams wait in quinn, and the
/// peer's stream credit runs out, which is the backpressure towards the sender.
const STREAM_READERS: usize = 64;
/// Concurrent inbound handshakes; more are refused so a flood cannot exhaust memory.
const MAX_HANDSHAKES: usize = 256;
/// Uni streams a peer may have open towards us at once: twice `STREAM_READERS`, so
/// a burst queues in quinn while the readers work. quinn keeps a table entry per
/// stream it allows (24 bytes, hashed), so this is memory held per connection: 1024
/// cost an idle agent with 49 peers 2.3–2.9 MiB (BENCHMARKS, idle footprint).
pub(crate) const MAX_UNI_STREAMS: u32 = 2 * STREAM_READERS as u32;
const DATAGRAM_RECEIVE_BUFFER: usize = 1 << 20;
/// Bounds buffered-but-unread stream data per connection; quinn's default is unbounded.
const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;

const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_BAD_NAME: u32 = 1;
const STOP_TOO_LONG: u32 = 1;

/// Transport tuning.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Largest reliable message accepted; larger incoming streams are dropped (default 16 MiB).
    pub max_frame: usize,
    /// Deadline for a handshake, dialling or accepting (default 3 s).
    pub connect_timeout: Duration,
    /// A connection without any traffic for this long is closed (default 30 s).
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets on open connections (default 15 s, half the idle
    /// timeout: each open connection sends them, so with 49 peers 5 s meant ~10 a second).
    pub keep_alive: Duration,
    /// Capacity of the channel of received messages handed to the caller (default
    /// 4096); datagrams beyond it are dropped, stream messages wait.
    pub incoming_capacity: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            max_frame: 16 << 20,
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(15),
            incoming_capacity: 4096,
        }
    }
}

/// One received message.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The sender's node name, from its verified certificate.
    pub from_name: String,
    /// The connection's remote address (the sender's listen address).
    pub from: SocketAddr,
    /// True if it came on a stream, false if it was a datagram.
    pub reliable: bool,
    /// The message, exactly as passed to [`Net::send`].
    pub bytes: Vec<u8>,
}

/// Counters (all monotonically increasing except `connections_open`), cheap to snapshot.
#[derive(Clone, Debug, Default)]
pub struct NetStats {
    /// Handshakes that completed with a verified, named peer.
    pub handshakes_ok: u64,
    /// Handshakes that failed: bad certificate, timeout, unreadable name, or refused under load.
    pub handshakes_failed: u64,
    /// Connections currently open (a gauge).
    pub connections_open: u64,
    /// Messages that could not be sent (no connection, stream error, queue full, closing).
    pub send_errors: u64,
    /// Incoming reliable messages dropped for exceeding `max_frame`.
    pub oversized_streams: u64,
    /// Outgoing datagrams dropped for exceeding the connection's datagram size.
    pub datagrams_too_large: u64,
    /// Incoming datagrams dropped because the receiver of [`Incoming`] was full.
    pub dropped_backpressure: u64,
    /// Payload bytes received (messages delivered to the channel or dropped for backpressure).
    pub bytes_in: u64,
    /// Payload bytes sent (datagrams handed to quinn, streams acknowledged by the peer).
    pub bytes_out: u64,
}

#[derive(Default)]
struct Counters {
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    connections_open: AtomicU64,
    send_errors: AtomicU64,
    oversized_streams: AtomicU64,
    datagrams_too_large: AtomicU64,
    dropped_backpressure: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The QUIC endpoint (cheaply cloneable handle).
///
/// Background tasks keep the endpoint running after every handle is dropped; call
/// [`Net::close`] to stop it.
#[derive(Clone)]
pub struct Net {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    cfg: NetConfig,
    runtime: Handle,
    incoming: mpsc::Sender<Incoming>,
    /// Live connections by canonical remote address, accepted and dialled alike. At most
    /// one per address; a second one (both sides dialled at once) is still served but
    /// not cached.
    conns: Mutex<HashMap<SocketAddr, Connection>>,
    /// Send queue of each destination's `peer_task`. An entry is removed only by its
    /// task, under this lock, when its queue is empty: a message put in under the lock
    /// is therefore always picked up.
    peers: Mutex<HashMap<SocketAddr, mpsc::Sender<Outgoing>>>,
    /// Messages accepted by `send` and not yet sent or failed; `close` waits for zero.
    inflight: watch::Sender<usize>,
    closing: AtomicBool,
    handshakes: Arc<Semaphore>,
    stats: Counters,
    /// Why the last dial of each address failed, until one succeeds.
    dial_errors: Mutex<HashMap<SocketAddr, String>>,
    /// When a refused inbound handshake from each IP was last logged (rate limit).
    refused_logged: Mutex<HashMap<std::net::IpAddr, std::time::Instant>>,
}

/// How often refused inbound handshakes from one IP are logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Operator-facing words for a failed handshake. `outbound`: we dialled (so a
/// certificate our side rejected is the peer's; one the peer rejected is ours).
pub fn describe_handshake_error(e: &quinn::ConnectionError, outbound: bool) -> String {
    use quinn::ConnectionError as E;
    let is_crypto = |code: quinn::TransportErrorCode| u64::from(code) & !0xff == 0x100;
    match e {
        E::TransportError(t) if is_crypto(t.code) || t.reason.contains("certificate") => {
            if t.reason.contains("certificate") {
                let whose = if outbound { "its" } else { "the dialler's" };
                format!(
                    "{whose} certificate is not from this cluster's CA ({})",
                    t.reason
                )
            } else {
                format!("TLS handshake failed: {t}")
            }
        }
        E::ConnectionClosed(c) if is_crypto(c.error_code) => {
            let whose = if outbound { "ours" } else { "this agent's" };
            format!(
                "the peer refused {whose}: {c} (is the certificate issued by the same cluster CA?)"
            )
        }
        E::TimedOut => "no answer: nothing listens there, or the network drops UDP".into(),
        other => other.to_string(),
    }
}

struct Outgoing {
    reliable: bool,
    bytes: Vec<u8>,
    _inflight: InFlight,
}

/// Counts a message as in flight for as long as it exists, whichever path drops it.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn new(inner: &Arc<Inner>) -> InFlight {
        inner.inflight.send_modify(|n| *n += 1);
        InFlight(inner.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked: every update is one insert or remove.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// IPv4 peers reach a dual-stack socket as `::ffff:a.b.c.d`; keying on the canonical
/// form makes the accepted connection and `send(a.b.c.d)` meet in the cache.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn transport_config(cfg: &NetConfig) -> Result<quinn::TransportConfig, NetError> {
    if cfg.max_frame == 0 {
        return Err(NetError::Config("max_frame must be positive".into()));
    }
    if cfg.connect_timeout.is_zero() {
        return Err(NetError::Config("connect_timeout must be positive".into()));
    }
    let idle = IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|_| NetError::Config(format!("idle_timeout {:?} too large", cfg.idle_timeout)))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval((!cfg.keep_alive.is_zero()).then_some(cfg.keep_alive))
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    Ok(transport)
}

impl Net {
    /// Binds a QUIC endpoint that is both server and client on `listen`, with mutual TLS
    /// from `id`; must be called inside a tokio runtime, whose tasks then drive it.
    ///
    /// Backpressure on the returned receiver ([`NetConfig::incoming_capacity`]): datagrams are dropped when it
    /// is full (counted in `dropped_backpressure`); stream messages wait for room, which
    /// stalls that stream and, through QUIC flow control, eventually the sending peer.
    pub fn bind(
        listen: SocketAddr,
        id: &Identity,
        cfg: NetConfig,
    ) -> Result<(Net, mpsc::Receiver<Incoming>), NetError> {
        let runtime = Handle::try_current().map_err(|_| {
            NetError::Bind("Net::bind must be called inside a tokio runtime".into())
        })?;
        let transport = Arc::new(transport_config(&cfg)?);

        let server_crypto = QuicServerConfig::try_from(tls::server_config(id)?)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(tls::client_config(id)?)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        // One socket for both roles: dialled peers see our listen address as the source,
        // so their cache and ours agree on one address per node.
        let mut endpoint = Endpoint::server(server, listen)
            .map_err(|e| NetError::Bind(format!("{listen}: {e}")))?;
        endpoint.set_default_client_config(client);
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| NetError::Bind(format!("{listen}: {e}")))?;

        let (tx, rx) = mpsc::channel(cfg.incoming_capacity.max(1));
        let inner = Arc::new(Inner {
            endpoint,
            local_addr,
            cfg,
            runtime: runtime.clone(),
            incoming: tx,
            conns: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            inflight: watch::Sender::new(0),
            closing: AtomicBool::new(false),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            stats: Counters::default(),
            dial_errors: Mutex::new(HashMap::new()),
            refused_logged: Mutex::new(HashMap::new()),
        });
        runtime.spawn(accept_loop(inner.clone()));
        Ok((Net { inner }, rx))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Queues `bytes` for `to` and returns at once: reliable = one unidirectional stream
    /// per message, otherwise one QUIC datagram; failures are counted, never returned.
    pub fn send(&self, to: SocketAddr, reliable: bool, bytes: Vec<u8>) {
        let inner = &self.inner;
        let to = canonical(to);
        if inner.closing.load(Ordering::Relaxed) {
            bump(&inner.stats.send_errors, 1);
            debug!(peer = %to, "send after close, dropped");
            return;
        }
        let mut msg = Outgoing {
            reliable,
            bytes,
            _inflight: InFlight::new(inner),
        };
        let mut peers = lock(&inner.peers);
        // Two rounds: the second replaces a queue whose task died with the runtime.
        for _ in 0..2 {
            let queue = peers.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                inner.runtime.spawn(peer_task(inner.clone(), to, rx));
                tx
            });
            match queue.try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    bump(&inner.stats.send_errors, 1);
                    debug!(peer = %to, "send queue full, dropped");
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    peers.remove(&to);
                    msg = back;
                }
            }
        }
        bump(&inner.stats.send_errors, 1);
    }

    /// Largest datagram payload usable right now towards `to` (None if not connected).
    pub fn max_datagram_size(&self, to: SocketAddr) -> Option<usize> {
        self.inner
            .cached(canonical(to))
            .and_then(|conn| conn.max_datagram_size())
    }

    /// Why the last attempt to connect to `to` failed, if it did and no later one
    /// succeeded: for "cannot join through seed …" messages.
    pub fn dial_error(&self, to: SocketAddr) -> Option<String> {
        lock(&self.inner.dial_errors).get(&canonical(to)).cloned()
    }

    /// Whether a connection to `to` is open.
    pub fn is_connected(&self, to: SocketAddr) -> bool {
        self.inner.cached(canonical(to)).is_some()
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> NetStats {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            handshakes_ok: get(&s.handshakes_ok),
            handshakes_failed: get(&s.handshakes_failed),
            connections_open: get(&s.connections_open),
            send_errors: get(&s.send_errors),
            oversized_streams: get(&s.oversized_streams),
            datagrams_too_large: get(&s.datagrams_too_large),
            dropped_backpressure: get(&s.dropped_backpressure),
            bytes_in: get(&s.bytes_in),
            bytes_out: get(&s.bytes_out),
        }
    }

    /// Graceful close: waits up to `grace` for in-flight sends, then closes every
    /// connection and waits up to `grace` again for the endpoint to go idle.
    ///
    /// Sends after this call are counted as `send_errors` and dropped.
    pub async fn close(&self, grace: Duration) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Relaxed);
        let mut inflight = inner.inflight.subscribe();
        if timeout(grace, inflight.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            debug!(
                pending = *inflight.borrow(),
                "close: sends still in flight after grace"
            );
        }
        inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        let _ = timeout(grace, inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    /// The cached connection to `to` if it is still open; a closed one is evicted.
    fn cached(&self, to: SocketAddr) -> Option<Connection> {
        let mut conns = lock(&self.conns);
        let conn = conns.get(&to)?;
        if conn.close_reason().is_none() {
            return Some(conn.clone());
        }
        conns.remove(&to);
        None
    }

    /// The connection to `to`, dialling if none is cached. Only `peer_task` calls this,
    /// so there is at most one dial per destination at a time.
    async fn connection(self: &Arc<Self>, to: SocketAddr) -> Option<Connection> {
        if let Some(conn) = self.cached(to) {
            return Some(conn);
        }
        let connecting = match self.endpoint.connect(to, tls::SNI) {
            Ok(connecting) => connecting,
            Err(e) => {
                debug!(peer = %to, error = %e, "cannot dial");
                lock(&self.dial_errors).insert(to, format!("cannot dial: {e}"));
                return None;
            }
        };
        match timeout(self.cfg.connect_timeout, connecting).await {
            Ok(Ok(conn)) => self.register(conn),
            Ok(Err(e)) => {
                bump(&self.stats.handshakes_failed, 1);
                debug!(peer = %to, error = %e, "dial failed");
                lock(&self.dial_errors).insert(to, describe_handshake_error(&e, true));
                None
            }
            Err(_) => {
                bump(&self.stats.handshakes_failed, 1);
                debug!(peer = %to, "dial timed out");
                lock(&self.dial_errors).insert(
                    to,
                    format!(
                        "no answer within {:?}: nothing listens there, or the network drops UDP",
                        self.cfg.connect_timeout
                    ),
                );
                None
            }
        }
    }

    /// Takes a freshly handshaken connection into service: reads the peer's name,
    /// caches the connection and starts its readers. Returns None (and closes the
    /// connection) if the peer's certificate carries no usable name.
    fn register(self: &Arc<Self>, conn: Connection) -> Option<Connection> {
        let addr = canonical(conn.remote_address());
        let name = match peer_name(&conn) {
            Ok(name) => name,
            Err(e) => {
                bump(&self.stats.handshakes_failed, 1);
                debug!(peer = %addr, error = %e, "peer certificate has no usable name");
                conn.close(VarInt::from_u32(CLOSE_BAD_NAME), b"no usable name");
                return None;
            }
        };
        bump(&self.stats.handshakes_ok, 1);
        bump(&self.stats.connections_open, 1);
        lock(&self.dial_errors).remove(&addr);
        // The newest connection wins the cache slot. A peer that restarted on the
        // same address dials us afresh while our old connection to its dead
        // process still looks open (until the idle timeout); keeping the old one
        // would send into the void. With simultaneous dials both connections
        // are open and read from, so either is fine to keep.
        lock(&self.conns).insert(addr, conn.clone());
        debug!(peer = %addr, name = %name, "connection up");
        self.runtime
            .spawn(serve(self.clone(), conn.clone(), Arc::from(name), addr));
        Some(conn)
    }

    /// Sends one message on `conn`; every outcome is counted here.
    async fn deliver(self: &Arc<Self>, conn: &Connection, to: SocketAddr, msg: Outgoing) {
        if msg.reliable {
            // Awaiting here (not in the writer) keeps stream opens in send order and
            // makes a peer out of stream credit stall this queue rather than spawn writers.
            match conn.open_uni().await {
                Ok(stream) => {
                    self.runtime
                        .spawn(write_stream(self.clone(), stream, to, msg));
                }
                Err(e) => {
                    bump(&self.stats.send_errors, 1);
                    debug!(peer = %to, error = %e, "cannot open stream");
                }
            }
            return;
        }
        let len = msg.bytes.len();
        match conn.max_datagram_size() {
            None => {
                bump(&self.stats.send_errors, 1);
                debug!(peer = %to, "peer does not accept datagrams");
            }
            Some(max) if len > max => {
                bump(&self.stats.datagrams_too_large, 1);
                debug!(peer = %to, len, max, "datagram too large, dropped");
            }
            Some(_) => match conn.send_datagram(Bytes::from(msg.bytes)) {
                Ok(()) => bump(&self.stats.bytes_out, len as u64),
                Err(SendDatagramError::TooLarge) => bump(&self.stats.datagrams_too_large, 1),
                Err(e) => {
                    bump(&self.stats.send_errors, 1);
                    debug!(peer = %to, error = %e, "datagram send failed");
                }
            },
        }
    }

    /// Logs a refused inbound handshake, at most once a minute per IP.
    fn log_refusal(&self, peer: SocketAddr, why: &str) {
        let now = std::time::Instant::now();
        let mut seen = lock(&self.refused_logged);
        if seen
            .get(&peer.ip())
            .is_some_and(|t| now.duration_since(*t) < REFUSAL_LOG_EVERY)
        {
            return;
        }
        if seen.len() > 4096 {
            seen.retain(|_, t| now.duration_since(*t) < REFUSAL_LOG_EVERY);
        }
        seen.insert(peer.ip(), now);
        tracing::warn!(peer = %peer, "refused a QUIC handshake from {peer}: {why}");
    }

    /// Removes the queue of `to` if nothing is waiting in it; true if removed.
    fn retire_peer(&self, to: SocketAddr, queue: &mpsc::Receiver<Outgoing>) -> bool {
        let mut peers = lock(&self.peers);
        if queue.is_empty() {
            peers.remove(&to);
            true
        } else {
            false
        }
    }

    /// Hands a received message to the caller. Datagrams never wait (they are lossy
    /// anyway); stream messages wait, so a slow consumer slows the senders down.
    async fn emit(&self, msg: Incoming) {
        bump(&self.stats.bytes_in, msg.bytes.len() as u64);
        if msg.reliable {
            // An error only means the receiver was dropped: nobody is listening any more.
            let _ = self.incoming.send(msg).await;
        } else if let Err(mpsc::error::TrySendError::Full(_)) = self.incoming.try_send(msg) {
            bump(&self.stats.dropped_backpressure, 1);
        }
    }
}

/// The peer's name from its end-entity certificate, which the TLS layer has verified.
fn peer_name(conn: &Connection) -> Result<String, NetError> {
    let certs = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or(NetError::NoName)?;
    let leaf = certs.first().ok_or(NetError::NoName)?;
    let name = name_from_cert(leaf)?;
    validate_name(&name)?;
    Ok(name)
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let Ok(permit) = inner.handshakes.clone().try_acquire_owned() else {
            bump(&inner.stats.handshakes_failed, 1);
            debug!(peer = %incoming.remote_address(), "too many handshakes, refused");
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        let runtime = inner.runtime.clone();
        runtime.spawn(async move {
            let _permit = permit;
            let peer = incoming.remote_address();
            let result = match incoming.accept() {
                Ok(connecting) => timeout(inner.cfg.connect_timeout, connecting).await,
                Err(e) => Ok(Err(e)),
            };
            match result {
                Ok(Ok(conn)) => {
                    inner.register(conn);
                }
                Ok(Err(e)) => {
                    bump(&inner.stats.handshakes_failed, 1);
                    debug!(peer = %peer, error = %e, "inbound handshake failed");
                    inner.log_refusal(peer, &describe_handshake_error(&e, false));
                }
                Err(_) => {
                    bump(&inner.stats.handshakes_failed, 1);
                    debug!(peer = %peer, "inbound handshake timed out");
                }
            }
        });
    }
}

/// Owns sending to one destination: dials when needed and delivers queued messages in order.
async fn peer_task(inner: Arc<Inner>, to: SocketAddr, mut queue: mpsc::Receiver<Outgoing>) {
    loop {
        let msg = match timeout(inner.cfg.idle_timeout, queue.recv()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return,
            Err(_) => {
                if inner.retire_peer(to, &queue) {
                    return;
                }
                continue;
            }
        };
        let Some(conn) = inner.connection(to).await else {
            // Fail everything already queued: each message redialling in turn would
            // hold the queue for a connect timeout per message.
            let mut failed = 1;
            drop(msg);
            while let Ok(msg) = queue.try_recv() {
                failed += 1;
                drop(msg);
            }
            bump(&inner.stats.send_errors, failed);
            continue;
        };
        inner.deliver(&conn, to, msg).await;
    }
}

async fn write_stream(
    inner: Arc<Inner>,
    mut stream: quinn::SendStream,
    to: SocketAddr,
    msg: Outgoing,
) {
    let len = msg.bytes.len();
    let result = async {
        stream
            .write_all(&msg.bytes)
            .await
            .map_err(|e| e.to_string())?;
        stream.finish().map_err(|e| e.to_string())?;
        // Waiting for the acknowledgement keeps the message "in flight" for close(),
        // which would otherwise cut the connection under unacknowledged data.
        match stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(format!("stopped by peer with code {code}")),
            Err(e) => Err(e.to_string()),
        }
    }
    .await;
    match result {
        Ok(()) => bump(&inner.stats.bytes_out, len as u64),
        Err(e) => {
            bump(&inner.stats.send_errors, 1);
            debug!(peer = %to, len, error = %e, "stream send failed");
        }
    }
    drop(msg);
}

/// Reads everything the peer sends on `conn` until it closes, then uncaches it.
async fn serve(inner: Arc<Inner>, conn: Connection, name: Arc<str>, addr: SocketAddr) {
    tokio::join!(
        read_datagrams(&inner, &conn, &name, addr),
        read_streams(&inner, &conn, &name, addr),
    );
    let reason = conn.closed().await;
    debug!(peer = %addr, name = %name, reason = %reason, "connection closed");
    {
        let mut conns = lock(&inner.conns);
        if conns
            .get(&addr)
            .is_some_and(|cached| cached.stable_id() == conn.stable_id())
        {
            conns.remove(&addr);
        }
    }
    inner.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
}

async fn read_datagrams(inner: &Inner, conn: &Connection, name: &Arc<str>, addr: SocketAddr) {
    while let Ok(datagram) = conn.read_datagram().await {
        inner
            .emit(Incoming {
                from_name: name.to_string(),
                from: addr,
                reliable: false,
                bytes: datagram.to_vec(),
            })
            .await;
    }
}

async fn read_streams(inner: &Arc<Inner>, conn: &Connection, name: &Arc<str>, addr: SocketAddr) {
    let readers = Arc::new(Semaphore::new(STREAM_READERS));
    loop {
        // Never closed, so this cannot fail; stop serving rather than panic if it ever did.
        let Ok(permit) = readers.clone().acquire_owned().await else {
            return;
        };
        let Ok(mut stream) = conn.accept_uni().await else {
            return;
        };
        let inner = inner.clone();
        let name = name.clone();
        let max_frame = inner.cfg.max_frame;
        inner.runtime.clone().spawn(async move {
            let _permit = permit;
            match stream.read_to_end(max_frame).await {
                Ok(bytes) => {
                    inner
                        .emit(Incoming {
                            from_name: name.to_string(),
                            from: addr,
                            reliable: true,
                            bytes,
                        })
                        .await;
                }
                Err(ReadToEndError::TooLong) => {
                    bump(&inner.stats.oversized_streams, 1);
                    debug!(peer = %addr, max_frame, "stream over max_frame, dropped");
                    // Tell the sender to stop instead of draining the rest into nowhere.
                    let _ = stream.stop(VarInt::from_u32(STOP_TOO_LONG));
                }
                Err(e) => debug!(peer = %addr, error = %e, "stream read failed"),
            }
        });
    }
}
