//! Mutual TLS and hostile input against real agents.

mod common;

use std::time::Duration;

use common::*;
use shoal_core::wire::{self, Msg};

#[test]
fn agent_with_a_foreign_ca_is_refused_and_learns_nothing() {
    let mut c = Cluster::start(2);
    // A second CA, and an agent using it that tries to join n1.
    let other_ca = c.path().join("other-ca");
    shoal_ok(&["ca", "init", "--out", other_ca.to_str().unwrap()]);
    let i = c.add_agent(Vec::new());
    let seed = c.agents[0].quic;
    c.agents[i].join = vec![seed];
    let good_ca = std::mem::replace(&mut c.ca, other_ca);
    c.spawn(i);
    c.ca = good_ca;

    // The handshake is refused: n1 counts it...
    wait_for(
        "n1 counts a failed handshake",
        Duration::from_secs(15),
        || (c.metric(0, "shoal_handshakes_total{result=\"failed\"}")? >= 1.0).then_some(()),
    );
    // ...and neither side ever lists the other.
    for _ in 0..20 {
        for j in 0..2 {
            assert!(
                c.status_of(j, "n3").is_none(),
                "intruder listed by n{}",
                j + 1
            );
        }
        let seen: Vec<String> = c
            .nodes(i)
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            seen,
            vec!["n3".to_string()],
            "the intruder learned about the cluster"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn certificate_name_must_match_the_agent_name() {
    let c = Cluster::new(0);
    let certs = c.path().join("n7");
    let out = shoal(&[
        "ca",
        "issue",
        "--ca",
        c.ca.to_str().unwrap(),
        "--name",
        "n7",
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shoal(&[
        "agent",
        "--name",
        "n8",
        "--listen",
        &free_udp().to_string(),
        "--api",
        &free_tcp().to_string(),
        "--data-dir",
        c.path().join("d").to_str().unwrap(),
        "--ca-dir",
        c.ca.to_str().unwrap(),
        "--cert",
        certs.join("node.pem").to_str().unwrap(),
        "--key",
        certs.join("node.key").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("issued to \"n7\"") && err.contains("\"n8\""),
        "{err}"
    );

    // A bad name is refused by `ca issue`.
    let out = shoal(&[
        "ca",
        "issue",
        "--ca",
        c.ca.to_str().unwrap(),
        "--name",
        "bad name",
        "--out",
        "/tmp/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn production_certificates_from_ca_issue_work() {
    let mut c = Cluster::start(1);
    let certs = c.path().join("n2-certs");
    shoal_ok(&[
        "ca",
        "issue",
        "--ca",
        c.ca.to_str().unwrap(),
        "--name",
        "n2",
        "--out",
        certs.to_str().unwrap(),
    ]);
    let i = c.add_agent(vec![
        "--cert".into(),
        certs.join("node.pem").to_str().unwrap().into(),
        "--key".into(),
        certs.join("node.key").to_str().unwrap().into(),
    ]);
    c.spawn(i);
    c.wait_all_alive(Duration::from_secs(20));
}

#[test]
fn garbage_to_the_quic_port_leaves_agents_working() {
    let c = Cluster::start(2);
    let target = c.agents[0].quic;

    // 1. Raw UDP garbage, including bytes that look like QUIC long headers.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..500usize {
        let len = 1 + (n * 37) % 1400;
        let mut pkt: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if n % 2 == 0 {
            pkt[0] = 0xc0 | (pkt[0] & 0x0f);
        }
        sock.send_to(&pkt, target).unwrap();
    }

    // 2. A peer with a valid certificate sending malformed shoal frames.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let id = shoal_net::Identity::self_issued(&c.ca, "prober").unwrap();
        let (net, _rx) =
            shoal_net::Net::bind(free_udp(), &id, shoal_net::NetConfig::default()).unwrap();
        let good = wire::encode(&Msg::SyncReq {
            digest: 0,
            heads: None,
        });
        let mut bad_version = good.clone();
        bad_version[2] = 200;
        let truncated = wire::encode(&Msg::Push { entries: vec![] });
        for reliable in [true, false] {
            net.send(target, reliable, b"not a shoal frame".to_vec());
            net.send(target, reliable, bad_version.clone());
            net.send(target, reliable, truncated[..truncated.len() - 1].to_vec());
        }
        net.close(Duration::from_secs(2)).await;
    });

    for reason in ["garbage", "version", "truncated"] {
        let series = format!("shoal_dropped_frames_total{{reason=\"{reason}\"}}");
        wait_for(
            &format!("{reason} frames counted"),
            Duration::from_secs(10),
            || (c.metric(0, &series)? >= 1.0).then_some(()),
        );
    }

    // The agents still work: replication and membership are intact.
    shoal_ok(&[
        "kv",
        "put",
        "after/garbage",
        "ok",
        "--api",
        &c.agents[0].url(),
    ]);
    let v = wait_for(
        "write replicated after garbage",
        Duration::from_secs(10),
        || c.kv_get(1, "after/garbage"),
    );
    assert_eq!(v, "ok");
    assert_eq!(c.status_of(1, "n1").as_deref(), Some("alive"));
}
