//! Autoscaling on real agents: CPU load from a bounded client makes a service
//! scale up, a steady noisy load changes it once, it scales down only after its
//! window even when its steward is killed meanwhile, a custom metric scraped from
//! the replicas decides, a schedule window moves the count at its boundary, and
//! hostile scaler plugins fall back to the built-in.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

/// The service row of `name` from agent `i`.
fn service(c: &Cluster, i: usize, name: &str) -> Option<Value> {
    c.services(i)
        .into_iter()
        .find(|s| s["name"].as_str() == Some(name))
}

fn desired(c: &Cluster, i: usize, name: &str) -> u32 {
    service(c, i, name).map_or(0, |s| s["desired"].as_u64().unwrap_or(0) as u32)
}

/// Healthy endpoints of `name`, from `shoal ps`.
fn endpoints(c: &Cluster, i: usize, name: &str) -> Vec<SocketAddr> {
    c.ps(i, name)
        .iter()
        .filter(|r| r["healthy"] == true)
        .filter_map(|r| r["endpoint"].as_str()?.parse().ok())
        .collect()
}

/// `shoal events SVC -o json` from agent `i`.
fn events(c: &Cluster, i: usize, name: &str) -> Vec<Value> {
    let out = shoal(&[
        "events",
        name,
        "--kind",
        "scale",
        "-o",
        "json",
        "--api",
        &c.agents[i].url(),
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn spec(name: &str, replicas: u32, scaler: &str) -> String {
    format!(
        r#"name = "{name}"
driver = "process"
command = ["shoal", "workload", "http", "--bind", "127.0.0.1"]
replicas = {replicas}
stop_delay = "0s"

[resources]
cpu = "100m"
memory = "32Mi"

[[ports]]
name = "http"
container_port = 8080

[health]
http = "/healthz"
interval = "500ms"

[scaler]
{scaler}
"#
    )
}

/// A bounded client: one request to `/burn` every `period`, round-robin over the
/// service's healthy endpoints (refreshed every half second), each burning
/// `burn_ms` ± `noise` (a fraction) of CPU. Stops when `stop` is set.
fn cpu_load(
    api: String,
    name: &'static str,
    period: Duration,
    burn_ms: f64,
    noise: f64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let targets: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut refreshed = Instant::now() - Duration::from_secs(1);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if refreshed.elapsed() >= Duration::from_millis(500) {
                let out = shoal(&["ps", name, "-o", "json", "--api", &api]);
                let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let eps: Vec<SocketAddr> = rows
                    .iter()
                    .filter(|r| r["healthy"] == true)
                    .filter_map(|r| r["endpoint"].as_str()?.parse().ok())
                    .collect();
                if !eps.is_empty() {
                    *targets.lock().unwrap() = eps;
                }
                refreshed = Instant::now();
            }
            let eps = targets.lock().unwrap().clone();
            if !eps.is_empty() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let jitter = (x % 1001) as f64 / 1000.0 * 2.0 - 1.0; // -1 ..= 1
                let ms = (burn_ms * (1.0 + noise * jitter)).max(1.0) as u64;
                let ep = eps[(sent as usize) % eps.len()];
                let _ = http_get(ep, &format!("/burn?ms={ms}"));
                sent += 1;
            }
            next += period;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        sent
    })
}

/// The CPU-driven test measures CPU that other tests' agents would take from it on
/// a 2-core machine (a busy machine slows the client load, and the scaler rightly
/// asks for fewer replicas): it runs alone, the others share.
static CPU_ALONE: RwLock<()> = RwLock::new(());

#[test]
fn cpu_load_scales_up_once_and_down_only_after_the_window_even_across_a_steward_change() {
    let _alone = CPU_ALONE.write().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(5);
    let window = 20;
    let text = spec(
        "web",
        2,
        &format!(
            "policy = \"target-utilization\"\nmetric = \"cpu\"\ntarget = 50\nmin = 2\nmax = 8\ninterval = \"1s\"\nscale_down_window = \"{window}s\"\nstartup = \"2s\""
        ),
    );
    let out = c.deploy_wait(0, "web.toml", &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A hand-set count is refused, naming the scaler and what to change.
    let out = shoal(&["scale", "web", "5", "--api", &c.agents[0].url()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("autoscaled by target-utilization") && err.contains("min/max"),
        "{err}"
    );

    // 160 ms of CPU a second (8 requests of 20 ms, each ±20%) against a 50 ms (50% of
    // 100m) target: 4 replicas, which then run at 40%. That is well inside the +10%
    // before another scale-up even when a busy machine (the whole suite runs beside
    // this test) makes the measured CPU read high. If the first step lands on 3
    // (its sample covered part of a second of load), 3 run at ~53%, inside the ±10%
    // tolerance, so the count rightly stays at 3 (seen in a full test run).
    let stop = Arc::new(AtomicBool::new(false));
    let load = cpu_load(
        c.agents[0].url(),
        "web",
        Duration::from_millis(125),
        20.0,
        0.2,
        stop.clone(),
    );
    let t = Instant::now();
    let scaled = wait_for("a scale-up", Duration::from_secs(30), || {
        let d = desired(&c, 0, "web");
        (d > 2).then_some(d)
    });
    let reaction = t.elapsed();
    assert!((3..=7).contains(&scaled), "scaled to {scaled}");
    let ev = events(&c, 0, "web");
    assert!(
        ev[0]["reason"].as_str().unwrap_or("").contains("cpu"),
        "{ev:?}"
    );
    assert_eq!(ev[0]["from"], 2);
    let row = service(&c, 1, "web").unwrap();
    assert!(
        row["autoscale"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("target"),
        "every agent shows why: {row}"
    );
    // The step may take more than one evaluation (the first sample covers part of
    // a second of load; replicas not reporting yet count as 0); then it settles.
    let mut last = (scaled, Instant::now());
    wait_for("the count to settle", Duration::from_secs(40), || {
        let d = desired(&c, 0, "web");
        if d != last.0 {
            last = (d, Instant::now());
        }
        (last.1.elapsed() >= Duration::from_secs(8) && endpoints(&c, 0, "web").len() as u32 == d)
            .then_some(())
    });
    eprintln!(
        "scale-up decided {reaction:?} after the load step; settled at {}",
        last.0
    );
    let ramp = events(&c, 0, "web");
    let settled = ramp.len();
    assert!(
        settled <= 3 && ramp.iter().all(|e| e["to"].as_u64() > e["from"].as_u64()),
        "a load step is followed in at most three steps up: {ramp:?}"
    );
    assert!((3..=7).contains(&last.0), "settled at {}", last.0);

    // Steady noisy load: at most one more change.
    std::thread::sleep(Duration::from_secs(25));
    let decisions = events(&c, 0, "web").len();
    assert!(
        decisions <= settled + 1,
        "steady load changed the count more than once: {:?}",
        events(&c, 0, "web")
    );
    let busy = desired(&c, 0, "web");

    // Load stops; halfway through the window the steward is killed.
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();
    assert!(sent > 150, "the client ran ({sent} requests)");
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(window / 2));
    let steward = service(&c, 0, "web").unwrap()["steward"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = c.agents.iter().position(|a| a.name == steward).unwrap();
    let watcher = (victim + 1) % c.agents.len();
    c.kill9(victim);
    // The window holds the highest recommendation made under load (it may be below
    // the count: the count can sit one above what the load needs since a noisy
    // peak), so until the window is over — less a few seconds of slack for the last
    // busy sample — the count stays above the idle minimum, with the new steward too.
    let limit = Duration::from_secs(window) - Duration::from_secs(3);
    while stopped.elapsed() < limit {
        let d = desired(&c, watcher, "web");
        assert!(
            d > 2,
            "scaled down to {d} (from {busy}) {:?} after the load stopped, inside the {window} s window",
            stopped.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_for("the scale-down", Duration::from_secs(40), || {
        (desired(&c, watcher, "web") == 2).then_some(())
    });
    let ev = events(&c, watcher, "web");
    let downs: Vec<&Value> = ev
        .iter()
        .filter(|e| e["to"].as_u64() < e["from"].as_u64())
        .collect();
    assert!(
        !downs.is_empty() && downs.len() <= 3,
        "a scale-down in at most three steps: {ev:?}"
    );
    assert_eq!(downs[0]["to"], 2);
    assert_ne!(
        downs[0]["steward"].as_str(),
        Some(steward.as_str()),
        "the next steward made the last step: {ev:?}"
    );
    let metric = c
        .metric(watcher, "shoal_scaler_decisions_total{service=\"web\"}")
        .unwrap();
    assert_eq!(metric as usize, ev.len());
    assert_eq!(
        c.metric(watcher, "shoal_service_desired_replicas{service=\"web\"}"),
        Some(2.0)
    );
}

#[test]
fn a_custom_metric_scraped_from_the_replicas_drives_the_count() {
    let _shared = CPU_ALONE.read().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    let text = spec(
        "queue",
        1,
        "metric = \"requests_in_flight\"\ntarget = 2\nmetrics_port = \"http\"\nmetrics_path = \"/metrics\"\nmin = 1\nmax = 5\ninterval = \"1s\"\nscale_down_window = \"5s\"",
    );
    let out = c.deploy_wait(0, "queue.toml", &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ep = endpoints(&c, 0, "queue")[0];
    // Six requests held open on the replica: 6 in flight over a target of 2 → 3.
    let holders: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || http_get(ep, "/sleep?ms=15000")))
        .collect();
    let d = wait_for(
        "a scale-up on requests_in_flight",
        Duration::from_secs(20),
        || {
            let d = desired(&c, 0, "queue");
            (d > 1).then_some(d)
        },
    );
    assert_eq!(d, 3);
    let ev = events(&c, 0, "queue");
    assert!(
        ev[0]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("requests_in_flight"),
        "{ev:?}"
    );
    for h in holders {
        let _ = h.join();
    }
    wait_for(
        "back to 1 once the requests end",
        Duration::from_secs(30),
        || (desired(&c, 0, "queue") == 1).then_some(()),
    );
}

#[test]
fn a_schedule_window_changes_the_count_at_its_boundary() {
    let _shared = CPU_ALONE.read().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    // The next minute boundary at least 20 s away.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut open = (now / 60 + 1) * 60;
    if open - now < 20 {
        open += 60;
    }
    let hhmm = |t: u64| format!("{:02}:{:02}", (t / 3600) % 24, (t / 60) % 60);
    let scaler = format!(
        "policy = \"schedule\"\nwindows = [{{ days = \"daily\", from = \"{}\", to = \"{}\", replicas = 3 }}]\ndefault = 1\nmin = 1\nmax = 4\ninterval = \"1s\"",
        hhmm(open),
        hhmm(open + 600)
    );
    let out = c.deploy_wait(0, "night.toml", &spec("night", 1, &scaler));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let epoch = |t: u64| UNIX_EPOCH + Duration::from_secs(t);
    while SystemTime::now() < epoch(open) - Duration::from_secs(2) {
        assert_eq!(desired(&c, 1, "night"), 1, "before the window opens");
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_for("the window to open", Duration::from_secs(30), || {
        (desired(&c, 1, "night") == 3).then_some(())
    });
    let opened = SystemTime::now();
    assert!(opened >= epoch(open), "not before the boundary");
    assert!(
        opened <= epoch(open) + Duration::from_secs(5),
        "within an interval or two of the boundary: {:?}",
        opened.duration_since(epoch(open))
    );
    let ev = events(&c, 1, "night");
    assert!(
        ev[0]["reason"].as_str().unwrap_or("").contains("window"),
        "{ev:?}"
    );
    wait_for("3 replicas healthy", Duration::from_secs(30), || {
        (endpoints(&c, 0, "night").len() == 3).then_some(())
    });
}

#[test]
fn hostile_scaler_plugins_fall_back_to_the_built_in_and_are_quarantined() {
    let _shared = CPU_ALONE.read().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    let wasm = PathBuf::from(SHOAL)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("wasm32-wasip2/release/shoal_fixture_scaler_hostile.wasm");
    assert!(
        wasm.exists(),
        "built by the workspace build: {}",
        wasm.display()
    );
    for (svc, mode) in [("trap", "trap"), ("spin", "loop"), ("range", "range")] {
        // The built-in alone keeps 2 (no load, min 2).
        let text = spec(
            svc,
            2,
            &format!("min = 2\nmax = 4\ninterval = \"1s\"\nhostile = \"{mode}\""),
        );
        let out = c.deploy_wait(0, &format!("{svc}.toml"), &text);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        shoal_ok(&[
            "plugin",
            "install",
            "--kind",
            "scaler",
            "--service",
            svc,
            "--name",
            &format!("hostile-{mode}"),
            wasm.to_str().unwrap(),
            "--api",
            &c.agents[1].url(),
        ]);
    }
    let api = c.agents[0].url();
    // Only a service's steward calls its scaler, so that agent quarantines it.
    wait_for(
        "all three quarantined by their stewards",
        Duration::from_secs(60),
        || {
            let out = shoal(&["plugin", "ls", "--all", "-o", "json", "--api", &api]);
            let rows: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
            ["trap", "loop", "range"]
                .iter()
                .all(|mode| {
                    rows.iter().any(|r| {
                        r["name"].as_str() == Some(&format!("hostile-{mode}"))
                            && r["state"] == "quarantined"
                    })
                })
                .then_some(())
        },
    );
    for svc in ["trap", "spin", "range"] {
        assert_eq!(desired(&c, 0, svc), 2, "{svc} keeps its count");
        assert!(
            events(&c, 0, svc).is_empty(),
            "{svc}: no scale event from a failing plugin"
        );
    }
    // The steward's log names the fallback, and each quarantine is an event.
    let logs: String = c.agents.iter().map(|a| a.log()).collect();
    assert!(logs.contains("quarantined"), "a quarantine is logged");
    wait_for("the quarantines in events", Duration::from_secs(10), || {
        let out = shoal(&[
            "events",
            "--kind",
            "plugin quarantined",
            "-o",
            "json",
            "--api",
            &api,
        ]);
        let ev: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        ["trap", "loop", "range"]
            .iter()
            .all(|mode| {
                ev.iter().any(|e| {
                    e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(&format!("plugin hostile-{mode} (")))
                })
            })
            .then_some(())
    });
}
