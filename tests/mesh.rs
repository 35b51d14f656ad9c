//! Real agents over loopback QUIC: membership, replication, failure detection,
//! graceful leave, durability and the CLI, observed from the outside.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn five_agents_mesh_replicate_detect_failure_and_rejoin() {
    let mut c = Cluster::start(5);

    // Every agent reports real host resources for every member.
    for i in 0..5 {
        let nodes = wait_for(
            "resources of all 5 published",
            Duration::from_secs(10),
            || {
                let n = c.nodes(i);
                (n.len() == 5 && n.iter().all(|v| v["resources"].is_object())).then_some(n)
            },
        );
        for n in &nodes {
            let r = &n["resources"];
            assert!(r["cpus"].as_u64().unwrap() >= 1, "{n}");
            assert!(r["memory_bytes"].as_u64().unwrap() > 0, "{n}");
            assert!(
                r["memory_free_bytes"].as_u64().unwrap() <= r["memory_bytes"].as_u64().unwrap()
            );
            assert!(r["disk_free_bytes"].as_u64().unwrap() > 0, "{n}");
            assert!(n["labels"].is_object() && n["addr"].is_string());
        }
    }

    // A write on one agent is readable on all of them.
    shoal_ok(&[
        "kv",
        "put",
        "app/color",
        "blue",
        "--api",
        &c.agents[0].url(),
    ]);
    for i in 0..5 {
        let v = wait_for("app/color replicated", Duration::from_secs(10), || {
            c.kv_get(i, "app/color")
        });
        assert_eq!(v, "blue", "agent {i}");
    }

    // kill -9 of one agent: the others see it down.
    c.kill9(4);
    for i in 0..4 {
        wait_for("n5 seen down", Duration::from_secs(30), || {
            (c.status_of(i, "n5").as_deref() == Some("down")).then_some(())
        });
    }

    // A write while n5 is away reaches it after it restarts with its data dir.
    shoal_ok(&["kv", "put", "app/size", "xl", "--api", &c.agents[1].url()]);
    c.spawn(4);
    c.wait_all_alive(Duration::from_secs(30));
    assert_eq!(
        c.kv_get(4, "app/color").as_deref(),
        Some("blue"),
        "kept its own data"
    );
    let v = wait_for("missed write caught up", Duration::from_secs(15), || {
        c.kv_get(4, "app/size")
    });
    assert_eq!(v, "xl");
}

#[test]
fn graceful_leave_is_seen_as_left_not_down() {
    let mut c = Cluster::start(3);
    assert!(c.terminate(2), "agent exits 0 on SIGTERM");
    for i in 0..2 {
        wait_for("n3 seen as left", Duration::from_secs(15), || {
            (c.status_of(i, "n3").as_deref() == Some("left")).then_some(())
        });
    }
    // And a left node that comes back is alive again.
    c.spawn(2);
    c.wait_all_alive(Duration::from_secs(20));
}

#[test]
fn acknowledged_writes_survive_a_restart_of_every_agent() {
    let mut c = Cluster::start(3);
    shoal_ok(&["kv", "put", "db/primary", "n2", "--api", &c.agents[1].url()]);
    shoal_ok(&["kv", "put", "db/gone", "x", "--api", &c.agents[1].url()]);
    shoal_ok(&["kv", "rm", "db/gone", "--api", &c.agents[2].url()]);
    wait_for(
        "write and delete replicated",
        Duration::from_secs(10),
        || {
            (0..3)
                .all(|i| {
                    c.kv_get(i, "db/primary").as_deref() == Some("n2")
                        && c.kv_get(i, "db/gone").is_none()
                })
                .then_some(())
        },
    );
    for i in 0..3 {
        c.kill9(i);
    }
    // Restart every agent with no peers reachable at first: each must answer from its own disk.
    c.spawn(0);
    assert_eq!(c.kv_get(0, "db/primary").as_deref(), Some("n2"));
    assert_eq!(c.kv_get(0, "db/gone"), None, "a delete is durable too");
    c.spawn(1);
    c.spawn(2);
    c.wait_all_alive(Duration::from_secs(30));
    for i in 0..3 {
        assert_eq!(c.kv_get(i, "db/primary").as_deref(), Some("n2"));
    }
}

#[test]
fn kv_cli_contract() {
    let c = Cluster::start(2);
    let api = c.agents[0].url();
    let api2 = c.agents[1].url();

    // get of a missing key exits 1 with a clear message.
    let out = shoal(&["kv", "get", "no/such", "--api", &api]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key not found: no/such"));

    shoal_ok(&["kv", "put", "cfg/a", "1", "--api", &api]);
    shoal_ok(&["kv", "put", "cfg/b", "two words", "--api", &api]);
    shoal_ok(&["kv", "put", "other", "x", "--api", &api]);
    let ls: Vec<serde_json::Value> =
        wait_for("ls on the other agent", Duration::from_secs(10), || {
            let out = shoal(&["kv", "ls", "cfg/", "-o", "json", "--api", &api2]);
            let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            (v.len() == 2).then_some(v)
        });
    assert_eq!(ls[0]["key"], "cfg/a");
    assert_eq!(ls[1]["value"], "two words");
    assert_eq!(ls[0]["writer"], "n1");
    let table = shoal_ok(&["kv", "ls", "--api", &api]);
    assert!(table.starts_with("KEY"), "{table}");
    assert!(table.contains("other"));

    // rm of a missing key fails loudly; rm of a present one succeeds.
    let out = shoal(&["kv", "rm", "no/such", "--api", &api]);
    assert_eq!(out.status.code(), Some(1));
    shoal_ok(&["kv", "rm", "cfg/a", "--api", &api]);
    assert_eq!(c.kv_get(0, "cfg/a"), None);

    // Node-owned keys cannot be forged through the API.
    let out = shoal(&["kv", "put", "node/n2/info", "evil", "--api", &api]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("owned by their node"));

    // SHOAL_API picks the agent.
    let out = std::process::Command::new(SHOAL)
        .args(["kv", "get", "other"])
        .env("SHOAL_API", &api2)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "x");

    // Table output of nodes has a header and one row per member.
    let t = shoal_ok(&["nodes", "--api", &api]);
    assert!(t.starts_with("NAME"), "{t}");
    assert_eq!(t.lines().count(), 3, "{t}");
}

#[test]
fn unreachable_agent_and_bad_config_are_clear_errors() {
    let dead = free_tcp();
    let out = shoal(&["nodes", "--api", &format!("http://{dead}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the shoal agent"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "name = \"n1\"\nlisten = \"127.0.0.1:1\"\nfanout = 3\n",
    )
    .unwrap();
    let out = shoal(&["agent", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fanout"), "the unknown field is named: {err}");

    let out = shoal(&["agent", "--name", "n1", "--listen", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("data_dir"));
}

#[test]
fn demo_starts_a_local_mesh() {
    let base = free_demo_base(3);
    let dir = tempfile::tempdir().unwrap();
    let out = shoal(&[
        "demo",
        "--nodes",
        "3",
        "--base-port",
        &base.to_string(),
        "--dir",
        dir.path().to_str().unwrap(),
        "--once",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 agents up"), "{stdout}");
    assert_eq!(stdout.matches(" alive ").count(), 3, "{stdout}");
    // The example app ran, and stopped with the demo.
    for line in [
        "db: 1 of 1 replicas healthy",
        "web: 3 of 3 replicas healthy",
        "worker: 2 of 2 replicas healthy",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    assert!(
        common::workload_pids(dir.path()).is_empty(),
        "the demo leaves no workload running"
    );
}

#[test]
fn workload_http_serves_root_health_and_burn_and_stops_on_sigterm() {
    let addr = free_tcp();
    let mut child = std::process::Command::new(SHOAL)
        .args(["workload", "http", "--port", &addr.port().to_string()])
        .env("SHOAL_SERVICE", "web")
        .env("SHOAL_SLOT", "2")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let root = wait_for("workload answers", Duration::from_secs(10), || {
        http_get(addr, "/")
    });
    assert!(root.starts_with("hello from web slot 2"), "{root}");
    assert_eq!(http_get(addr, "/healthz").as_deref(), Some("ok\n"));
    let burned = http_get(addr, "/burn?ms=20").unwrap();
    assert!(burned.starts_with("burned 20 ms"), "{burned}");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let st = wait_for("workload exits on SIGTERM", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    assert!(st.success());
}

/// The demo stops everything on SIGHUP (a closed terminal) as on Ctrl-C: every
/// workload is stopped and its temporary directory removed. A busy port is one
/// line, before anything is started.
#[test]
fn demo_cleans_up_on_sighup_and_refuses_a_busy_port() {
    use std::io::{BufRead, BufReader};
    let base = free_demo_base(3);
    let mut child = std::process::Command::new(SHOAL)
        .args(["demo", "--nodes", "3", "--base-port", &base.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut dir = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("CA and data in ").nth(1) {
            dir = Some(std::path::PathBuf::from(rest.trim_end_matches("):")));
        }
        if line.contains("Ctrl-C stops every agent") {
            break;
        }
    }
    let dir = dir.expect("the demo names its directory");
    assert!(!common::workload_pids(&dir).is_empty(), "the app runs");
    let pids = common::workload_pids(&dir);
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    let st = wait_for("the demo to exit", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    });
    assert!(st.success(), "{st}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    for pid in pids {
        assert!(!pid_alive(pid), "workload {pid} still runs");
    }

    // A port in the range is taken: one line, nothing started.
    let busy = std::net::UdpSocket::bind(("127.0.0.1", base)).unwrap();
    let out = shoal(&[
        "demo",
        "--nodes",
        "3",
        "--base-port",
        &base.to_string(),
        "--once",
    ]);
    drop(busy);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("port {base}")) && err.contains("--base-port"),
        "{err}"
    );
}
