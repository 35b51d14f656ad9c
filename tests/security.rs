//! Mutual TLS and hostile input against real agents.

mod common;

use std::process::Command;
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

/// The three attacks of the safety issue, replayed: a cross-site POST, a DNS
/// rebinding `Host`, and a "simple" request without the CLI's header. None of
/// them deploys anything.
#[test]
fn the_api_refuses_what_a_web_page_can_forge() {
    let c = Cluster::start(1);
    let api = c.agents[0].api;
    let own = api.to_string();
    let marker = c.path().join("pwned");
    let spec = format!(
        "name = \"pwn\"\ndriver = \"process\"\ncommand = [\"touch\", \"{}\"]\n",
        marker.display()
    );
    let deploy = "/v1/services?file=pwn.toml";
    // CSRF: a form-like POST from another origin.
    let (code, body) = http_raw(
        api,
        "POST",
        deploy,
        &[
            ("Host", &own),
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain"),
        ],
        &spec,
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cross-origin"), "{body}");
    // DNS rebinding: the page's own origin, but a name that now resolves here.
    let rebind = format!("rebind.evil.example:{}", api.port());
    let (code, body) = http_raw(
        api,
        "POST",
        deploy,
        &[
            ("Host", &rebind),
            ("Origin", &format!("http://{rebind}")),
            ("Content-Type", "text/plain"),
        ],
        &spec,
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("rebind.evil.example"), "{body}");
    // Reads through a rebound name are refused too (they would leak the cluster).
    let (code, _) = http_raw(api, "GET", "/v1/nodes", &[("Host", &rebind)], "");
    assert_eq!(code, 403);
    // A simple request (no preflight) without the CLI's header.
    let (code, body) = http_raw(
        api,
        "POST",
        deploy,
        &[("Host", &own), ("Content-Type", "text/plain")],
        &spec,
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("x-shoal-request"), "{body}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        c.services(0).is_empty(),
        "a forged request deployed a service"
    );
    assert!(!marker.exists(), "a forged request ran a command");
    // Plain reads with an IP Host still work, and the CLI can deploy.
    let (code, _) = http_raw(api, "GET", "/v1/nodes", &[("Host", &own)], "");
    assert_eq!(code, 200);
    let path = c.write_spec("ok.toml", &spec.replace("pwn", "ok"));
    shoal_ok(&["deploy", &path, "--api", &c.agents[0].url()]);
}

/// With `--api-token-file`, nobody without the token drives the API: not the CLI
/// without it, and not another local user (who cannot read the mode-600 file).
#[test]
fn a_token_keeps_other_local_users_out() {
    let mut c = Cluster::new(1);
    let token = c.path().join("api.token");
    std::fs::write(&token, "s3cr3t-t0ken-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token_arg = token.to_str().unwrap().to_string();
    c.agents[0].extra = vec!["--api-token-file".into(), token_arg.clone()];
    let api = c.agents[0].url();
    c.spawn_detached(0);
    wait_for("the API up", Duration::from_secs(15), || {
        shoal(&["nodes", "--api", &api, "--token-file", &token_arg])
            .status
            .success()
            .then_some(())
    });

    let out = shoal(&["kv", "put", "app/x", "1", "--api", &api]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires an API token"), "{err}");
    let out = Command::new(SHOAL)
        .args(["kv", "put", "app/x", "1", "--api", &api])
        .env("SHOAL_TOKEN", "wrong-token-0123456789")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong API token"));
    shoal_ok(&[
        "kv",
        "put",
        "app/x",
        "1",
        "--api",
        &api,
        "--token-file",
        &token_arg,
    ]);
    let out = Command::new(SHOAL)
        .args(["kv", "get", "app/x", "--api", &api])
        .env("SHOAL_TOKEN", "s3cr3t-t0ken-0123456789")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // Another local user: cannot read the token, and is refused without it.
    let nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(args)
            .output()
            .expect("runuser")
    };
    assert!(!nobody(&["cat", &token_arg]).status.success());
    let out = nobody(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "x-shoal-request: 1",
        "--data",
        "evil",
        &format!("{api}/v1/kv/app/x"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // The dashboard page itself loads (it asks for the token in the browser).
    let (code, _) = http_raw(
        c.agents[0].api,
        "GET",
        "/",
        &[("Host", &c.agents[0].api.to_string())],
        "",
    );
    assert_eq!(code, 200);

    // A token file other users can read is refused at start.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let i = c.add_agent(vec!["--api-token-file".into(), token_arg]);
    c.spawn_detached(i);
    assert_eq!(c.wait_exit(i, Duration::from_secs(15)), Some(1));
    assert!(
        c.agents[i].log().contains("chmod 600"),
        "{}",
        c.agents[i].log()
    );
}

/// One name, one live identity: a second agent started with a live node's name
/// (self-issued from ca.key) is refused at join and exits with one line; nothing of
/// the real node changes.
#[test]
fn a_second_agent_with_a_live_nodes_name_is_refused() {
    let mut c = Cluster::new(2);
    c.agents[0].extra = vec!["--label".into(), "zone=real".into()];
    c.spawn(0);
    c.spawn(1);
    c.wait_all_alive(Duration::from_secs(20));
    let real = c.agents[0].quic;
    // The impostor: n1's name, another address and data dir, joining through n2.
    let i = c.add_agent(Vec::new());
    c.agents[i].name = "n1".into();
    c.agents[i].join = vec![c.agents[1].quic];
    c.spawn_detached(i);
    let code = c.wait_exit(i, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{}", c.agents[i].log());
    let log = c.agents[i].log();
    let want = format!("name n1 is held by a live node at {real}");
    assert!(
        log.lines().last().is_some_and(|l| l.contains(&want)),
        "the last line names the holder: {log}"
    );
    assert!(
        c.agents[1]
            .log()
            .contains("refused a second agent named n1"),
        "the seed logs the refusal: {}",
        c.agents[1].log()
    );
    // Nothing of the real n1 changed: one row, its address, its labels, alive.
    std::thread::sleep(Duration::from_secs(3));
    for j in 0..2 {
        let rows: Vec<serde_json::Value> = c
            .nodes(j)
            .into_iter()
            .filter(|n| n["name"] == "n1")
            .collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["addr"], real.to_string());
        assert_eq!(rows[0]["status"], "alive");
        assert_eq!(rows[0]["labels"]["zone"], "real");
    }
}

/// A real restart on a new address is accepted within seconds: the old identity
/// no longer answers.
#[test]
fn a_node_restarted_on_a_new_address_is_accepted() {
    let mut c = Cluster::start(3);
    c.kill9(2);
    c.agents[2].quic = free_udp();
    let moved = c.agents[2].quic.to_string();
    c.spawn(2);
    wait_for(
        "n1 and n2 see n3 alive at its new address",
        Duration::from_secs(30),
        || {
            (0..2)
                .all(|j| {
                    c.nodes(j)
                        .iter()
                        .any(|n| n["name"] == "n3" && n["addr"] == moved && n["status"] == "alive")
                })
                .then_some(())
        },
    );
}

/// Join failures are loud: an unreachable seed and a seed of another CA are named,
/// with the reason, in the log and in `shoal nodes`.
#[test]
fn join_failures_are_named_with_their_reason() {
    let mut c = Cluster::start(1);
    // A seed where nothing listens.
    let dead = free_udp();
    let i = c.add_agent(Vec::new());
    c.agents[i].join = vec![dead];
    c.spawn(i);
    let url = c.agents[i].url();
    let table = wait_for("not joined in shoal nodes", Duration::from_secs(30), || {
        let t = shoal_ok(&["nodes", "--api", &url]);
        t.contains("not joined").then_some(t)
    });
    assert!(table.contains(&dead.to_string()), "{table}");
    assert!(table.contains("no answer"), "{table}");
    wait_for("the warning in the log", Duration::from_secs(10), || {
        c.agents[i]
            .log()
            .contains(&format!("cannot join through seed {dead}"))
            .then_some(())
    });

    // A seed whose certificate comes from another CA.
    let other_ca = c.path().join("other-ca");
    shoal_ok(&["ca", "init", "--out", other_ca.to_str().unwrap()]);
    let j = c.add_agent(Vec::new());
    let good_ca = std::mem::replace(&mut c.ca, other_ca);
    c.spawn(j);
    c.ca = good_ca;
    wait_for(
        "the intruder names the certificate problem",
        Duration::from_secs(30),
        || {
            c.agents[j]
                .log()
                .contains("certificate is not from this cluster's CA")
                .then_some(())
        },
    );
    wait_for(
        "the seed logs the refused handshake",
        Duration::from_secs(10),
        || {
            c.agents[0]
                .log()
                .contains("refused a QUIC handshake")
                .then_some(())
        },
    );
    // Logs written to a file carry no terminal colour codes.
    assert!(!c.agents[0].log().contains('\u{1b}'));
}

/// User kv is its own namespace: internal records cannot be written, read or deleted
/// through it, `kv ls` shows only user keys, and output never passes control
/// characters to the terminal or panics on long values.
#[test]
fn user_kv_cannot_touch_internal_records() {
    let c = Cluster::start(1);
    let api = c.agents[0].url();
    let spec = "name = \"keep\"\ndriver = \"process\"\ncommand = [\"sleep\", \"300\"]\n";
    let out = c.deploy_wait(0, "keep.toml", spec);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        vec!["kv", "put", "service/keep", "garbage"],
        vec!["kv", "get", "service/keep"],
        vec!["kv", "rm", "service/keep"],
        vec!["kv", "put", "alloc/keep/0", "x"],
        vec!["kv", "put", "plugin/scheduler/default", "x"],
    ] {
        let mut a = args.clone();
        a.extend(["--api", &api]);
        let out = shoal(&a);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("internal record"), "{args:?}: {err}");
    }
    let err =
        String::from_utf8_lossy(&shoal(&["kv", "put", "service/keep", "x", "--api", &api]).stderr)
            .into_owned();
    assert!(err.contains("shoal deploy"), "{err}");
    let svc = &c.services(0)[0];
    assert_eq!(
        (svc["name"].as_str(), svc["healthy"].as_u64()),
        (Some("keep"), Some(1))
    );

    shoal_ok(&[
        "kv",
        "put",
        "app/term",
        "\u{1b}[2J\u{7}gotcha",
        "--api",
        &api,
    ]);
    let long = "v".repeat(70_000);
    shoal_ok(&["kv", "put", "app/long", &long, "--api", &api]);
    let ls = shoal_ok(&["kv", "ls", "--api", &api]);
    assert!(!ls.contains("service/"), "internal records in kv ls: {ls}");
    assert!(ls.contains("app/long") && ls.contains(&long));
    assert!(
        !ls.contains('\u{1b}') && ls.contains("\\x1b[2J\\x07gotcha"),
        "{ls}"
    );
    let get = shoal_ok(&["kv", "get", "app/term", "--api", &api]);
    assert!(!get.contains('\u{1b}'), "{get:?}");
    let internal = shoal_ok(&["kv", "ls", "--internal", "--api", &api]);
    assert!(internal.contains("service/keep"), "{internal}");
    assert!(!internal.contains("app/long"), "{internal}");
}

/// A malformed JSON body is a `400` whose JSON error names what was wrong and
/// what the route expects; nothing changes.
#[test]
fn malformed_request_bodies_are_refused_by_name() {
    let c = Cluster::start(1);
    let api = c.agents[0].api;
    let own = api.to_string();
    let headers = [
        ("Host", own.as_str()),
        ("x-shoal-request", "1"),
        ("Content-Type", "application/json"),
    ];
    for (path, body, says) in [
        (
            "/v1/services/web/scale",
            r#"{"replica": 3}"#,
            "unknown field `replica`",
        ),
        (
            "/v1/services/web/scale",
            "",
            r#"expected JSON like {"replicas": 3}"#,
        ),
        (
            "/v1/services/web/scale",
            r#"{"replicas": "3"}"#,
            "invalid type",
        ),
        (
            "/v1/services/web/rollback",
            r#"{"to": -2}"#,
            "invalid value",
        ),
        (
            "/v1/pulls",
            r#"{"reference": "Not A Name"}"#,
            "request body:",
        ),
        (
            "/v1/images",
            r#"{"reference": "web:1", "to": "zone"}"#,
            "LABEL=VALUE",
        ),
    ] {
        let (code, answer) = http_raw(api, "POST", path, &headers, body);
        assert_eq!(code, 400, "{path} {body}: {answer}");
        let err: serde_json::Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{path}: the answer is not JSON ({e}): {answer}"));
        let msg = err["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{path} {body}: {msg}");
    }
    assert!(c.services(0).is_empty());
}
