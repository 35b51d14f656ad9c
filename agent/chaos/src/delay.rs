//! Packet delay without `netem`: the kernel's NFQUEUE hands an agent's incoming
//! packets to a thread of the harness, which gives each back (`NF_ACCEPT`) after its
//! own delay, so packets arrive late and, with jitter, out of order.
//!
//! A [`Delayer`] is one thread inside an agent's network namespace speaking the
//! `nfnetlink_queue` protocol on a netlink socket (copy mode "meta": only packet ids
//! travel, never payloads). The lab adds the iptables rule that queues packets
//! only once the delayer is bound, with `--queue-bypass`, so packets pass untouched
//! whenever no delayer listens. Dropping a delayer releases every packet it holds.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::schedule::Rng;

/// `NFNL_SUBSYS_QUEUE`: the netfilter netlink subsystem of queued packets.
const SUBSYS_QUEUE: u16 = 3;
const MSG_PACKET: u16 = 0;
const MSG_VERDICT: u16 = 1;
const MSG_CONFIG: u16 = 2;
const ATTR_PACKET_HDR: u16 = 1;
const ATTR_VERDICT_HDR: u16 = 2;
const ATTR_CFG_CMD: u16 = 1;
const ATTR_CFG_PARAMS: u16 = 2;
const ATTR_CFG_QUEUE_MAXLEN: u16 = 3;
const CMD_BIND: u8 = 1;
const CMD_UNBIND: u8 = 2;
const COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
/// Packets the kernel may hold for us before it drops new ones.
const QUEUE_MAXLEN: u32 = 16_384;

/// Delays the packets of one NFQUEUE queue in one namespace until dropped.
pub struct Delayer {
    stop: Arc<AtomicBool>,
    held: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    /// Binds queue `queue` in namespace `ns` (a name under `/run/netns`) and holds
    /// every packet it receives for `delay` ± `jitter` (uniform, from `seed`).
    /// Returns once the queue is bound, or with the error that prevented it.
    pub fn start(
        ns: &str,
        queue: u16,
        delay: Duration,
        jitter: Duration,
        seed: u64,
    ) -> anyhow::Result<Delayer> {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns_name = ns.to_string();
        let thread = {
            let stop = stop.clone();
            let held = held.clone();
            std::thread::Builder::new()
                .name(format!("delay-{ns}"))
                .spawn(move || {
                    let sock = match enter_and_bind(&ns_name, queue) {
                        Ok(s) => {
                            let _ = ready_tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let mut rng = Rng::new(seed);
                    hold_loop(&sock, queue, delay, jitter, &mut rng, &stop, &held);
                    let _ = sock.send(&config_msg(queue, CMD_UNBIND));
                })
                .context("starting a delay thread")?
        };
        let mut d = Delayer {
            stop,
            held,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) => {
                d.finish();
                Err(e)
            }
            Err(_) => {
                d.finish();
                bail!("the delay thread for {ns} did not bind its queue within 5 s")
            }
        }
    }

    /// Packets held and released so far.
    pub fn packets(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A netlink socket of the netfilter family.
struct Netlink(OwnedFd);

impl Netlink {
    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl with family AF_NETLINK and pid 0 is the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and to outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for a datagram; `Ok(0)` when none came.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(1_000) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(0);
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // Overruns (ENOBUFS) and spurious wakeups are not fatal.
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }
}

/// Moves the calling thread (only it) into the network namespace `ns` (a name
/// under `/run/netns`): sockets it opens from then on belong to that namespace,
/// wherever they are used later.
pub(crate) fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves this thread into namespace `ns`, opens a netlink socket there and binds
/// `queue` in copy mode "meta", checking the kernel's acknowledgements.
fn enter_and_bind(ns: &str, queue: u16) -> anyhow::Result<Netlink> {
    enter_netns(ns)?;
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        bail!("netlink socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here only.
    let sock = Netlink(unsafe { OwnedFd::from_raw_fd(fd) });
    let big: libc::c_int = 8 << 20;
    // SAFETY: an int option of the right size. Best effort: a smaller buffer only
    // means overruns under heavy traffic, which the loop tolerates.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    // SAFETY: a zeroed sockaddr_nl (pid 0: the kernel assigns one).
    let mut me: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    me.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: me outlives the call.
    let r = unsafe {
        libc::bind(
            fd,
            (&me as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r != 0 {
        bail!(
            "binding the netlink socket: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut params = Vec::with_capacity(5);
    params.extend_from_slice(&0u32.to_be_bytes());
    params.push(COPY_META);
    let steps: [(&str, Vec<u8>); 3] = [
        ("bind the queue", config_msg(queue, CMD_BIND)),
        (
            "set copy mode",
            message(
                MSG_CONFIG,
                libc::NLM_F_ACK as u16,
                queue,
                &[(ATTR_CFG_PARAMS, &params)],
            ),
        ),
        (
            "set the queue length",
            message(
                MSG_CONFIG,
                libc::NLM_F_ACK as u16,
                queue,
                &[(ATTR_CFG_QUEUE_MAXLEN, &QUEUE_MAXLEN.to_be_bytes())],
            ),
        ),
    ];
    let mut buf = vec![0u8; 8192];
    for (what, msg) in steps {
        sock.send(&msg)
            .with_context(|| format!("nfqueue: {what}"))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("nfqueue: {what}: no answer from the kernel");
            }
            let n = sock.recv(&mut buf, left)?;
            match ack_in(&buf[..n]) {
                Some(0) => break,
                Some(errno) => bail!(
                    "nfqueue: {what}: {} (is nfnetlink_queue in this kernel?)",
                    std::io::Error::from_raw_os_error(errno)
                ),
                None => continue,
            }
        }
    }
    Ok(sock)
}

/// Receives queued packets and gives each back once its time has come, until
/// `stop`; then gives back everything still held.
fn hold_loop(
    sock: &Netlink,
    queue: u16,
    delay: Duration,
    jitter: Duration,
    rng: &mut Rng,
    stop: &AtomicBool,
    held: &AtomicU64,
) {
    let mut due: BinaryHeap<Reverse<(Instant, u32)>> = BinaryHeap::new();
    let mut buf = vec![0u8; 1 << 16];
    let spread = jitter.as_micros() as u64;
    loop {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = due.peek().copied() {
            if at > now {
                break;
            }
            due.pop();
            let _ = sock.send(&verdict_msg(queue, id));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let wait = due
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        let n = match sock.recv(&mut buf, wait) {
            Ok(n) => n,
            Err(_) => break,
        };
        let arrived = Instant::now();
        for id in packet_ids(&buf[..n]) {
            let d = if spread == 0 {
                delay
            } else {
                let off = rng.next_u64() % (2 * spread + 1);
                (delay + Duration::from_micros(off)).saturating_sub(jitter)
            };
            due.push(Reverse((arrived + d, id)));
            held.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Packets queued before the lab removed its rule are still announced: give
    // them back too, with what is held.
    while let Ok(n) = sock.recv(&mut buf, Duration::from_millis(20)) {
        if n == 0 {
            break;
        }
        for id in packet_ids(&buf[..n]) {
            due.push(Reverse((Instant::now(), id)));
        }
    }
    while let Some(Reverse((_, id))) = due.pop() {
        let _ = sock.send(&verdict_msg(queue, id));
    }
}

/// A netlink message of the queue subsystem: header, `nfgenmsg` (family unspecified,
/// version 0, the queue number big-endian), then attributes.
fn message(kind: u16, flags: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    b.extend_from_slice(&queue.to_be_bytes());
    for (ty, payload) in attrs {
        b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(payload);
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
    }
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&((SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    b[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
    b
}

fn config_msg(queue: u16, cmd: u8) -> Vec<u8> {
    message(
        MSG_CONFIG,
        libc::NLM_F_ACK as u16,
        queue,
        &[(ATTR_CFG_CMD, &[cmd, 0, 0, 0])],
    )
}

fn verdict_msg(queue: u16, id: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&NF_ACCEPT.to_be_bytes());
    v.extend_from_slice(&id.to_be_bytes());
    message(MSG_VERDICT, 0, queue, &[(ATTR_VERDICT_HDR, &v)])
}

/// Netlink messages in one datagram: (type, payload after the 16-byte header).
fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(b[0..4].try_into().ok()?) as usize;
        if len < 16 || len > b.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(b[4..6].try_into().ok()?);
        let body = &b[16..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((ty, body))
    })
}

/// The errno of the first acknowledgement in `b` (0: success), if any.
fn ack_in(b: &[u8]) -> Option<i32> {
    messages(b).find_map(|(ty, body)| {
        (ty == libc::NLMSG_ERROR as u16 && body.len() >= 4)
            .then(|| -i32::from_ne_bytes(body[0..4].try_into().unwrap()))
    })
}

/// Ids of the queued packets announced in `b`.
fn packet_ids(b: &[u8]) -> Vec<u32> {
    messages(b)
        .filter(|(ty, _)| *ty == (SUBSYS_QUEUE << 8) | MSG_PACKET)
        .filter_map(|(_, body)| {
            let mut attrs = body.get(4..)?;
            while attrs.len() >= 4 {
                let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if len < 4 || len > attrs.len() {
                    return None;
                }
                if ty == ATTR_PACKET_HDR && len >= 8 {
                    return Some(u32::from_be_bytes(attrs[4..8].try_into().ok()?));
                }
                attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
            }
            None
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_message_has_the_layout_the_kernel_reads() {
        let m = verdict_msg(7, 0x0102_0304);
        // 16 header + 4 nfgenmsg + 4 attribute header + 8 verdict.
        assert_eq!(m.len(), 32);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (3 << 8) | 1);
        assert_eq!(&m[18..20], &7u16.to_be_bytes());
        assert_eq!(u16::from_ne_bytes([m[20], m[21]]), 12);
        assert_eq!(&m[24..28], &1u32.to_be_bytes());
        assert_eq!(&m[28..32], &0x0102_0304u32.to_be_bytes());
    }

    #[test]
    fn packet_ids_are_read_from_queued_packet_messages_only() {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&42u32.to_be_bytes());
        hdr.extend_from_slice(&[0x08, 0x00, 1]);
        let pkt = message(MSG_PACKET, 0, 0, &[(ATTR_PACKET_HDR, &hdr)]);
        let other = message(MSG_CONFIG, 0, 0, &[(ATTR_PACKET_HDR, &hdr)]);
        let mut both = other.clone();
        both.extend_from_slice(&pkt);
        assert_eq!(packet_ids(&both), vec![42]);
        assert_eq!(packet_ids(&pkt[..20]), Vec::<u32>::new(), "truncated");
        assert_eq!(ack_in(&pkt), None);
    }
}
