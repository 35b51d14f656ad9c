//! The docker driver against the real Docker Engine on this machine.
//!
//! These tests need Docker Engine at its default socket and fail (never skip) without
//! it. No registry is used: the test image is built locally by
//! `shoal_runtime::testutil::ensure_test_image` (see its docs for what that needs).
//! Every test uses its own node name, so concurrent tests (and runs) never see each
//! other's containers; a guard removes the node's containers even if a test fails.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::{free_port, http_get, wait_for};
use shoal_runtime::testutil::{ensure_test_image, TEST_IMAGE};
use shoal_runtime::{
    labels, DockerDriver, DockerOptions, Driver, DriverError, LogQuery, PortSpec, Protocol,
    RunState, WorkloadKind, WorkloadSpec,
};

const WAIT: Duration = Duration::from_secs(15);

fn node(test: &str) -> String {
    format!("test-{}-{test}", std::process::id())
}

/// Connects for `node`, publishing on loopback only; fails loudly without Docker.
async fn connect(node: &str) -> DockerDriver {
    let mut opts = DockerOptions::new(node);
    opts.publish_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    match DockerDriver::connect_with(opts).await {
        Ok(d) => d,
        Err(e) => panic!(
            "these tests need Docker Engine on this machine (socket /var/run/docker.sock \
             or $DOCKER_HOST): {e}"
        ),
    }
}

/// Connects and makes sure the locally built test image exists.
async fn setup(node: &str) -> (DockerDriver, Cleanup) {
    let d = connect(node).await;
    ensure_test_image(&d)
        .await
        .unwrap_or_else(|e| panic!("cannot build the test image {TEST_IMAGE}: {e}"));
    (d, Cleanup(node.to_string()))
}

/// Removes every container of a node when dropped, pass or fail.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let node = self.0.clone();
        // Drop cannot await; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let d = connect(&node).await;
                for w in d.list().await.unwrap_or_default() {
                    let _ = d.stop(&w.alloc_id, Duration::ZERO).await;
                }
            });
        })
        .join();
    }
}

fn spec(alloc: &str, image: &str) -> WorkloadSpec {
    WorkloadSpec {
        service: "web".into(),
        slot: 3,
        version: 7,
        alloc_id: alloc.into(),
        // Host networking: these tests must not depend on the host's `docker0`
        // bridge, which some machines lack; bridge networking is tested on an
        // engine with a bridge of its own (`a_fixed_host_port_is_published_as_asked`).
        kind: WorkloadKind::Docker {
            image: image.into(),
            host_network: true,
        },
        env: BTreeMap::new(),
        ports: vec![PortSpec {
            name: "http".into(),
            container_port: 8080,
            host_port: None,
            protocol: Protocol::Tcp,
        }],
        cpu_millis: None,
        memory_bytes: None,
        labels: BTreeMap::new(),
    }
}

async fn wait_healthy(port: u16) {
    wait_for(&format!("GET /healthz on port {port}"), WAIT, || async {
        http_get(port, "/healthz")
            .await
            .filter(|(code, body)| *code == 200 && body == "ok")
    })
    .await;
}

#[tokio::test]
async fn a_container_serves_http_with_its_limits_labels_and_logs() {
    let n = node("main");
    let (d, _cleanup) = setup(&n).await;
    let mut s = spec("main-a1", TEST_IMAGE);
    s.env.insert("MESSAGE".into(), "hi from the test".into());
    s.cpu_millis = Some(250);
    s.memory_bytes = Some(64 << 20);
    s.labels.insert("team".into(), "infra".into());

    let st = d.start(&s).await.expect("start");
    assert_eq!(st.state, RunState::Running);
    assert_eq!(
        (
            st.alloc_id.as_str(),
            st.service.as_str(),
            st.slot,
            st.version
        ),
        ("main-a1", "web", 3, 7)
    );
    assert!(st.started_at_ms > 0);
    let [(name, port)] = st.ports.as_slice() else {
        panic!("one port expected: {:?}", st.ports)
    };
    assert_eq!(name, "http");
    let port = *port;
    assert_ne!(port, 0);

    wait_healthy(port).await;
    assert_eq!(
        http_get(port, "/").await,
        Some((200, "hi from the test".to_string()))
    );
    assert_eq!(
        http_get(port, "/env/SHOAL_ALLOC_ID").await,
        Some((200, "main-a1".to_string()))
    );
    // Host networking: the workload is told the host port it must listen on.
    assert_eq!(
        http_get(port, "/env/PORT_HTTP").await,
        Some((200, port.to_string()))
    );

    // What the engine actually applied.
    let docker = bollard::Docker::connect_with_unix_defaults()
        .expect("socket")
        .negotiate_version()
        .await
        .expect("version");
    let info = docker
        .inspect_container(&st.handle, None)
        .await
        .expect("inspect");
    let host = info.host_config.expect("host config");
    assert_eq!(host.nano_cpus, Some(250_000_000), "a quarter core");
    assert_eq!(host.memory, Some(64 << 20));
    let lbl = info.config.and_then(|c| c.labels).expect("labels");
    for (k, v) in [
        (labels::MANAGED, "true"),
        (labels::NODE, n.as_str()),
        (labels::ALLOC, "main-a1"),
        (labels::SERVICE, "web"),
        (labels::SLOT, "3"),
        (labels::VERSION, "7"),
        ("team", "infra"),
    ] {
        assert_eq!(lbl.get(k).map(String::as_str), Some(v), "label {k}");
    }
    assert!(
        info.name.unwrap_or_default().starts_with("/shoal-web-3-"),
        "container name"
    );

    // Another node's agent on the same engine neither sees nor touches it.
    let other = connect(&node("other")).await;
    assert!(other
        .list()
        .await
        .expect("list")
        .iter()
        .all(|w| w.alloc_id != "main-a1"));
    assert!(other.status("main-a1").await.expect("status").is_none());
    other
        .stop("main-a1", Duration::ZERO)
        .await
        .expect("stop of nothing");
    assert_eq!(
        http_get(port, "/healthz").await,
        Some((200, "ok".to_string()))
    );

    // A restarted agent adopts it: same container, not restarted.
    let adopted = connect(&n).await;
    let listed = adopted.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].handle, st.handle);
    assert_eq!(listed[0].ports, st.ports);
    assert_eq!(listed[0].started_at_ms, st.started_at_ms);
    let again = adopted.start(&s).await.expect("start is idempotent");
    assert_eq!(again.handle, st.handle);

    let usage = adopted
        .usage("main-a1")
        .await
        .expect("usage")
        .expect("running");
    assert!(usage.memory_bytes > 0, "{usage:?}");
    assert!(
        usage.cpu_percent.is_finite() && usage.cpu_percent >= 0.0,
        "{usage:?}"
    );
    let usage = adopted
        .usage("main-a1")
        .await
        .expect("usage")
        .expect("running");
    assert!(
        usage.cpu_percent.is_finite() && usage.cpu_percent >= 0.0,
        "{usage:?}"
    );

    let logs = String::from_utf8(
        adopted
            .logs("main-a1", LogQuery::all())
            .await
            .expect("logs")
            .bytes,
    )
    .expect("utf8");
    assert!(
        logs.contains(&format!("listening on port {port}")),
        "stdout: {logs}"
    );
    assert!(logs.contains("GET /healthz -> 200 OK"), "stderr: {logs}");
    let last = adopted
        .logs("main-a1", LogQuery::tail(1))
        .await
        .expect("tail")
        .bytes;
    assert_eq!(last.iter().filter(|b| **b == b'\n').count(), 1, "{last:?}");

    adopted
        .stop("main-a1", Duration::from_secs(5))
        .await
        .expect("stop");
    assert!(adopted.status("main-a1").await.expect("status").is_none());
    let gone = docker.inspect_container(&st.handle, None).await;
    assert!(gone.is_err(), "the container was removed");
    adopted
        .stop("main-a1", Duration::ZERO)
        .await
        .expect("stopping again is fine");
}

#[tokio::test]
async fn a_missing_image_is_a_clear_error_and_nothing_is_created() {
    let n = node("missing");
    let (d, _cleanup) = setup(&n).await;
    let err = d
        .start(&spec("missing-a1", "shoal-no-such-image:never"))
        .await
        .expect_err("no such image");
    assert!(matches!(err, DriverError::ImageMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("shoal-no-such-image:never not present on this node"),
        "{msg}"
    );
    assert!(msg.contains("no registry"), "{msg}");
    assert!(d.list().await.expect("list").is_empty());
    assert!(!d
        .has_image("shoal-no-such-image:never")
        .await
        .expect("has_image"));
    assert!(d.has_image(TEST_IMAGE).await.expect("has_image"));
}

#[tokio::test]
async fn an_exit_is_reported_with_its_code_and_a_restart_replaces_it() {
    let n = node("exit");
    let (d, _cleanup) = setup(&n).await;
    let mut s = spec("exit-a1", TEST_IMAGE);
    s.env.insert("EXIT_WITH".into(), "3".into());
    let first = d.start(&s).await.expect("start");
    let ended = wait_for("the container to exit", WAIT, || async {
        d.status("exit-a1")
            .await
            .expect("status")
            .filter(|w| !w.state.is_live())
    })
    .await;
    assert_eq!(ended.state, RunState::Exited { code: Some(3) });
    assert_eq!(d.usage("exit-a1").await.expect("usage"), None);
    let logs = d
        .logs("exit-a1", LogQuery::all())
        .await
        .expect("logs")
        .bytes;
    assert!(String::from_utf8_lossy(&logs).contains("exiting with 3"));

    s.env.remove("EXIT_WITH");
    let second = d.start(&s).await.expect("restart");
    assert_ne!(
        second.handle, first.handle,
        "an ended container is replaced"
    );
    assert_eq!(second.state, RunState::Running);
    assert_eq!(d.list().await.expect("list").len(), 1);
    d.stop("exit-a1", Duration::from_secs(5))
        .await
        .expect("stop");
}

/// Bridge networking with the engine's port mapping, on an engine whose bridge is
/// made for the test: a fixed host port is published as asked and reaches the
/// container's port, and a dynamic one is picked by the engine.
#[test]
fn a_fixed_host_port_is_published_as_asked() {
    let engine = shoal_runtime::testutil::Engine::start_with_bridge()
        .expect("an engine with its own bridge");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut opts = engine.options(&node("fixed"));
        opts.publish_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let d = DockerDriver::connect_with(opts)
            .await
            .expect("the extra engine");
        ensure_test_image(&d)
            .await
            .expect("building the test image there");
        let mut s = spec("fixed-a1", TEST_IMAGE);
        s.kind = WorkloadKind::Docker {
            image: TEST_IMAGE.into(),
            host_network: false,
        };
        let port = free_port();
        s.ports[0].host_port = Some(port);
        let st = d.start(&s).await.expect("start");
        assert_eq!(st.ports, vec![("http".to_string(), port)]);
        wait_healthy(port).await;
        let mut dynamic = s.clone();
        dynamic.alloc_id = "fixed-a2".into();
        dynamic.ports[0].host_port = None;
        let st2 = d.start(&dynamic).await.expect("start");
        let [(_, picked)] = st2.ports.as_slice() else {
            panic!("one port expected: {:?}", st2.ports)
        };
        wait_healthy(*picked).await;
        for id in ["fixed-a1", "fixed-a2"] {
            d.stop(id, Duration::from_secs(5)).await.expect("stop");
        }
    });
}

/// With host networking there is no mapping: the driver picks a host port, tells
/// the workload (`PORT`), reports it, and finds it again when the agent restarts.
#[tokio::test]
async fn host_networking_picks_a_host_port_the_workload_listens_on() {
    let n = node("hostnet");
    let (d, _cleanup) = setup(&n).await;
    let mut s = spec("hostnet-a1", TEST_IMAGE);
    s.kind = WorkloadKind::Docker {
        image: TEST_IMAGE.into(),
        host_network: true,
    };
    let st = d.start(&s).await.expect("start");
    let [(name, port)] = st.ports.as_slice() else {
        panic!("one port expected: {:?}", st.ports)
    };
    assert_eq!(name, "http");
    assert_ne!(*port, 8080, "a picked host port, not the container port");
    wait_healthy(*port).await;
    // A fresh driver (an agent restart) reads the same port back from the labels.
    let again = connect(&n).await;
    let listed = again.list().await.expect("list");
    let found = listed
        .iter()
        .find(|w| w.alloc_id == "hostnet-a1")
        .expect("listed");
    assert_eq!(found.ports, st.ports);
    // A fixed host port is used as is.
    let mut fixed = spec("hostnet-a2", TEST_IMAGE);
    fixed.kind = s.kind.clone();
    let want = free_port();
    fixed.ports[0].host_port = Some(want);
    let st2 = d.start(&fixed).await.expect("start");
    assert_eq!(st2.ports, vec![("http".to_string(), want)]);
    wait_healthy(want).await;
    for id in ["hostnet-a1", "hostnet-a2"] {
        d.stop(id, Duration::from_secs(5)).await.expect("stop");
    }
}

#[tokio::test]
async fn images_travel_as_tarballs_without_a_registry() {
    let n = node("image");
    let (d, _cleanup) = setup(&n).await;
    let docker = bollard::Docker::connect_with_unix_defaults()
        .expect("socket")
        .negotiate_version()
        .await
        .expect("version");
    let tag = format!("roundtrip-{}", std::process::id());
    let reference = format!("shoal-test-http:{tag}");
    docker
        .tag_image(
            TEST_IMAGE,
            Some(bollard::query_parameters::TagImageOptions {
                repo: Some("shoal-test-http".into()),
                tag: Some(tag.clone()),
            }),
        )
        .await
        .expect("tag");

    let dir = tempfile::tempdir().expect("tempdir");
    let tarball = dir.path().join("image.tar");
    let size = d.save_image(&reference, &tarball).await.expect("save");
    assert!(size > 0);
    assert_eq!(std::fs::metadata(&tarball).expect("tarball").len(), size);

    d.remove_image(&reference).await.expect("remove");
    assert!(!d.has_image(&reference).await.expect("has_image"));
    let loaded = d.load_image(&tarball).await.expect("load");
    assert!(loaded.contains(&reference), "{loaded:?}");
    assert!(d.has_image(&reference).await.expect("has_image"));
    d.remove_image(&reference).await.expect("remove");

    let err = d
        .save_image("shoal-no-such-image:never", &dir.path().join("x.tar"))
        .await
        .expect_err("missing image");
    assert!(matches!(err, DriverError::ImageMissing { .. }), "{err}");
    assert!(!dir.path().join("x.tar").exists());
}
