//! Policy plugins through real agents: install on one, active on all, removal,
//! refusal of bad components, and dry runs.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A `.wasm` built by the workspace build into `<target>/wasm32-wasip2/release/`.
fn wasm(name: &str) -> PathBuf {
    // <target>/debug/shoal → <target>
    let target = PathBuf::from(SHOAL)
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    let path = target.join("wasm32-wasip2/release").join(name);
    assert!(
        path.exists(),
        "{} was not built by the workspace build",
        path.display()
    );
    path
}

fn plugin_rows(c: &Cluster, i: usize, all: bool) -> Vec<Value> {
    let api = c.agents[i].url();
    let mut args = vec!["plugin", "ls", "-o", "json", "--api", &api];
    if all {
        args.push("--all");
    }
    let out = shoal(&args);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn scheduler_row(rows: &[Value]) -> Option<Value> {
    rows.iter()
        .find(|r| r["kind"] == "scheduler" && r["service"].is_null())
        .cloned()
}

#[test]
fn plugin_installed_on_one_agent_becomes_active_on_all_five() {
    let c = Cluster::start(5);
    let file = wasm("hybrid_cloud.wasm");
    let expected = blake3::hash(&std::fs::read(&file).unwrap())
        .to_hex()
        .to_string();

    // Before: the built-in scheduler everywhere.
    let before = scheduler_row(&plugin_rows(&c, 0, false)).unwrap();
    assert_eq!(before["name"], "builtin");
    assert_eq!(before["state"], "active");

    let out = shoal_ok(&[
        "plugin",
        "install",
        "--kind",
        "scheduler",
        file.to_str().unwrap(),
        "--name",
        "hybrid",
        "-o",
        "json",
        "--api",
        &c.agents[1].url(),
    ]);
    let b: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        b["hash"],
        expected.as_str(),
        "the hash shown is blake3 of the file"
    );

    // Every agent fetches, verifies, compiles and activates the same bytes.
    for i in 0..5 {
        wait_for(
            &format!("hybrid active on n{}", i + 1),
            Duration::from_secs(60),
            || {
                let row = scheduler_row(&plugin_rows(&c, i, false))?;
                (row["name"] == "hybrid"
                    && row["state"] == "active"
                    && row["hash"] == expected.as_str())
                .then_some(())
            },
        );
    }
    // `--all` on any agent shows every agent's view.
    let all = wait_for(
        "every agent's state published",
        Duration::from_secs(20),
        || {
            let rows: Vec<Value> = plugin_rows(&c, 3, true)
                .into_iter()
                .filter(|r| {
                    r["kind"] == "scheduler"
                        && r["state"] == "active"
                        && r["hash"] == expected.as_str()
                })
                .collect();
            (rows.len() == 5).then_some(rows)
        },
    );
    let mut agents: Vec<&str> = all.iter().map(|r| r["agent"].as_str().unwrap()).collect();
    agents.sort();
    assert_eq!(agents, ["n1", "n2", "n3", "n4", "n5"]);

    // Removing the binding reverts every agent to the built-in.
    shoal_ok(&[
        "plugin",
        "rm",
        "--kind",
        "scheduler",
        "--api",
        &c.agents[4].url(),
    ]);
    for i in 0..5 {
        wait_for("built-in again", Duration::from_secs(20), || {
            (scheduler_row(&plugin_rows(&c, i, false))?["name"] == "builtin").then_some(())
        });
    }
    let out = shoal(&[
        "plugin",
        "rm",
        "--kind",
        "scheduler",
        "--api",
        &c.agents[0].url(),
    ]);
    assert_eq!(out.status.code(), Some(1), "removing twice is an error");
}

#[test]
fn bad_components_are_refused_at_install_and_change_nothing() {
    let c = Cluster::start(1);
    let api = c.agents[0].url();

    // A scheduler installed as a scaler: the wrong world, named.
    let out = shoal(&[
        "plugin",
        "install",
        "--kind",
        "scaler",
        wasm("hybrid_cloud.wasm").to_str().unwrap(),
        "--api",
        &api,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`scaler` world"), "{err}");

    // Not WebAssembly at all.
    let junk = c.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let out = shoal(&[
        "plugin",
        "install",
        "--kind",
        "scheduler",
        junk.to_str().unwrap(),
        "--api",
        &api,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid WebAssembly component"));

    // A missing file is a clear local error.
    let out = shoal(&[
        "plugin",
        "install",
        "--kind",
        "scheduler",
        "/no/such.wasm",
        "--api",
        &api,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such.wasm"));

    // Nothing was bound.
    let rows = plugin_rows(&c, 0, false);
    assert!(rows.iter().all(|r| r["name"] == "builtin"), "{rows:?}");
}

#[test]
fn eval_dry_runs_a_policy_against_a_saved_or_live_snapshot() {
    let c = Cluster::start(2);
    let api = c.agents[0].url();
    let dir = c.path();

    // A saved snapshot: one on-prem node that is nearly full, two cloud nodes.
    let node = |name: &str, provider: &str, cost: &str, mem_free: u64| {
        serde_json::json!({
            "name": name, "status": "alive",
            "labels": {"provider": provider, "cost": cost},
            "capacity": {"cpu_millis": 4000, "memory_bytes": 8u64 << 30, "disk_bytes": 100u64 << 30},
            "free": {"cpu_millis": 4000, "memory_bytes": mem_free, "disk_bytes": 100u64 << 30},
        })
    };
    let snap = serde_json::json!({"nodes": [
        node("rack1", "onprem", "0", 1u64 << 30),
        node("aws1", "aws", "7", 8u64 << 30),
        node("gcp1", "gcp", "3", 8u64 << 30),
    ]});
    let snap_path = dir.join("snap.json");
    std::fs::write(&snap_path, snap.to_string()).unwrap();
    let req_path = dir.join("req.json");
    std::fs::write(
        &req_path,
        serde_json::json!({"service": "web", "replicas": 2,
            "resources": {"cpu_millis": 500, "memory_bytes": 1u64 << 30}})
        .to_string(),
    )
    .unwrap();

    let file = wasm("hybrid_cloud.wasm");
    let (file, req) = (file.to_str().unwrap(), req_path.to_str().unwrap());
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "eval",
            "--kind",
            "scheduler",
            file,
            "--request",
            req,
        ];
        args.extend_from_slice(extra);
        shoal_ok(&args)
    };
    let snap_arg = snap_path.to_str().unwrap();
    let out = eval(&["--snapshot", snap_arg, "-o", "json"]);
    let outcomes: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        outcomes[0]["nodes"],
        serde_json::json!(["rack1", "gcp1"]),
        "on-prem first, then the cheapest cloud"
    );
    assert_eq!(outcomes[0]["decided_by"]["policy"], "plugin");

    // Human output names the decision and who made it.
    let text = eval(&["--snapshot", snap_arg]);
    assert!(text.contains("web: 2/2 placed on rack1, gcp1"), "{text}");
    assert!(text.contains("decided by: plugin eval"), "{text}");

    // Against the live cluster: its snapshot has both agents.
    let live = shoal_ok(&["nodes", "--snapshot", "--api", &api]);
    let live: Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live["nodes"].as_array().unwrap().len(), 2);
    let out = eval(&["-o", "json", "--api", &api]);
    let outcomes: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(outcomes[0]["nodes"].as_array().unwrap().len(), 2, "{out}");
}

/// `plugin new` writes a crate that builds outside any shoal checkout (the SDK and
/// WIT travel with it), `plugin test` passes its own cases and fails a wrong one,
/// and the scheduler it builds goes active on a mesh. Prints how long the path from
/// `plugin new` to active took (README, policy authoring).
#[test]
fn plugin_new_builds_anywhere_and_plugin_test_checks_it() {
    let started = std::time::Instant::now();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for kind in ["scheduler", "scaler", "discovery"] {
        let name = format!("team-{kind}");
        let dir = work.path().join(&name);
        shoal_ok(&[
            "plugin",
            "new",
            "--kind",
            kind,
            &name,
            "--dir",
            dir.to_str().unwrap(),
        ]);
        assert!(
            !std::fs::read_to_string(dir.join("shoal/sdk/src/lib.rs"))
                .unwrap()
                .contains("../../wit"),
            "the SDK must not reach into a checkout"
        );
        let out = std::process::Command::new(&cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("CARGO_MANIFEST_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let wasm = target.join(format!("wasm32-wasip2/release/team_{kind}.wasm"));
        let cases = dir.join("tests/cases.json");
        let args = |cases: &std::path::Path| {
            vec![
                "plugin".to_string(),
                "test".into(),
                wasm.to_str().unwrap().into(),
                "--kind".into(),
                kind.into(),
                "--cases".into(),
                cases.to_str().unwrap().into(),
            ]
        };
        let a = args(&cases);
        let text = shoal_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            text.contains("cases passed") && !text.contains("FAIL"),
            "{text}"
        );
        // A case the component does not meet fails, and says how.
        let mut broken: Value =
            serde_json::from_str(&std::fs::read_to_string(&cases).unwrap()).unwrap();
        let expect = &mut broken["cases"][0]["expect"];
        match kind {
            "scaler" => expect["replicas"] = serde_json::json!(9),
            _ => expect["nodes"] = serde_json::json!(["nowhere"]),
        }
        let bad = work.path().join(format!("{kind}-bad.json"));
        std::fs::write(&bad, broken.to_string()).unwrap();
        let a = args(&bad);
        let out = shoal(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("FAIL") && text.contains("expected"), "{text}");
    }
    // The scheduler goes active on a mesh.
    let c = Cluster::start(1);
    let wasm = target.join("wasm32-wasip2/release/team_scheduler.wasm");
    shoal_ok(&[
        "plugin",
        "install",
        "--kind",
        "scheduler",
        wasm.to_str().unwrap(),
        "--name",
        "team-scheduler",
        "--api",
        &c.agents[0].url(),
    ]);
    wait_for("the new plugin active", Duration::from_secs(30), || {
        scheduler_row(&plugin_rows(&c, 0, false))
            .filter(|r| r["name"] == "team-scheduler" && r["state"] == "active")
    });
    eprintln!(
        "plugin new -> built -> tested -> active, three kinds: {:?}",
        started.elapsed()
    );
}
