//! Real endpoints over loopback QUIC; every wait is a condition with a deadline.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

use crate::{init_ca, issue, Identity, Incoming, Net, NetConfig, NetError, NetStats};

const DEADLINE: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn new_ca() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    init_ca(dir.path()).expect("init_ca");
    dir
}

fn bind(id: &Identity, cfg: NetConfig) -> (Net, Receiver<Incoming>) {
    Net::bind(loopback(), id, cfg).expect("bind")
}

async fn recv(rx: &mut Receiver<Incoming>) -> Incoming {
    timeout(DEADLINE, rx.recv())
        .await
        .expect("no message before the deadline")
        .expect("channel closed")
}

/// Polls `cond` until it holds; panics with `what` at the deadline.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = timeout(DEADLINE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for: {what}");
}

/// Asserts that `rx` yields nothing for `window`.
async fn assert_silent(rx: &mut Receiver<Incoming>, window: Duration) {
    if let Ok(Some(msg)) = timeout(window, rx.recv()).await {
        panic!("unexpected message from {} ({})", msg.from_name, msg.from);
    }
}

fn check(msg: &Incoming, name: &str, from: &Net, reliable: bool, bytes: &[u8]) {
    assert_eq!(msg.from_name, name);
    assert_eq!(msg.from, from.local_addr());
    assert_eq!(msg.reliable, reliable);
    assert_eq!(msg.bytes, bytes);
}

async fn with_deadline<F: Future>(f: F) -> F::Output {
    timeout(DEADLINE * 3, f).await.expect("test deadline")
}

#[tokio::test]
async fn messages_flow_both_ways_with_names_and_addresses() {
    with_deadline(async {
        let ca = new_ca();
        let a_id = Identity::self_issued(ca.path(), "node-a").expect("self_issued");
        let out = tempfile::tempdir().expect("tempdir");
        issue(ca.path(), "node_b.zone-1", out.path()).expect("issue");
        let b_id = Identity::load(
            &out.path().join("node.pem"),
            &out.path().join("node.key"),
            &out.path().join("ca.pem"),
        )
        .expect("load");
        assert_eq!(b_id.name, "node_b.zone-1");

        let (a, mut a_rx) = bind(&a_id, NetConfig::default());
        let (b, mut b_rx) = bind(&b_id, NetConfig::default());

        // Reliable first: it also establishes the connection the datagram then uses.
        a.send(b.local_addr(), true, b"a->b reliable".to_vec());
        check(&recv(&mut b_rx).await, "node-a", &a, true, b"a->b reliable");
        a.send(b.local_addr(), false, b"a->b datagram".to_vec());
        check(
            &recv(&mut b_rx).await,
            "node-a",
            &a,
            false,
            b"a->b datagram",
        );

        b.send(a.local_addr(), true, b"b->a reliable".to_vec());
        check(
            &recv(&mut a_rx).await,
            "node_b.zone-1",
            &b,
            true,
            b"b->a reliable",
        );
        b.send(a.local_addr(), false, b"b->a datagram".to_vec());
        check(
            &recv(&mut a_rx).await,
            "node_b.zone-1",
            &b,
            false,
            b"b->a datagram",
        );

        let big: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 251) as u8).collect();
        a.send(b.local_addr(), true, big.clone());
        check(&recv(&mut b_rx).await, "node-a", &a, true, &big);

        assert!(a
            .max_datagram_size(b.local_addr())
            .is_some_and(|n| n > 1000));
        let too_big = vec![0u8; 64 << 10];
        a.send(b.local_addr(), false, too_big);
        wait_until("datagram counted too large", || {
            a.stats().datagrams_too_large == 1
        })
        .await;

        // A stream's bytes count once the peer acknowledged them, which may come
        // after the peer already handed the message up.
        wait_until("big message counted as sent", || {
            a.stats().bytes_out >= big.len() as u64
        })
        .await;
        let stats: NetStats = a.stats();
        assert_eq!(stats.handshakes_failed, 0);
        assert_eq!(stats.send_errors, 0);
        assert!(stats.handshakes_ok >= 1);

        // Many concurrent sends to a fresh peer share one dial.
        let (c, mut c_rx) = bind(
            &Identity::self_issued(ca.path(), "node-c").expect("self_issued"),
            NetConfig::default(),
        );
        for i in 0..100u8 {
            a.send(c.local_addr(), true, vec![i]);
        }
        let mut seen = [false; 100];
        for _ in 0..100 {
            let msg = recv(&mut c_rx).await;
            seen[usize::from(msg.bytes[0])] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(c.stats().handshakes_ok, 1);

        a.close(Duration::from_secs(1)).await;
        b.close(Duration::from_secs(1)).await;
        c.close(Duration::from_secs(1)).await;
        wait_until("connections closed", || a.stats().connections_open == 0).await;
        a.send(b.local_addr(), true, b"after close".to_vec());
        assert!(a.stats().send_errors >= 1);
    })
    .await;
}

#[tokio::test]
async fn peers_from_another_ca_are_refused_both_ways() {
    with_deadline(async {
        let good_ca = new_ca();
        let other_ca = new_ca();
        let good_id = Identity::self_issued(good_ca.path(), "good").expect("good id");
        let foreign_id = Identity::self_issued(other_ca.path(), "foreign").expect("foreign id");
        let (good, mut good_rx) = bind(&good_id, NetConfig::default());
        let (foreign, mut foreign_rx) = bind(&foreign_id, NetConfig::default());
        let failed = |good: &Net, foreign: &Net| {
            good.stats().handshakes_failed + foreign.stats().handshakes_failed
        };

        foreign.send(good.local_addr(), true, b"let me in".to_vec());
        foreign.send(good.local_addr(), false, b"let me in".to_vec());
        assert_silent(&mut good_rx, Duration::from_secs(2)).await;
        wait_until("a failed handshake", || failed(&good, &foreign) >= 1).await;

        let before = failed(&good, &foreign);
        good.send(foreign.local_addr(), true, b"hello?".to_vec());
        good.send(foreign.local_addr(), false, b"hello?".to_vec());
        assert_silent(&mut foreign_rx, Duration::from_secs(2)).await;
        wait_until("another failed handshake", || {
            failed(&good, &foreign) > before
        })
        .await;
        assert_silent(&mut good_rx, Duration::from_millis(100)).await;
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_more_messages_than_the_stream_limit_arrives_whole() {
    with_deadline(async {
        let ca = new_ca();
        let a_id = Identity::self_issued(ca.path(), "a").expect("id");
        let b_id = Identity::self_issued(ca.path(), "b").expect("id");
        // The receiver hands messages up through a small queue, so its readers stall
        // and the sender runs out of stream credit many times over.
        let slow = NetConfig {
            incoming_capacity: 8,
            ..NetConfig::default()
        };
        let (a, _a_rx) = bind(&a_id, NetConfig::default());
        let (b, mut b_rx) = bind(&b_id, slow);
        let burst =
            (6 * crate::endpoint::MAX_UNI_STREAMS as usize).min(crate::endpoint::PEER_QUEUE - 1);
        assert!(burst > 2 * crate::endpoint::MAX_UNI_STREAMS as usize);
        for i in 0..burst as u32 {
            a.send(b.local_addr(), true, i.to_be_bytes().to_vec());
        }
        let mut seen = vec![false; burst];
        for _ in 0..burst {
            let msg = recv(&mut b_rx).await;
            let i = u32::from_be_bytes(msg.bytes[..4].try_into().expect("4 bytes"));
            assert!(!seen[i as usize], "message {i} arrived twice");
            seen[i as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "every message arrived");
        assert_eq!(a.stats().send_errors, 0, "nothing was dropped on the way");
        assert_eq!(
            b.stats().handshakes_ok,
            1,
            "one connection carried them all"
        );
    })
    .await;
}

#[tokio::test]
async fn oversized_stream_is_dropped_and_connection_survives() {
    with_deadline(async {
        let ca = new_ca();
        let a_id = Identity::self_issued(ca.path(), "a").expect("id");
        let b_id = Identity::self_issued(ca.path(), "b").expect("id");
        let small = NetConfig {
            max_frame: 1024,
            ..NetConfig::default()
        };
        let (a, _a_rx) = bind(&a_id, NetConfig::default());
        let (b, mut b_rx) = bind(&b_id, small);

        a.send(b.local_addr(), true, vec![7u8; 1025]);
        a.send(b.local_addr(), true, b"small".to_vec());
        check(&recv(&mut b_rx).await, "a", &a, true, b"small");
        wait_until("oversized stream counted", || {
            b.stats().oversized_streams == 1
        })
        .await;

        a.send(b.local_addr(), true, vec![1u8; 1024]);
        check(&recv(&mut b_rx).await, "a", &a, true, &[1u8; 1024]);
        assert_eq!(a.stats().handshakes_ok, 1, "the connection stayed up");
    })
    .await;
}

#[tokio::test]
async fn udp_garbage_does_not_break_the_endpoint() {
    with_deadline(async {
        let ca = new_ca();
        let (a, mut a_rx) = bind(
            &Identity::self_issued(ca.path(), "a").expect("id"),
            NetConfig::default(),
        );
        let (b, mut b_rx) = bind(
            &Identity::self_issued(ca.path(), "b").expect("id"),
            NetConfig::default(),
        );

        let socket = UdpSocket::bind(loopback()).expect("udp bind");
        let mut initial_like = vec![0xc0, 0, 0, 0, 1, 8];
        initial_like.extend(std::iter::repeat_n(0x5a, 1200));
        let mut noise = Vec::with_capacity(1400);
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..1400 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            noise.push(x as u8);
        }
        for packet in [
            &[][..],
            &[0u8][..],
            &[0xffu8; 1200][..],
            &initial_like[..],
            &noise[..],
            &noise[..40],
        ] {
            socket
                .send_to(packet, b.local_addr())
                .expect("send garbage");
        }

        a.send(b.local_addr(), true, b"still alive?".to_vec());
        check(&recv(&mut b_rx).await, "a", &a, true, b"still alive?");
        a.send(b.local_addr(), false, b"datagram too".to_vec());
        check(&recv(&mut b_rx).await, "a", &a, false, b"datagram too");

        // Garbage at an established connection's peer address port does not hurt either.
        for _ in 0..10 {
            socket
                .send_to(&noise, a.local_addr())
                .expect("send garbage");
        }
        b.send(a.local_addr(), true, b"back".to_vec());
        check(&recv(&mut a_rx).await, "b", &b, true, b"back");
        assert_eq!(a.stats().send_errors + b.stats().send_errors, 0);
    })
    .await;
}

fn paths(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    (
        dir.join("node.pem"),
        dir.join("node.key"),
        dir.join("ca.pem"),
    )
}

#[test]
fn init_ca_refuses_to_overwrite_and_keys_are_private() {
    let ca = new_ca();
    match init_ca(ca.path()) {
        Err(NetError::AlreadyExists(path)) => assert!(path.starts_with(ca.path())),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&ca.path().join("ca.key")), 0o600);
        let out = tempfile::tempdir().expect("tempdir");
        issue(ca.path(), "n1", out.path()).expect("issue");
        assert_eq!(mode(&out.path().join("node.key")), 0o600);
    }

    // A missing directory is created.
    let parent = tempfile::tempdir().expect("tempdir");
    init_ca(&parent.path().join("deeper/ca")).expect("init_ca in a new dir");
}

#[test]
fn issue_validates_names_and_refuses_to_overwrite() {
    let ca = new_ca();
    let out = tempfile::tempdir().expect("tempdir");
    let long = "x".repeat(64);
    for bad in ["", "has space", "slash/y", "ünïcode", long.as_str()] {
        match issue(ca.path(), bad, out.path()) {
            Err(err @ NetError::InvalidName(_)) => {
                assert!(err.to_string().contains("invalid node name"), "{err}")
            }
            other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
        }
        assert!(Identity::self_issued(ca.path(), bad).is_err());
    }
    assert!(std::fs::read_dir(out.path())
        .expect("read_dir")
        .next()
        .is_none());

    issue(ca.path(), &"y".repeat(63), out.path()).expect("63 characters is fine");
    assert!(matches!(
        issue(ca.path(), "again", out.path()),
        Err(NetError::AlreadyExists(_))
    ));
    // Issuing into the CA directory itself keeps ca.pem intact.
    let ca_pem = std::fs::read(ca.path().join("ca.pem")).expect("ca.pem");
    issue(ca.path(), "local", ca.path()).expect("issue into ca dir");
    assert_eq!(
        std::fs::read(ca.path().join("ca.pem")).expect("ca.pem"),
        ca_pem
    );
    let (cert, key, ca_copy) = paths(ca.path());
    assert_eq!(
        Identity::load(&cert, &key, &ca_copy).expect("load").name,
        "local"
    );

    // A CA dir without its key cannot issue.
    let empty = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        issue(empty.path(), "n", out.path()),
        Err(NetError::Io { .. })
    ));
}

#[test]
fn load_rejects_cert_from_another_ca_and_mismatched_key() {
    let ca1 = new_ca();
    let ca2 = new_ca();
    let out1 = tempfile::tempdir().expect("tempdir");
    let out2 = tempfile::tempdir().expect("tempdir");
    issue(ca1.path(), "one", out1.path()).expect("issue");
    issue(ca2.path(), "two", out2.path()).expect("issue");
    let (cert1, key1, _) = paths(out1.path());
    let (_, key2, ca2_pem) = paths(out2.path());

    match Identity::load(&cert1, &key1, &ca2_pem) {
        Err(err @ NetError::Cert(_)) => assert!(err.to_string().contains("cluster CA"), "{err}"),
        other => panic!("expected Cert error, got {other:?}"),
    }
    let ca1_pem = ca1.path().join("ca.pem");
    assert!(matches!(
        Identity::load(&cert1, &key2, &ca1_pem),
        Err(NetError::Cert(_))
    ));
    assert!(matches!(
        Identity::load(&key1, &key1, &ca1_pem),
        Err(NetError::Pem { .. })
    ));
    assert!(matches!(
        Identity::load(&out1.path().join("missing.pem"), &key1, &ca1_pem),
        Err(NetError::Io { .. })
    ));
    assert_eq!(
        Identity::load(&cert1, &key1, &ca1_pem).expect("load").name,
        "one"
    );
}

#[tokio::test]
async fn bind_and_send_failures_are_reported_not_panicked() {
    with_deadline(async {
        let ca = new_ca();
        let id = Identity::self_issued(ca.path(), "lonely").expect("id");
        let bad = NetConfig {
            max_frame: 0,
            ..NetConfig::default()
        };
        assert!(matches!(
            Net::bind(loopback(), &id, bad),
            Err(NetError::Config(_))
        ));

        let cfg = NetConfig {
            connect_timeout: Duration::from_millis(300),
            ..NetConfig::default()
        };
        let (net, _rx) = bind(&id, cfg);
        // Nobody listens there: the dial times out and both queued messages fail.
        let silent = UdpSocket::bind(loopback()).expect("udp bind");
        let nowhere = silent.local_addr().expect("addr");
        net.send(nowhere, true, b"x".to_vec());
        net.send(nowhere, false, b"y".to_vec());
        wait_until("both sends failed", || net.stats().send_errors == 2).await;
        assert_eq!(net.stats().handshakes_failed, 1);
        assert_eq!(net.max_datagram_size(nowhere), None);
    })
    .await;
}

#[test]
fn bind_outside_a_runtime_is_an_error() {
    let ca = new_ca();
    let id = Identity::self_issued(ca.path(), "n").expect("id");
    assert!(matches!(
        Net::bind(loopback(), &id, NetConfig::default()),
        Err(NetError::Bind(_))
    ));
}
