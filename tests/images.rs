//! Images without a registry, over real Docker Engines: every agent gets an engine
//! of its own (an extra `dockerd` with its own data root and socket, no bridge, vfs
//! storage), an image is pushed into the mesh on one node only, and the others fetch
//! its layers from peers before they start replicas. These tests need root and
//! `dockerd`; they fail loudly without them.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{http_get, shoal, wait_for, Cluster};
use serde_json::Value;
use shoal_runtime::testutil::{build_image, ensure_test_image, Engine};
use shoal_runtime::DockerDriver;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible enough, and the same per seed.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds on `e`: the test server image, `p2p:1` (plus a 6 MiB layer) and `p2p:2`
/// (`p2p:1` plus a 1 MiB layer).
fn build_images(e: &Engine) {
    let d = runtime()
        .block_on(DockerDriver::connect_with(e.options("shoal-image-test")))
        .expect("connecting to the extra engine");
    runtime().block_on(async {
        ensure_test_image(&d)
            .await
            .expect("building the test image");
        let big = random_bytes(6 << 20, 1);
        build_image(
            &d,
            "p2p:1",
            "FROM shoal-test-http:latest\nCOPY big /big\n",
            &[("big", 0o644, &big)],
        )
        .await
        .expect("building p2p:1");
        let small = random_bytes(1 << 20, 2);
        build_image(
            &d,
            "p2p:2",
            "FROM p2p:1\nCOPY small /small\n",
            &[("small", 0o644, &small)],
        )
        .await
        .expect("building p2p:2");
    });
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn spec(image: &str) -> String {
    format!(
        r#"name = "p2p"
driver = "docker"
image = "{image}"
network = "host"
replicas = 3
stop_delay = "0s"
anti_affinity = ["service:p2p"]

[[ports]]
name = "http"
container_port = 8080

[health]
http = "/healthz"
interval = "500ms"

[update]
max_surge = 0
max_unavailable = 1
"#
    )
}

fn served(c: &Cluster, i: usize) -> f64 {
    c.metric(i, "shoal_blob_served_bytes_total").unwrap_or(0.0)
}

fn fetched(c: &Cluster, i: usize) -> f64 {
    c.metric(i, "shoal_blob_fetched_bytes_total").unwrap_or(0.0)
}

fn blobs(c: &Cluster, i: usize) -> Vec<String> {
    let body = http_get(c.agents[i].api, "/v1/blobs").unwrap_or_default();
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
    rows.iter()
        .filter(|r| r["state"] == "held")
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect()
}

fn all_healthy_on(c: &Cluster, image_version: u64) -> bool {
    let rows = c.ps(0, "p2p");
    rows.len() == 3
        && rows
            .iter()
            .all(|r| r["healthy"] == true && r["version"] == image_version)
}

/// Push on n1 only; three replicas on three engines; every engine ends with the
/// same image id, every replica answers, and the fetching nodes served each other.
/// Then v2 (one more layer), preheated with `--to all`, moves only that layer; removal collects what only the
/// removed image named; bad input gets one clear line.
#[test]
fn images_travel_peer_to_peer_between_engines() {
    let engines: Vec<Engine> = (0..4)
        .map(|_| Engine::start().expect("an extra dockerd"))
        .collect();
    build_images(&engines[0]);
    let prefix = format!("im{}-", std::process::id());
    let mut c = Cluster::with(0, &prefix, false);
    // n1's upload is capped low, so the others are faster fetching from each other.
    let cfg = c.path().join("n1.toml");
    std::fs::write(&cfg, "[tuning]\nupload_bytes_per_sec = 2097152\n").unwrap();
    for (i, e) in engines.iter().take(3).enumerate() {
        let mut extra = vec![
            "--docker".to_string(),
            e.url(),
            "--blob-gc-grace".into(),
            "2s".into(),
        ];
        if i == 0 {
            extra.extend(["--config".into(), cfg.display().to_string()]);
        }
        c.add_agent(extra);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_all_alive(Duration::from_secs(20));
    let urls: Vec<String> = c.agents.iter().map(|a| a.url()).collect();
    let api = |i: usize| urls[i].clone();

    // Placement says why when nobody holds an image.
    let missing = c.write_spec(
        "absent.toml",
        &spec("absent:1").replace("\"p2p\"", "\"absent\""),
    );
    let out = shoal(&["deploy", &missing, "--api", &api(0)]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(
        "the pending reason of absent",
        Duration::from_secs(20),
        || {
            let rows = c.ps(0, "absent");
            rows.iter()
                .any(|r| {
                    r["reason"]
                        .as_str()
                        .is_some_and(|s| s.contains("image absent:1 is on no live node"))
                })
                .then_some(())
        },
    );
    assert!(shoal(&["rm", "absent", "--api", &api(0)]).status.success());

    // Push v1 on n1.
    let out = shoal(&["image", "push", "p2p:1", "-o", "json", "--api", &api(0)]);
    assert!(out.status.success(), "push: {}", text(&out));
    let rec: Value = serde_json::from_slice(&out.stdout).expect("push -o json prints the record");
    let id = rec["id"].as_str().unwrap().to_string();
    assert_eq!(Some(id.clone()), engines[0].image_id("p2p:1"));
    assert_eq!(rec["layers"].as_array().unwrap().len(), 2, "{rec}");
    let size: u64 = rec["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();

    // Deploy three replicas, one per node: n2 and n3 pull from peers.
    let out = c.deploy_wait(0, "p2p.toml", &spec("p2p:1"));
    assert!(out.status.success(), "deploy --wait: {}", text(&out));
    let rows = c.ps(0, "p2p");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut nodes: Vec<String> = rows
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "one replica per node: {rows:?}");
    for r in &rows {
        let ep: std::net::SocketAddr = r["endpoint"].as_str().unwrap().parse().unwrap();
        assert!(http_get(ep, "/").is_some(), "replica at {ep} answers");
    }
    for e in engines.iter().take(3) {
        assert_eq!(e.image_id("p2p:1").as_deref(), Some(id.as_str()));
    }
    // Counters are republished within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let served_by: Vec<f64> = (0..3).map(|i| served(&c, i)).collect();
    let total: f64 = served_by.iter().sum();
    assert!(
        total >= 2.0 * size as f64,
        "two nodes fetched {size} bytes each, {served_by:?} served"
    );
    assert!(served_by[0] > 0.0, "{served_by:?}");
    assert!(
        served_by[1] + served_by[2] > 0.0,
        "the fetching nodes served each other (swarm, not star): {served_by:?}"
    );
    let listed = shoal(&["image", "ls", "-o", "json", "--api", &api(1)]);
    let list: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["holders"].as_array().unwrap().len(), 3, "{list:?}");

    // v2 adds one 1 MiB layer: only that layer travels.
    let before: Vec<f64> = (1..3).map(|i| fetched(&c, i)).collect();
    assert!(before.iter().all(|b| *b >= size as f64), "{before:?}");
    // Pushed with --to all: every node fetches it before any replica needs it.
    let out = shoal(&["image", "push", "p2p:2", "--to", "all", "--api", &api(0)]);
    assert!(out.status.success(), "push v2: {}", text(&out));
    let v2 = engines[0].image_id("p2p:2").unwrap();
    wait_for(
        "v2 preheated on every engine",
        Duration::from_secs(30),
        || {
            (1..3)
                .all(|i| engines[i].image_id("p2p:2").as_deref() == Some(v2.as_str()))
                .then_some(())
        },
    );
    let out = c.deploy_wait(0, "p2p.toml", &spec("p2p:2"));
    assert!(out.status.success(), "deploy v2: {}", text(&out));
    wait_for("v2 healthy everywhere", Duration::from_secs(30), || {
        all_healthy_on(&c, 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    for (k, i) in (1..3).enumerate() {
        let moved = fetched(&c, i) - before[k];
        assert!(
            (1_000_000.0..1_600_000.0).contains(&moved),
            "node {} fetched {moved} bytes for a 1 MiB layer",
            i + 1
        );
    }

    // Bad input: one clear line each.
    let out = shoal(&["image", "push", "nope:1", "--api", &api(0)]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no image nope:1 in the Docker Engine of agent"),
        "{}",
        text(&out)
    );
    let out = shoal(&["image", "push", "Bad Ref", "--api", &api(0)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("image reference"), "{}", text(&out));
    assert!(engines[0]
        .docker(&["tag", "p2p:2", "p2p:1"])
        .status
        .success());
    let out = shoal(&["image", "push", "p2p:1", "--api", &api(0)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("already names image"), "{}", text(&out));
    assert!(text(&out).contains("--replace"), "{}", text(&out));
    let out = shoal(&["image", "rm", "nope:1", "--api", &api(0)]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no image nope:1 was pushed"),
        "{}",
        text(&out)
    );

    // A node whose blob cap cannot hold the image refuses it, saying so.
    let n4 = c.add_agent(vec![
        "--docker".into(),
        engines[3].url(),
        "--blob-cap".into(),
        "1Mi".into(),
    ]);
    c.spawn(n4);
    c.wait_all_alive(Duration::from_secs(20));
    let n4_api = c.agents[n4].url();
    wait_for("n4 knows p2p:2", Duration::from_secs(20), || {
        let out = shoal(&["image", "ls", "-o", "json", "--api", &n4_api]);
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.iter().any(|i| i["reference"] == "p2p:2").then_some(())
    });
    let out = shoal(&["image", "pull", "p2p:2", "--api", &n4_api]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--blob-cap"), "{}", text(&out));
    assert!(engines[3].image_id("p2p:2").is_none());

    // Removing v1 collects the blob only it named (its image blob), everywhere,
    // and keeps the layers v2 still names.
    let v1_blob = rec["image_blob"].as_str().unwrap().to_string();
    let shared_layer = rec["layers"][1]["blob"].as_str().unwrap().to_string();
    assert!(blobs(&c, 1).contains(&v1_blob));
    let out = shoal(&["image", "rm", "p2p:1", "--api", &api(0)]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(
        "v1's image blob collected on every node",
        Duration::from_secs(30),
        || {
            (0..3)
                .all(|i| !blobs(&c, i).contains(&v1_blob))
                .then_some(())
        },
    );
    for i in 0..3 {
        assert!(
            blobs(&c, i).contains(&shared_layer),
            "node {} kept v2's layer",
            i + 1
        );
    }
    assert!(shoal(&["rm", "p2p", "--api", &api(0)]).status.success());
    wait_for("service gone", Duration::from_secs(30), || {
        c.services(0).is_empty().then_some(())
    });
}

/// Layers survive their servers: n4 fetches a 128 MiB layer that n1, n2 and n3 hold,
/// uploads capped so the transfer takes seconds. n2's copy rots on disk (it refuses
/// to serve chunks that no longer match, and n4 takes them elsewhere); n3 is killed
/// mid-transfer. The fetch finishes from n1 and the blob is intact. Blob-only
/// agents: no engine needed.
#[test]
fn a_layer_fetch_survives_a_corrupt_and_a_killed_server() {
    let size = 128usize << 20;
    let data = random_bytes(size, 9);
    let prefix = format!("bf{}-", std::process::id());
    let mut c = Cluster::with(0, &prefix, false);
    let cfg = c.path().join("capped.toml");
    std::fs::write(&cfg, "[tuning]\nupload_bytes_per_sec = 8388608\n").unwrap();
    for _ in 0..4 {
        c.add_agent(vec!["--config".into(), cfg.display().to_string()]);
    }
    let mut id = None;
    for i in 0..3 {
        let store = shoal_blob::BlobStore::open(c.agents[i].data.join("blobs")).unwrap();
        id = Some(store.put_bytes(&data).unwrap());
    }
    let id = id.unwrap();
    // Rot part of n2's copy: its chunk hashes no longer match.
    let rotten = c.agents[1]
        .data
        .join("blobs")
        .join("blobs")
        .join(id.to_hex())
        .join("data");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rotten)
            .unwrap_or_else(|e| panic!("the store layout changed ({}): {e}", rotten.display()));
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0u8; 16 << 20]).unwrap();
    }
    for i in 0..4 {
        c.spawn(i);
    }
    c.wait_all_alive(Duration::from_secs(20));
    let fetcher = c.agents[3].url();
    for holder in 0..3 {
        let key = format!("node/{}/blob/{id}", c.agents[holder].name);
        wait_for(
            "n4 sees every advertisement",
            Duration::from_secs(20),
            || {
                let out = shoal(&[
                    "kv",
                    "ls",
                    "node/",
                    "--internal",
                    "-o",
                    "json",
                    "--api",
                    &fetcher,
                ]);
                let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
                rows.iter().any(|r| r["key"] == key).then_some(())
            },
        );
    }
    let out = common::http_raw(
        c.agents[3].api,
        "POST",
        &format!("/v1/blobs/{id}/fetch"),
        &[("Host", "127.0.0.1"), ("x-shoal-request", "1")],
        "",
    );
    assert_eq!(out.0, 200, "{out:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !blobs(&c, 3).contains(&id.to_string()),
        "still fetching 1.5 s in"
    );
    c.kill9(2);
    wait_for("n4 holds the blob", Duration::from_secs(90), || {
        blobs(&c, 3).contains(&id.to_string()).then_some(())
    });
    let store = shoal_blob::BlobStore::open(c.agents[3].data.join("blobs")).unwrap();
    assert!(
        store.read_all(&id).unwrap() == data,
        "the fetched blob is intact"
    );
    // n1, the one server left, served its share.
    assert!(served(&c, 0) > 0.0);
}
