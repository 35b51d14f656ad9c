//! Black-box orchestration with the docker driver against the real Docker Engine:
//! agents deploy a locally built `FROM scratch` image (no registry is reachable),
//! apply resource limits, adopt containers after a restart and remove them on `rm`.
//! These tests need Docker Engine and fail loudly without it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{http_get, shoal, wait_for, Cluster};
use serde_json::Value;
use shoal_runtime::testutil::ensure_test_image;
use shoal_runtime::DockerDriver;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn engine() -> bollard::Docker {
    bollard::Docker::connect_with_unix_defaults()
        .expect("docker socket")
        .negotiate_version()
        .await
        .expect("docker API version")
}

/// Containers labelled with any of `nodes`.
/// The locally built test image; fails loudly without Docker Engine.
fn test_image() -> &'static str {
    runtime().block_on(async {
        let d = DockerDriver::connect("shoal-docker-test").await.unwrap_or_else(|e| {
            panic!("this test needs Docker Engine on this machine (/var/run/docker.sock or $DOCKER_HOST): {e}")
        });
        ensure_test_image(&d)
            .await
            .unwrap_or_else(|e| panic!("cannot build the test image: {e}"))
    })
}

fn containers_of(nodes: &[String]) -> Vec<String> {
    runtime().block_on(async {
        let docker = engine().await;
        let mut out = Vec::new();
        for n in nodes {
            let filters = std::collections::HashMap::from([(
                "label".to_string(),
                vec![format!("shoal.node={n}")],
            )]);
            let opts = bollard::query_parameters::ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            };
            for c in docker.list_containers(Some(opts)).await.expect("list") {
                out.extend(c.id);
            }
        }
        out
    })
}

/// Removes every container of the test's nodes, pass or fail.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = containers_of(&self.0);
        runtime().block_on(async {
            let docker = engine().await;
            for id in ids {
                let opts = bollard::query_parameters::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                };
                let _ = docker.remove_container(&id, Some(opts)).await;
            }
        });
    }
}

#[test]
fn docker_services_run_with_limits_are_adopted_and_removed() {
    let image = test_image();
    let prefix = format!("dk{}-", std::process::id());
    let mut c = Cluster::with(3, &prefix, true);
    let names: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
    let _cleanup = Cleanup(names.clone());
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_all_alive(Duration::from_secs(20));

    let spec = format!(
        r#"name = "api"
driver = "docker"
image = "{image}"
# Not the host's docker0 bridge, which some machines lack.
network = "host"
replicas = 2
reschedule_after = "5m"

[resources]
cpu = 0.5
memory = "64Mi"

[[ports]]
name = "http"
container_port = 8080

[env]
GREETING = "hi"

[health]
http = "/healthz"
interval = "500ms"

[scheduler]
strategy = "spread"
"#
    );
    let out = c.deploy_wait(0, "api.toml", &spec);
    assert!(
        out.status.success(),
        "deploy --wait: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = c.ps(0, "api");
    assert_eq!(rows.len(), 2, "{rows:?}");
    let nodes: BTreeSet<&str> = rows.iter().map(|r| r["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "spread over nodes: {rows:?}");
    for r in &rows {
        assert_eq!(r["healthy"], true, "{r}");
        let ep: std::net::SocketAddr = r["endpoint"].as_str().unwrap().parse().unwrap();
        assert!(http_get(ep, "/healthz").is_some(), "port answers: {r}");
    }

    // The engine applied the limits and labels.
    let handles: Vec<String> = rows
        .iter()
        .map(|r| r["handle"].as_str().unwrap().to_string())
        .collect();
    runtime().block_on(async {
        let docker = engine().await;
        for (h, r) in handles.iter().zip(&rows) {
            let info = docker.inspect_container(h, None).await.expect("inspect");
            let host = info.host_config.expect("host config");
            assert_eq!(host.nano_cpus, Some(500_000_000), "half a core");
            assert_eq!(host.memory, Some(64 << 20));
            let labels = info.config.and_then(|c| c.labels).expect("labels");
            assert_eq!(
                labels.get("shoal.node").map(String::as_str),
                r["node"].as_str()
            );
            assert_eq!(labels.get("shoal.service").map(String::as_str), Some("api"));
        }
    });

    // Every agent tells the scheduler which images its engine holds.
    wait_for(
        "images in the scheduler's snapshot",
        Duration::from_secs(30),
        || {
            let out = shoal(&["nodes", "--snapshot", "--api", &c.agents[1].url()]);
            let snap: Value = serde_json::from_slice(&out.stdout).ok()?;
            snap["nodes"]
                .as_array()?
                .iter()
                .all(|n| {
                    n["images"]
                        .as_array()
                        .is_some_and(|i| i.iter().any(|x| x == image))
                })
                .then_some(())
        },
    );

    // CPU and memory come from the engine's stats (sampled every 5 s).
    wait_for(
        "container metrics reported",
        Duration::from_secs(30),
        || {
            c.ps(0, "api")
                .iter()
                .all(|r| r["memory_bytes"].as_u64().is_some_and(|m| m > 0))
                .then_some(())
        },
    );

    // Logs come from the engine, through any agent.
    let out = shoal(&["logs", "api", "--slot", "0", "--api", &c.agents[2].url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("shoal-test-http listening"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Restart the agent of a replica that agent 0 does not run: the container is
    // adopted (same id), not restarted.
    let row: &Value = rows
        .iter()
        .find(|r| r["node"] != c.agents[0].name.as_str())
        .unwrap();
    let node = row["node"].as_str().unwrap().to_string();
    let handle = row["handle"].as_str().unwrap().to_string();
    let i = c.agents.iter().position(|a| a.name == node).unwrap();
    assert!(c.terminate(i));
    c.spawn(i);
    wait_for(
        "container adopted after restart",
        Duration::from_secs(30),
        || {
            c.ps(0, "api").into_iter().find(|r| {
                r["node"] == node.as_str()
                    && r["handle"].as_str() == Some(handle.as_str())
                    && r["healthy"] == true
                    && r["restarts"] == 0
            })
        },
    );

    // rm stops and removes every container.
    let out = shoal(&["rm", "api", "--api", &c.agents[1].url()]);
    assert!(out.status.success());
    wait_for("containers removed", Duration::from_secs(40), || {
        containers_of(&names).is_empty().then_some(())
    });
    wait_for("service gone", Duration::from_secs(20), || {
        c.services(0).is_empty().then_some(())
    });
}

/// `network = "host"` (engines without a bridge, edge boxes): no port mapping; each
/// replica listens on a host port its agent picked, which is its endpoint and its
/// health-check target.
#[test]
fn docker_services_with_host_networking_serve_on_picked_ports() {
    let image = test_image();
    let prefix = format!("hn{}-", std::process::id());
    let mut c = Cluster::with(2, &prefix, true);
    let names: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
    let _cleanup = Cleanup(names);
    for i in 0..2 {
        c.spawn(i);
    }
    c.wait_all_alive(Duration::from_secs(20));
    let spec = format!(
        r#"name = "edge"
driver = "docker"
image = "{image}"
network = "host"
replicas = 3
stop_delay = "0s"

[[ports]]
name = "http"
container_port = 8080

[health]
http = "/healthz"
interval = "500ms"
"#
    );
    let out = c.deploy_wait(0, "edge.toml", &spec);
    assert!(
        out.status.success(),
        "deploy --wait: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = c.ps(1, "edge");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut ports = BTreeSet::new();
    for r in &rows {
        assert_eq!(r["healthy"], true, "{r}");
        let ep: std::net::SocketAddr = r["endpoint"].as_str().unwrap().parse().unwrap();
        assert_ne!(ep.port(), 8080, "a picked host port: {r}");
        assert!(ports.insert(ep.port()), "one port per replica: {rows:?}");
        assert!(http_get(ep, "/healthz").is_some(), "the port answers: {r}");
    }
    shoal(&["rm", "edge", "--api", &c.agents[0].url()]);
}

/// `--docker unix:///PATH` names an engine: one that does not answer fails the
/// start with one line naming the flag, instead of docker replicas failing later.
#[test]
fn a_named_engine_that_does_not_answer_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    common::shoal_ok(&["ca", "init", "--out", ca.to_str().unwrap()]);
    let mut child = std::process::Command::new(common::SHOAL)
        .args(["agent", "--name", "nodock"])
        .args(["--listen", &common::free_udp().to_string()])
        .args(["--api", &common::free_tcp().to_string()])
        .args([
            "--dns",
            "off",
            "--docker",
            "unix:///nonexistent/docker.sock",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--ca-dir")
        .arg(&ca)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the agent kept running without its named engine");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("--docker unix:///nonexistent/docker.sock"),
        "names the flag: {err}"
    );
}
