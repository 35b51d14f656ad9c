//! Black-box orchestration with the process driver: 5 real agents on loopback run
//! `shoal workload http` replicas, driven only through the CLI.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{http_get, pid_alive, shoal, shoal_ok, wait_for, Cluster};
use serde_json::Value;

/// A web service of `replicas` `shoal workload http` processes.
fn web_spec(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        r#"name = "{name}"
driver = "process"
command = ["shoal", "workload", "http", "--bind", "127.0.0.1"]
replicas = {replicas}
reschedule_after = "2s"
{extra}

[resources]
cpu = "100m"
memory = "32Mi"

[[ports]]
name = "http"
container_port = 8080

[health]
http = "/healthz"
interval = "500ms"
timeout = "1s"
retries = 2

[scheduler]
strategy = "spread"
"#
    )
}

fn deploy(c: &Cluster, i: usize, file: &str, text: &str) {
    let path = c.write_spec(file, text);
    let out = shoal(&["deploy", &path, "--api", &c.agents[i].url()]);
    assert!(
        out.status.success(),
        "deploy {file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `shoal events ARGS -o json` from agent `i` (empty if it fails).
fn events(c: &Cluster, i: usize, args: &[&str]) -> Vec<Value> {
    let url = c.agents[i].url();
    let all = [&["events"][..], args, &["-o", "json", "--api", &url]].concat();
    serde_json::from_str(&shoal_ok(&all)).unwrap_or_default()
}

fn healthy(rows: &[Value]) -> Vec<&Value> {
    rows.iter()
        .filter(|r| r["healthy"] == true && r["state"] == "running")
        .collect()
}

/// Waits until `service` has exactly `n` slots, each healthy, none mid-update.
fn wait_healthy(c: &Cluster, i: usize, service: &str, n: usize, limit: Duration) -> Vec<Value> {
    wait_for(&format!("{n} healthy replicas of {service}"), limit, || {
        let rows = c.ps(i, service);
        (rows.len() == n && healthy(&rows).len() == n && rows.iter().all(|r| r["next"] == false))
            .then_some(rows)
    })
}

fn pids(rows: &[Value]) -> Vec<i32> {
    rows.iter()
        .filter_map(|r| r["handle"].as_str()?.parse().ok())
        .collect()
}

fn endpoint_answers(row: &Value) -> bool {
    let Some(ep) = row["endpoint"].as_str() else {
        return false;
    };
    http_get(ep.parse().unwrap(), "/healthz").is_some()
}

/// Deploy with spread, dependency order, scale up and down, a rolling update that
/// never drops below `replicas - max_unavailable` healthy, and `rm`.
#[test]
fn deploy_scale_update_and_remove() {
    let c = Cluster::start(5);

    // An invalid spec is refused, names the field, and changes nothing.
    let bad = c.write_spec(
        "bad.toml",
        &web_spec("web", 3, "").replace("replicas = 3", "replicas = -1"),
    );
    let out = shoal(&["deploy", &bad, "--api", &c.agents[0].url()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("replicas"),
        "error should name the field: {err}"
    );
    let typo = c.write_spec(
        "typo.toml",
        &format!("replcias = 2\n{}", web_spec("web", 3, "")),
    );
    let out = shoal(&["deploy", &typo, "--api", &c.agents[0].url()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replcias"));
    assert!(
        c.services(0).is_empty(),
        "a refused spec must change nothing"
    );

    // depends_on: web waits for db, and says so.
    deploy(
        &c,
        1,
        "web.toml",
        &web_spec("web", 3, "depends_on = [\"db\"]"),
    );
    let rows = wait_for(
        "web pending on its dependency",
        Duration::from_secs(20),
        || {
            let rows = c.ps(0, "web");
            (rows.len() == 3
                && rows.iter().all(|r| {
                    r["state"] == "pending"
                        && r["reason"]
                            .as_str()
                            .is_some_and(|x| x.contains("dependency") && x.contains("db"))
                }))
            .then_some(rows)
        },
    );
    assert!(rows.iter().all(|r| r["node"].is_null()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        healthy(&c.ps(0, "web")).is_empty(),
        "web must not start before db"
    );

    deploy(&c, 2, "db.toml", &web_spec("db", 1, ""));
    let db = wait_healthy(&c, 0, "db", 1, Duration::from_secs(30));
    let web = wait_healthy(&c, 0, "web", 3, Duration::from_secs(30));
    let db_started = db[0]["handle"].as_str().map(|_| ());
    assert!(db_started.is_some());

    // Spread: 3 replicas on 3 distinct nodes, each answering on its endpoint.
    let nodes: BTreeSet<&str> = web.iter().map(|r| r["node"].as_str().unwrap()).collect();
    assert_eq!(
        nodes.len(),
        3,
        "spread puts replicas on distinct nodes: {web:?}"
    );
    assert!(web.iter().all(endpoint_answers), "{web:?}");
    // CPU and memory are read from /proc (sampled every 5 s).
    wait_for("process metrics reported", Duration::from_secs(30), || {
        c.ps(0, "web")
            .iter()
            .all(|r| r["memory_bytes"].as_u64().is_some_and(|m| m > 0))
            .then_some(())
    });
    let running: f64 = (0..5)
        .filter_map(|i| c.metric(i, "shoal_allocations{state=\"running\"}"))
        .sum();
    assert_eq!(
        running, 4.0,
        "db + 3 web replicas, counted by the agents running them"
    );
    let services = c.services(4);
    let w = services.iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(
        (w["desired"].as_u64(), w["healthy"].as_u64()),
        (Some(3), Some(3))
    );

    // Scale up, then down: the replicas scaled away are stopped.
    let out = shoal(&["scale", "web", "5", "--api", &c.agents[3].url()]);
    assert!(out.status.success());
    let five = wait_healthy(&c, 0, "web", 5, Duration::from_secs(30));
    let out = shoal(&["scale", "web", "2", "--api", &c.agents[3].url()]);
    assert!(out.status.success());
    let two = wait_healthy(&c, 0, "web", 2, Duration::from_secs(30));
    let kept: BTreeSet<i32> = pids(&two).into_iter().collect();
    let dropped: Vec<i32> = pids(&five)
        .into_iter()
        .filter(|p| !kept.contains(p))
        .collect();
    assert_eq!(dropped.len(), 3);
    wait_for(
        "scaled-away replicas stopped",
        Duration::from_secs(15),
        || dropped.iter().all(|p| !pid_alive(*p)).then_some(()),
    );

    // Rolling update of 4 replicas, max_unavailable = 1: never below 3 healthy.
    let out = shoal(&["scale", "web", "4", "--api", &c.agents[3].url()]);
    assert!(out.status.success());
    let before = wait_healthy(&c, 0, "web", 4, Duration::from_secs(30));
    let v1 = before[0]["version"].as_u64().unwrap();
    let update = web_spec(
        "web",
        4,
        "depends_on = [\"db\"]\n[env]\nCOLOR = \"blue\"\n[update]\nmax_unavailable = 1\nhealthy_deadline = \"30s\"",
    );
    deploy(&c, 1, "web.toml", &update);
    let start = Instant::now();
    let mut lowest = 4;
    loop {
        let rows = c.ps(0, "web");
        // Count slots with a healthy allocation (a slot mid-update may list two).
        let slots: BTreeSet<u64> = healthy(&rows)
            .iter()
            .filter_map(|r| r["slot"].as_u64())
            .collect();
        lowest = lowest.min(slots.len());
        let done = rows.len() == 4
            && rows
                .iter()
                .all(|r| r["version"].as_u64() == Some(v1 + 1) && r["healthy"] == true);
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "rolling update did not finish: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lowest >= 3,
        "healthy replicas dropped to {lowest} during the update"
    );

    // rm: every slot goes and no process is left.
    let all = [pids(&c.ps(0, "web")), pids(&c.ps(0, "db"))].concat();
    assert_eq!(all.len(), 5);
    for svc in ["web", "db"] {
        let out = shoal(&["rm", svc, "--api", &c.agents[2].url()]);
        assert!(out.status.success());
    }
    wait_for("services removed", Duration::from_secs(30), || {
        c.services(0).is_empty().then_some(())
    });
    wait_for("no workload process left", Duration::from_secs(15), || {
        all.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    assert!(common::workload_pids(c.path()).is_empty());
    // Nothing of the services is left in the cluster state either.
    wait_for("no rollout status left", Duration::from_secs(15), || {
        let out = shoal(&[
            "kv",
            "ls",
            "node/",
            "-o",
            "json",
            "--api",
            &c.agents[0].url(),
        ]);
        let keys: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        keys.iter()
            .all(|k| {
                let key = k["key"].as_str().unwrap_or("");
                !key.contains("/rollout/") && !key.contains("/alloc/")
            })
            .then_some(())
    });
    let out = shoal(&[
        "kv",
        "ls",
        "alloc/",
        "-o",
        "json",
        "--api",
        &c.agents[0].url(),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = shoal(&["ps", "web", "--api", &c.agents[0].url()]);
    assert!(!out.status.success(), "ps of a removed service fails");
}

/// `kill -9` of an agent: its replica is placed elsewhere after `reschedule_after`.
/// A restarted agent adopts its processes (same pids) instead of restarting them.
#[test]
fn node_loss_reschedules_and_restart_adopts() {
    let mut c = Cluster::start(5);
    deploy(&c, 0, "web.toml", &web_spec("web", 3, ""));
    let rows = wait_healthy(&c, 0, "web", 3, Duration::from_secs(30));

    // Kill the agent of a replica that is not agent 0 (which we ask).
    let victim_name = rows
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .find(|n| *n != "n1")
        .unwrap()
        .to_string();
    let victim = c.agents.iter().position(|a| a.name == victim_name).unwrap();
    let killed = Instant::now();
    c.kill9(victim);
    // Until it is placed elsewhere, the lost replica is `unknown`, not `pending`:
    // it may still be serving.
    wait_for(
        "the lost replica shown as unknown",
        Duration::from_secs(20),
        || {
            c.ps(0, "web")
                .iter()
                .find(|r| {
                    r["node"] == victim_name.as_str()
                        && r["state"] == "unknown"
                        && r["reason"]
                            .as_str()
                            .is_some_and(|x| x.starts_with(&format!("node {victim_name} ")))
                })
                .map(|_| ())
        },
    );
    let after = wait_for(
        "replica replaced on a live node",
        Duration::from_secs(40),
        || {
            let rows = c.ps(0, "web");
            (rows.len() == 3
                && healthy(&rows).len() == 3
                && rows.iter().all(|r| r["node"] != victim_name.as_str()))
            .then_some(rows)
        },
    );
    let took = killed.elapsed();
    eprintln!("kill -9 to all replicas healthy elsewhere: {took:?}");
    let nodes: BTreeSet<&str> = after.iter().map(|r| r["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 3, "still spread: {after:?}");
    // The steward's reschedule is an event.
    wait_for("the reschedule in events", Duration::from_secs(10), || {
        let ev = events(&c, 0, &["web"]);
        ev.iter()
            .any(|e| {
                e["kind"] == "rescheduled"
                    && e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(&format!("moved from {victim_name} (down)")))
            })
            .then_some(())
    });

    // The steward dies: another node takes over by itself and acts on a new request.
    let steward = c
        .services(0)
        .into_iter()
        .find(|s| s["name"] == "web")
        .and_then(|s| s["steward"].as_str().map(str::to_string))
        .expect("web has a steward");
    let s = c.agents.iter().position(|a| a.name == steward).unwrap();
    let observer = (0..c.agents.len())
        .find(|&j| j != s && j != victim)
        .unwrap();
    c.kill9(s);
    let out = shoal(&["scale", "web", "4", "--api", &c.agents[observer].url()]);
    assert!(out.status.success());
    wait_for("a new steward scales web", Duration::from_secs(40), || {
        let rows = c.ps(observer, "web");
        (rows.len() == 4
            && healthy(&rows).len() == 4
            && rows
                .iter()
                .all(|r| r["node"] != steward.as_str() && r["node"] != victim_name.as_str()))
        .then_some(())
    });
    let now_steward = c
        .services(observer)
        .into_iter()
        .find(|s| s["name"] == "web")
        .and_then(|s| s["steward"].as_str().map(str::to_string));
    assert!(
        now_steward.is_some_and(|n| n != steward),
        "stewardship moved"
    );

    // Adoption: a long reschedule_after so the restart does not move anything.
    deploy(
        &c,
        observer,
        "api.toml",
        &web_spec("api", 4, "").replace("reschedule_after = \"2s\"", "reschedule_after = \"5m\""),
    );
    let rows = wait_healthy(&c, observer, "api", 4, Duration::from_secs(30));
    let node = rows
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .find(|n| *n != c.agents[observer].name)
        .unwrap()
        .to_string();
    let i = c.agents.iter().position(|a| a.name == node).unwrap();
    let mine: Vec<(u64, String)> = rows
        .iter()
        .filter(|r| r["node"] == node.as_str())
        .map(|r| {
            (
                r["slot"].as_u64().unwrap(),
                r["handle"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(c.terminate(i), "graceful stop");
    for (_, pid) in &mine {
        assert!(
            pid_alive(pid.parse().unwrap()),
            "workloads outlive their agent"
        );
    }
    // Its usual seed (agent 0) may be one of the agents killed above.
    c.agents[i].join = vec![c.agents[observer].quic];
    c.spawn(i);
    let again = wait_for(
        "restarted agent reports its replicas",
        Duration::from_secs(30),
        || {
            let rows = c.ps(observer, "api");
            let ok = rows.len() == 4
                && healthy(&rows).len() == 4
                && mine.iter().all(|(slot, pid)| {
                    rows.iter().any(|r| {
                        r["slot"].as_u64() == Some(*slot)
                            && r["node"] == node.as_str()
                            && r["handle"].as_str() == Some(pid.as_str())
                    })
                });
            ok.then_some(rows)
        },
    );
    for r in again.iter().filter(|r| r["node"] == node.as_str()) {
        assert_eq!(r["restarts"], 0, "adopted, not restarted: {r}");
    }

    // A surge update (max_surge = 1): new replicas start beside the old ones, so
    // every slot keeps a healthy replica throughout.
    let surge = web_spec(
        "api",
        4,
        "[env]\nCOLOR = \"green\"\n[update]\nmax_surge = 1\nhealthy_deadline = \"30s\"",
    )
    .replace("reschedule_after = \"2s\"", "reschedule_after = \"5m\"");
    deploy(&c, observer, "api.toml", &surge);
    let start = Instant::now();
    let mut lowest = 4;
    let mut saw_surge = false;
    loop {
        let rows = c.ps(observer, "api");
        let slots: BTreeSet<u64> = healthy(&rows)
            .iter()
            .filter_map(|r| r["slot"].as_u64())
            .collect();
        lowest = lowest.min(slots.len());
        saw_surge |= rows.iter().any(|r| r["next"] == true);
        if rows.len() == 4
            && rows
                .iter()
                .all(|r| r["version"] == 2 && r["healthy"] == true)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "surge update did not finish: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(saw_surge, "new replicas start beside the old ones");
    assert_eq!(
        lowest, 4,
        "a surge update never leaves a slot without a healthy replica"
    );
}

/// A replica that crashes is restarted by its agent with backoff, and `shoal logs`
/// shows its output.
#[test]
fn crashed_replicas_restart_and_logs_are_served() {
    let mut c = Cluster::start(3);
    let spec = r#"name = "crashy"
driver = "process"
command = ["sh", "-c", "echo starting up; exit 3"]
replicas = 1
restart = "on-failure"
restart_backoff = "200ms"
restart_backoff_max = "1s"
"#;
    deploy(&c, 0, "crashy.toml", spec);
    wait_for(
        "restarts counted, with the exit reason",
        Duration::from_secs(30),
        || {
            c.ps(0, "crashy").into_iter().find(|r| {
                r["restarts"].as_u64().is_some_and(|n| n >= 2)
                    && r["reason"]
                        .as_str()
                        .is_some_and(|x| x.contains("exited with code 3"))
            })
        },
    );
    // Asked of an agent that does not run it: the logs come over the mesh from the one that does.
    let runs_it = c.ps(0, "crashy")[0]["node"].as_str().unwrap().to_string();
    let other = c.agents.iter().position(|a| a.name != runs_it).unwrap();
    let out = shoal(&["logs", "crashy", "--api", &c.agents[other].url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Restarts are events, with the exit reason.
    wait_for("restarts in events", Duration::from_secs(10), || {
        let ev = events(&c, 0, &["crashy", "--kind", "restart"]);
        ev.iter()
            .any(|e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("exited with code 3"))
            })
            .then_some(())
    });
    // Every run's output is kept: the crash output survives the restart after it.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.matches("starting up").count() >= 2, "{text}");

    // --follow keeps printing what later restarts write.
    let before = text.matches("starting up").count();
    let mut follow = std::process::Command::new(common::SHOAL)
        .args(["logs", "crashy", "--follow", "--api", &c.agents[1].url()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    follow.kill().unwrap();
    let out = follow.wait_with_output().unwrap();
    let followed = String::from_utf8_lossy(&out.stdout);
    assert!(
        followed.matches("starting up").count() > before,
        "follow printed nothing new: {followed}"
    );

    // A successful exit with on-failure stays exited.
    let once = r#"name = "once"
driver = "process"
command = ["true"]
replicas = 1
restart = "on-failure"
"#;
    deploy(&c, 1, "once.toml", once);
    let row = wait_for("exited for good", Duration::from_secs(20), || {
        c.ps(0, "once").into_iter().find(|r| r["state"] == "exited")
    });
    assert_eq!(row["restarts"], 0);

    // A new version that never gets healthy stalls its rollout: `deploy --wait`
    // fails and says so, and the old replicas keep serving.
    let good = web_spec(
        "roll",
        2,
        "[update]\nmax_unavailable = 1\nhealthy_deadline = \"3s\"",
    );
    let out = c.deploy_wait(0, "roll.toml", &good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = good.replace(
        r#"command = ["shoal", "workload", "http", "--bind", "127.0.0.1"]"#,
        r#"command = ["sh", "-c", "sleep 600"]"#,
    );
    let out = c.deploy_wait(0, "roll.toml", &bad);
    assert!(
        !out.status.success(),
        "a broken version must not report success"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stalled"), "{err}");
    let rows = c.ps(0, "roll");
    let old_healthy = rows
        .iter()
        .filter(|r| r["version"] == 1 && r["healthy"] == true)
        .count();
    assert!(old_healthy >= 1, "old replicas keep serving: {rows:?}");
    let services = c.services(0);
    let roll = services.iter().find(|s| s["name"] == "roll").unwrap();
    assert_eq!(roll["rollout"]["state"], "stalled", "{roll}");

    // Replicas that fit nowhere stay pending and say why, per filter.
    let huge = r#"name = "huge"
driver = "process"
command = ["true"]
replicas = 2
constraints = ["zone == mars"]
[resources]
memory = "100Ti"
"#;
    deploy(&c, 2, "huge.toml", huge);
    let rows = wait_for(
        "unplaceable replicas explained",
        Duration::from_secs(20),
        || {
            let rows = c.ps(0, "huge");
            (rows.len() == 2 && rows.iter().all(|r| r["reason"].is_string())).then_some(rows)
        },
    );
    for r in &rows {
        assert_eq!(r["state"], "pending");
        assert!(r["node"].is_null());
        let reason = r["reason"].as_str().unwrap();
        assert!(reason.starts_with("0/3 nodes fit"), "{reason}");
        assert!(reason.contains("zone"), "{reason}");
    }
    let table = shoal(&["services", "--api", &c.agents[0].url()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("NAME") && text.contains("huge"), "{text}");

    // Logs of a replica whose agent just died (not yet declared down): a clear
    // error naming that node, and exit 1 as no slot could be read.
    let runs_it = c.ps(0, "crashy")[0]["node"].as_str().unwrap().to_string();
    let dead = c.agents.iter().position(|a| a.name == runs_it).unwrap();
    let ask = c.agents.iter().position(|a| a.name != runs_it).unwrap();
    c.kill9(dead);
    let out = shoal(&["logs", "crashy", "--api", &c.agents[ask].url()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("crashy slot 0 on {runs_it}: "))
            && (err.contains("did not answer") || err.contains("is down")),
        "{err}"
    );
}

/// A node cut off (here: frozen with SIGSTOP, so it neither answers nor acts) loses
/// its replicas to the others after `reschedule_after`; when it comes back it finds
/// them placed elsewhere and stops its own copies, so each slot ends up run once.
#[test]
fn returning_node_stops_its_replaced_copies() {
    let c = Cluster::start(4);
    deploy(&c, 0, "web.toml", &web_spec("web", 3, ""));
    let rows = wait_healthy(&c, 0, "web", 3, Duration::from_secs(30));
    let node = rows
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .find(|n| *n != "n1")
        .unwrap()
        .to_string();
    let i = c.agents.iter().position(|a| a.name == node).unwrap();
    let pids_there: Vec<i32> = rows
        .iter()
        .filter(|r| r["node"] == node.as_str())
        .filter_map(|r| r["handle"].as_str()?.parse().ok())
        .collect();
    assert!(!pids_there.is_empty());
    let agent_pid = c.agents[i].pid().unwrap().to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &agent_pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    wait_for(
        "replicas replaced while the node is away",
        Duration::from_secs(40),
        || {
            let rows = c.ps(0, "web");
            (rows.len() == 3
                && healthy(&rows).len() == 3
                && rows.iter().all(|r| r["node"] != node.as_str()))
            .then_some(())
        },
    );
    // Its copies still run meanwhile: nothing could tell them to stop.
    assert!(pids_there.iter().all(|p| pid_alive(*p)));
    signal("-CONT");
    wait_for(
        "the returning node stops its copies",
        Duration::from_secs(40),
        || pids_there.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
    wait_for(
        "the node is back and alive",
        Duration::from_secs(40),
        || (c.status_of(0, &node).as_deref() == Some("alive")).then_some(()),
    );
    let rows = c.ps(0, "web");
    assert_eq!(healthy(&rows).len(), 3, "{rows:?}");
    // Every slot is run by exactly one process.
    let live = common::workload_pids(c.path())
        .into_iter()
        .filter(|p| pid_alive(*p))
        .count();
    assert_eq!(live, 3, "one process per slot after the node came back");
}

/// Many replicas on few agents: each slot runs exactly one process cluster-wide,
/// the API keeps answering, and `rm` stops every one of them. (Latency and CPU at
/// 100/300/1,000 replicas are measured by `shoal bench replicas`.)
#[test]
fn many_replicas_run_once_each_and_rm_stops_them_all() {
    let c = Cluster::start(3);
    let spec =
        "name = \"many\"\ndriver = \"process\"\ncommand = [\"sleep\", \"3600\"]\nreplicas = 300\n\
                [resources]\ncpu = \"1m\"\nmemory = \"1Mi\"\n";
    let out = c.deploy_wait(0, "many.toml", spec);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every slot once: as many live workload process groups as slots, one per slot.
    let rows = c.ps(1, "many");
    assert_eq!(rows.len(), 300);
    let handles: BTreeSet<&str> = rows.iter().filter_map(|r| r["handle"].as_str()).collect();
    assert_eq!(handles.len(), 300, "one distinct process per slot");
    std::thread::sleep(Duration::from_secs(3));
    let live: Vec<i32> = common::workload_pids(c.path())
        .into_iter()
        .filter(|p| pid_alive(*p))
        .collect();
    assert_eq!(live.len(), 300, "no slot runs twice");
    for i in 0..3 {
        assert!(
            !c.nodes(i).iter().any(|n| n["status"] != "alive"),
            "agent {i} lost sight of a peer under load: {:?}",
            c.nodes(i)
        );
    }
    shoal(&["rm", "many", "--api", &c.agents[2].url()]);
    wait_for("every replica stopped", Duration::from_secs(60), || {
        common::workload_pids(c.path())
            .iter()
            .all(|p| !pid_alive(*p))
            .then_some(())
    });
}

/// A `depends_on` typo is accepted, with a warning at deploy and the reason on
/// every pending replica, instead of waiting for ever without a word.
#[test]
fn an_unknown_dependency_is_named() {
    let c = Cluster::start(1);
    let path = c.write_spec("web.toml", &web_spec("web", 2, "depends_on = [\"dbb\"]"));
    let out = shoal(&["deploy", &path, "--api", &c.agents[0].url()]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: dependency dbb does not exist"),
        "{err}"
    );
    wait_for(
        "the reason on the pending slots",
        Duration::from_secs(20),
        || {
            let rows = c.ps(0, "web");
            (rows.len() == 2
                && rows
                    .iter()
                    .all(|r| r["reason"] == "dependency dbb does not exist"))
            .then_some(())
        },
    );
}

/// `shoal deploy -` reads the spec from stdin (for `envsubst < web.toml | shoal
/// deploy -` and the like); an empty stdin is a spec error, not a silent no-op.
/// `shoal completions` prints scripts for the shells clap knows.
#[test]
fn deploy_reads_stdin_and_completions_print_scripts() {
    use std::io::Write as _;
    let c = Cluster::start(1);
    let run = |input: &str| {
        let mut child = std::process::Command::new(common::SHOAL)
            .args([
                "deploy",
                "-",
                "--wait",
                "--timeout",
                "60",
                "--api",
                &c.agents[0].url(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&web_spec("piped", 1, ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(healthy(&c.ps(0, "piped")).len(), 1);
    let out = run("");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("service spec stdin"), "{err}");

    for (shell, marker) in [
        ("bash", "_shoal()"),
        ("zsh", "#compdef shoal"),
        ("fish", "complete -c shoal"),
    ] {
        let out = common::shoal_ok(&["completions", shell]);
        assert!(
            out.contains(marker) && out.contains("deploy"),
            "{shell}: {out:.200}"
        );
    }
    let out = shoal(&["completions", "tcsh"]);
    assert_ne!(out.status.code(), Some(0));
}

/// `shoal ps` with no service lists every allocation of the cluster with its
/// service, `--node` keeps those on one node (an unknown node is an error, not an
/// empty list); `scale --wait` returns once the new count is healthy and `rm
/// --wait` once every replica has stopped and the service is gone.
#[test]
fn ps_lists_the_cluster_and_scale_and_rm_wait() {
    let c = Cluster::start(3);
    let api = c.agents[0].url();
    for (name, n) in [("web", 2), ("api", 1)] {
        let out = c.deploy_wait(0, &format!("{name}.toml"), &web_spec(name, n, ""));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    shoal_ok(&[
        "scale",
        "web",
        "4",
        "--wait",
        "--timeout",
        "60",
        "--api",
        &api,
    ]);
    // --wait means healthy now, not eventually.
    assert_eq!(healthy(&c.ps(0, "web")).len(), 4);

    let all = |extra: &[&str]| -> Vec<Value> {
        let args = [&["ps", "-o", "json", "--api", &api][..], extra].concat();
        serde_json::from_str(&shoal_ok(&args)).unwrap()
    };
    let rows = all(&[]);
    let count = |svc: &str| rows.iter().filter(|r| r["service"] == svc).count();
    assert_eq!(
        (count("web"), count("api"), rows.len()),
        (4, 1, 5),
        "{rows:?}"
    );
    assert!(rows
        .iter()
        .all(|r| r["healthy"] == true && r["slot"].is_u64()));
    let mut per_node = 0;
    for a in &c.agents {
        let on = all(&["--node", &a.name]);
        assert!(on.iter().all(|r| r["node"] == a.name.as_str()), "{on:?}");
        per_node += on.len();
    }
    assert_eq!(per_node, 5, "--node splits the cluster's allocations");
    let table = shoal_ok(&["ps", "--api", &api]);
    assert!(table.starts_with("SERVICE"), "{table}");
    for args in [
        &["ps", "--node", "nosuch"][..],
        &["ps", "web", "--node", "nosuch"],
    ] {
        let out = shoal(&[args, &["--api", &api]].concat());
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no node named \"nosuch\""),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let on = &c.agents[1].name;
    let web_on: Vec<Value> = serde_json::from_str(&shoal_ok(&[
        "ps", "web", "--node", on, "-o", "json", "--api", &api,
    ]))
    .unwrap();
    assert_eq!(
        web_on.len(),
        rows.iter()
            .filter(|r| r["service"] == "web" && r["node"] == on.as_str())
            .count()
    );

    let web = pids(&c.ps(0, "web"));
    assert_eq!(web.len(), 4);
    shoal_ok(&["rm", "web", "--wait", "--timeout", "60", "--api", &api]);
    assert!(
        web.iter().all(|p| !pid_alive(*p)),
        "rm --wait returned with replicas running"
    );
    assert!(c.services(0).iter().all(|s| s["name"] != "web"));
    assert_eq!(all(&[]).len(), 1, "only api's replica is left");
}

/// A bad deploy is undone two ways: deploying the good spec again keeps the replicas
/// still running it (same pids), and `rollback --to` goes back further; `history`
/// lists what each kept version changed, and versions no longer kept are refused by
/// name.
#[test]
fn rollback_and_redeploy_keep_replicas_already_on_the_spec() {
    let c = Cluster::start(3);
    let api = c.agents[0].url();
    let mode = |m: &str| web_spec("web", 3, &format!("env = {{ MODE = \"{m}\" }}"));
    for (file, text) in [("v1.toml", mode("one")), ("v2.toml", mode("two"))] {
        let out = c.deploy_wait(0, file, &text);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let by_slot = |rows: &[Value]| -> std::collections::BTreeMap<u64, (u64, i32)> {
        rows.iter()
            .filter(|r| r["next"] == false)
            .map(|r| {
                (
                    r["slot"].as_u64().unwrap(),
                    (
                        r["version"].as_u64().unwrap_or(0),
                        r["handle"]
                            .as_str()
                            .and_then(|h| h.parse().ok())
                            .unwrap_or(0),
                    ),
                )
            })
            .collect()
    };
    let good = by_slot(&wait_healthy(&c, 0, "web", 3, Duration::from_secs(30)));
    assert!(good.values().all(|(v, _)| *v == 2), "{good:?}");

    // Version 3 cannot start (an unknown flag): one slot is replaced and stays broken,
    // the rollout goes no further (max_unavailable = 1).
    let bad = mode("three").replace("\"127.0.0.1\"]", "\"127.0.0.1\", \"--no-such-flag\"]");
    deploy(&c, 0, "v3.toml", &bad);
    let broken = wait_for(
        "one slot on the broken version 3",
        Duration::from_secs(30),
        || {
            let rows = c.ps(0, "web");
            let now = by_slot(&rows);
            let on_v3: Vec<u64> = now
                .iter()
                .filter(|(_, (v, _))| *v == 3)
                .map(|(s, _)| *s)
                .collect();
            (on_v3.len() == 1 && healthy(&rows).len() == 2).then(|| on_v3[0])
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        healthy(&c.ps(0, "web")).len(),
        2,
        "the rollout went on past a broken replica"
    );

    // Deploying v2's spec again: the two replicas still on it keep running as
    // version 4; only the broken slot gets a new replica.
    let out = c.deploy_wait(0, "v2.toml", &mode("two"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = by_slot(&c.ps(0, "web"));
    for (slot, (version, pid)) in &after {
        assert_eq!(*version, 4, "slot {slot}: {after:?}");
        if *slot != broken {
            assert_eq!(
                *pid, good[slot].1,
                "slot {slot} was restarted: {good:?} -> {after:?}"
            );
        }
    }
    assert!(after.values().all(|(_, p)| pid_alive(*p)));

    // history: newest first, with what each version changed.
    let history: Vec<Value> =
        serde_json::from_str(&shoal_ok(&["history", "web", "-o", "json", "--api", &api])).unwrap();
    let versions: Vec<u64> = history
        .iter()
        .map(|h| h["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [4, 3, 2, 1]);
    assert_eq!(history[0]["current"], true);
    assert_eq!(history[0]["changed"], serde_json::json!(["command", "env"]));
    assert_eq!(history[2]["changed"], serde_json::json!(["env"]));
    assert!(shoal_ok(&["history", "web", "--api", &api]).starts_with("VERSION"));

    // rollback --to 1: a changed workload, so every replica is replaced.
    shoal_ok(&[
        "rollback",
        "web",
        "--to",
        "1",
        "--wait",
        "--timeout",
        "60",
        "--api",
        &api,
    ]);
    let v5 = by_slot(&wait_healthy(&c, 0, "web", 3, Duration::from_secs(30)));
    assert!(v5.values().all(|(v, _)| *v == 5), "{v5:?}");
    assert!(v5.iter().all(|(s, (_, p))| *p != after[s].1));
    let history: Vec<Value> =
        serde_json::from_str(&shoal_ok(&["history", "web", "-o", "json", "--api", &api])).unwrap();
    assert_eq!(history[0]["spec"]["env"]["MODE"], "one");

    for (to, says) in [
        (
            "1",
            "service web keeps no version 1: it runs version 5, and keeps 5, 4, 3 and 2",
        ),
        ("5", "service web already runs the spec of version 5"),
    ] {
        let out = shoal(&["rollback", "web", "--to", to, "--api", &api]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "--to {to}: {err}");
    }
    let out = shoal(&["rollback", "nosuch", "--api", &api]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named \"nosuch\""));
}

/// `node drain --wait` moves every replica off a node without a slot ever going
/// unhealthy, the drained node takes no new placements (shown in `nodes`), and
/// once undrained it takes them again.
#[test]
fn drain_moves_replicas_off_without_losing_health_and_undrain_takes_placements() {
    let c = Cluster::start(3);
    let api = c.agents[0].url();
    let out = c.deploy_wait(0, "web.toml", &web_spec("web", 3, ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = c.agents[1].name.clone();
    let rows = c.ps(0, "web");
    let on_target: Vec<i32> = pids(
        &rows
            .iter()
            .filter(|r| r["node"] == target.as_str())
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        on_target.len(),
        1,
        "spread puts one replica per node: {rows:?}"
    );

    let drain = {
        let api = api.clone();
        let target = target.clone();
        std::thread::spawn(move || {
            shoal(&[
                "node",
                "drain",
                &target,
                "--wait",
                "--timeout",
                "60",
                "--api",
                &api,
            ])
        })
    };
    let mut fewest = usize::MAX;
    while !drain.is_finished() {
        let rows = c.ps(0, "web");
        if !rows.is_empty() {
            let slots: BTreeSet<u64> = healthy(&rows)
                .iter()
                .filter_map(|r| r["slot"].as_u64())
                .collect();
            fewest = fewest.min(slots.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = drain.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fewest, 3, "a slot went unhealthy during the drain");
    let rows = c.ps(0, "web");
    assert_eq!(healthy(&rows).len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|r| r["node"] != target.as_str()),
        "{rows:?}"
    );
    assert!(!pid_alive(on_target[0]), "the replaced replica still runs");

    let nodes: Vec<Value> =
        serde_json::from_str(&shoal_ok(&["nodes", "-o", "json", "--api", &api])).unwrap();
    for n in &nodes {
        assert_eq!(n["draining"], n["name"] == target.as_str(), "{n}");
    }
    assert!(shoal_ok(&["nodes", "--api", &api]).contains("alive,draining"));
    let status: Value = serde_json::from_str(&shoal_ok(&[
        "node", "status", &target, "-o", "json", "--api", &api,
    ]))
    .unwrap();
    assert_eq!(
        (status["draining"].clone(), status["left"].clone()),
        (Value::Bool(true), serde_json::json!([]))
    );

    // Drained: a scale-up places nothing there.
    shoal_ok(&[
        "scale",
        "web",
        "5",
        "--wait",
        "--timeout",
        "60",
        "--api",
        &api,
    ]);
    assert!(c.ps(0, "web").iter().all(|r| r["node"] != target.as_str()));

    // Undrained: it is the emptiest node, so spread fills it first.
    let out = shoal_ok(&["node", "undrain", &target, "--api", &api]);
    assert!(out.contains("undrained"), "{out}");
    let out = shoal_ok(&["node", "undrain", &target, "--api", &api]);
    assert!(out.contains("was not drained"), "{out}");
    shoal_ok(&[
        "scale",
        "web",
        "7",
        "--wait",
        "--timeout",
        "60",
        "--api",
        &api,
    ]);
    assert!(c.ps(0, "web").iter().any(|r| r["node"] == target.as_str()));

    let out = shoal(&["node", "drain", "nosuch", "--api", &api]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named \"nosuch\""));
}

/// `deploy --wait` gives up with the reason, long before `healthy_deadline` or
/// `--timeout`, when the driver refuses every start or nothing can be placed.
#[test]
fn deploy_wait_fails_fast_with_the_reason() {
    let c = Cluster::start(2);
    let missing = web_spec("ghost", 2, "[update]\nhealthy_deadline = \"10m\"").replace(
        "[\"shoal\", \"workload\"",
        "[\"/nonexistent/shoal-ghost\", \"workload\"",
    );
    let out = c.deploy_wait(0, "ghost.toml", &missing);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stalled")
            && err.contains("cannot start")
            && err.contains("/nonexistent/shoal-ghost"),
        "{err}"
    );
    let huge = web_spec("huge", 2, "").replace("memory = \"32Mi\"", "memory = \"900Ti\"");
    let out = c.deploy_wait(0, "huge.toml", &huge);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no replica of huge version 1 can be placed")
            && err.contains("insufficient memory"),
        "{err}"
    );
    // Both are events: the stalled rollout and the failed placement.
    wait_for(
        "stall and placement failure in events",
        Duration::from_secs(10),
        || {
            let ev = events(&c, 0, &["--limit", "100"]);
            let has = |svc: &str, kind: &str, what: &str| {
                ev.iter().any(|e| {
                    e["service"] == svc
                        && e["kind"] == kind
                        && e["reason"].as_str().is_some_and(|r| r.contains(what))
                })
            };
            (has("ghost", "rollout stalled", "cannot start")
                && has("huge", "placement failed", "insufficient memory"))
            .then_some(())
        },
    );
    let table = shoal_ok(&["events", "--api", &c.agents[0].url()]);
    assert!(
        table.starts_with("TIME") && table.contains("rollout stalled"),
        "{table}"
    );
    // With -o json, an error is JSON on stderr too.
    let out = shoal(&["ps", "nosuch", "-o", "json", "--api", &c.agents[0].url()]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(err["error"], "no service named \"nosuch\"");
    assert_eq!(err["status"], 404);
    let out = shoal(&["nodes", "-o", "json", "--api", "http://127.0.0.1:1"]);
    let err: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert!(
        err["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{err}"
    );
    // Progress lines while waiting.
    let out = c.deploy_wait(0, "web.toml", &web_spec("web", 2, ""));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("replicas of version 1 healthy"));
}

/// The example systemd unit is one systemd accepts without a warning, with the
/// settings an agent needs (its workloads survive an agent restart).
#[test]
fn the_example_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/systemd/shoal-agent.service"
    ))
    .unwrap();
    for line in [
        "KillMode=process",
        "ExecStart=/usr/local/bin/shoal agent --config /etc/shoal/agent.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shoal-agent.service");
    // verify wants the binary to exist: point it at the one under test.
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/shoal", env!("CARGO_BIN_EXE_shoal")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd; ./scripts/test installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// Logs of replicas on other machines come over the mesh from the agents that run
/// them, not through those agents' HTTP APIs (here one requires a token the asked
/// agent does not have); `-o json` gives JSON lines; `--follow` picks up a slot added
/// meanwhile; a slot whose node is down is one line on stderr while the others print.
#[test]
fn logs_travel_over_the_mesh_and_a_down_node_is_one_line() {
    let mut c = Cluster::new(3);
    let token = c.path().join("api.token");
    std::fs::write(&token, "an-api-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    c.agents[1].extra = vec!["--api-token-file".into(), token.to_str().unwrap().into()];
    c.spawn(0);
    c.spawn_detached(1);
    c.spawn(2);
    let names: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
    wait_for("3 alive", Duration::from_secs(20), || {
        let nodes = c.nodes(0);
        names
            .iter()
            .all(|n| {
                nodes
                    .iter()
                    .any(|v| v["name"] == n.as_str() && v["status"] == "alive")
            })
            .then_some(())
    });
    let api = c.agents[0].url();
    // Replicas stay on a dead node (no reschedule within the test).
    let spec =
        web_spec("web", 3, "").replace("reschedule_after = \"2s\"", "reschedule_after = \"10m\"");
    let out = c.deploy_wait(0, "web.toml", &spec);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = c.ps(0, "web");
    let nodes_of: BTreeSet<&str> = rows.iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(nodes_of.len(), 3, "one replica per node: {rows:?}");

    let lines = |extra: &[&str]| -> Vec<Value> {
        let args = [&["logs", "web", "-o", "json", "--api", &api][..], extra].concat();
        shoal_ok(&args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    };
    let all = lines(&[]);
    let from: BTreeSet<&str> = all
        .iter()
        .filter(|l| {
            l["line"]
                .as_str()
                .is_some_and(|x| x.contains("listening on"))
        })
        .filter_map(|l| l["node"].as_str())
        .collect();
    assert_eq!(
        from.len(),
        3,
        "every node's replica, the token-guarded one included: {all:?}"
    );

    // --follow sees the slot a scale-up adds.
    let mut follow = std::process::Command::new(common::SHOAL)
        .args(["logs", "web", "--follow", "-o", "json", "--api", &api])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    shoal_ok(&[
        "scale",
        "web",
        "4",
        "--wait",
        "--timeout",
        "60",
        "--api",
        &api,
    ]);
    std::thread::sleep(Duration::from_secs(3));
    follow.kill().unwrap();
    let out = follow.wait_with_output().unwrap();
    let followed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        followed.iter().any(|l| l["slot"] == 3
            && l["line"]
                .as_str()
                .is_some_and(|x| x.contains("listening on"))),
        "{followed:?}"
    );

    // Agent 2's node goes down: its slot is one line on stderr, the rest print.
    let dead = c.agents[2].name.clone();
    c.kill9(2);
    wait_for("the node down", Duration::from_secs(20), || {
        (c.status_of(0, &dead).as_deref() == Some("down")).then_some(())
    });
    let out = shoal(&["logs", "web", "--api", &api]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let on_dead = c
        .ps(0, "web")
        .iter()
        .filter(|r| r["node"] == dead.as_str())
        .count();
    assert!(on_dead >= 1);
    assert_eq!(err.lines().count(), on_dead, "{err}");
    assert!(err.contains(&format!("node {dead} is down")), "{err}");
    assert!(
        stdout.matches("listening on").count() >= 4 - on_dead,
        "{stdout}"
    );
}

/// The dashboard in a real browser: headless Chromium loads `/` from one agent of a
/// 3-agent mesh, runs its script, and the rendered DOM shows every member with its
/// zone and utilisation bars, the service with its healthy count, its replicas per
/// node, each agent's plugins, and a restart among the recent events.
#[test]
fn the_dashboard_renders_the_cluster_in_chromium() {
    let c = Cluster::start(3);
    let out = c.deploy_wait(0, "web.toml", &web_spec("web", 3, ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deploy(
        &c,
        0,
        "crashy.toml",
        "name = \"crashy\"\ndriver = \"process\"\ncommand = [\"sh\", \"-c\", \"exit 3\"]\nreplicas = 1\nrestart_backoff = \"200ms\"\n",
    );
    wait_for("a restart event", Duration::from_secs(20), || {
        shoal_ok(&[
            "events",
            "--kind",
            "restart",
            "-o",
            "json",
            "--api",
            &c.agents[0].url(),
        ])
        .contains("crashy")
        .then_some(())
    });
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok()
        })
        .expect("chromium is not installed: apt-get install chromium (./scripts/test installs it)");
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("{}/", c.agents[1].url()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page never rendered:\n{dom}"
    );
    for a in &c.agents {
        assert!(
            dom.contains(&format!("data-node=\"{}\" data-status=\"alive\"", a.name)),
            "member {} missing:\n{dom}",
            a.name
        );
        assert!(
            dom.contains(&format!(
                "data-replicas=\"web@{}\" title=\"1 of 1 healthy\">1</td>",
                a.name
            )),
            "web's replica on {} missing:\n{dom}",
            a.name
        );
        assert!(
            dom.contains(&format!("data-plugin=\"{}/scheduler\"", a.name)),
            "{dom}"
        );
    }
    assert!(
        dom.contains("data-service=\"web\" data-healthy=\"3\" data-desired=\"3\""),
        "{dom}"
    );
    assert!(
        dom.contains("class=\"bar") && dom.contains("data-pct="),
        "no utilisation bars:\n{dom}"
    );
    assert!(
        dom.contains("data-event=\"restart\""),
        "no restart event:\n{dom}"
    );
    assert!(
        dom.contains("<span id=\"error\" class=\"err\"></span>"),
        "the page shows an error:\n{dom}"
    );
}

/// `node forget` takes a dead node out of every agent's member list and drops its
/// records; a live node is refused; started again, the node is a member again.
#[test]
fn a_dead_node_is_forgotten_everywhere_and_comes_back_when_restarted() {
    let mut c = Cluster::start(3);
    let api = c.agents[0].url();
    let dead = c.agents[2].name.clone();
    c.kill9(2);
    wait_for("the node down", Duration::from_secs(20), || {
        (c.status_of(0, &dead).as_deref() == Some("down")).then_some(())
    });
    let out = shoal(&["node", "forget", &c.agents[1].name, "--api", &api]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is alive: only a down or left node"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shoal(&["node", "forget", "nosuch", "--api", &api]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named \"nosuch\""));
    shoal_ok(&["node", "forget", &dead, "--api", &api]);
    let internal = |i: usize| -> Vec<Value> {
        let prefix = format!("node/{dead}/");
        serde_json::from_str(&shoal_ok(&[
            "kv",
            "ls",
            &prefix,
            "--internal",
            "-o",
            "json",
            "--api",
            &c.agents[i].url(),
        ]))
        .unwrap()
    };
    wait_for(
        "forgotten on both live agents",
        Duration::from_secs(20),
        || {
            (0..2)
                .all(|i| {
                    c.nodes(i).iter().all(|n| n["name"] != dead.as_str()) && internal(i).is_empty()
                })
                .then_some(())
        },
    );
    // Started again, it joins as a new generation.
    c.spawn(2);
    wait_for("the node back", Duration::from_secs(30), || {
        (c.status_of(0, &dead).as_deref() == Some("alive")).then_some(())
    });
}

/// A compose file: `deploy compose.yaml` creates every service with what the file
/// says, `compose import --out` writes specs `deploy` accepts and keeps existing
/// files, and a file with something shoal cannot honour deploys nothing and names it.
#[test]
fn compose_files_deploy_and_import_and_refuse_by_name() {
    let c = Cluster::start(1);
    let api = c.agents[0].url();
    let compose = c.write_spec(
        "compose.yaml",
        r#"services:
  db:
    image: postgres:16
    environment: { POSTGRES_PASSWORD: example }
    healthcheck: { test: ["CMD", "pg_isready"], interval: 5s }
  web:
    image: shop/web:1.2
    ports: ["8080:80"]
    depends_on: { db: { condition: service_healthy } }
    deploy: { replicas: 3, resources: { reservations: { cpus: "0.25", memory: 128m } } }
    container_name: web
"#,
    );
    let out = shoal(&["deploy", &compose, "--api", &api]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("`container_name`: ignored"));
    let names: Vec<String> = c
        .services(0)
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["db", "web"]);
    let history: Vec<Value> =
        serde_json::from_str(&shoal_ok(&["history", "web", "-o", "json", "--api", &api])).unwrap();
    let spec = &history[0]["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["depends_on"], serde_json::json!(["db"]));
    assert_eq!(spec["ports"][0]["host_port"], 8080);

    // import --out writes specs `deploy` takes, and keeps what is there.
    let dir = c.path().join("specs");
    shoal_ok(&[
        "compose",
        "import",
        &compose,
        "--out",
        dir.to_str().unwrap(),
    ]);
    let out = shoal(&[
        "compose",
        "import",
        &compose,
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = shoal(&[
        "deploy",
        dir.join("web.toml").to_str().unwrap(),
        "--api",
        &api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "the same spec"
    );

    let bad = c.write_spec(
        "bad.yaml",
        "services:\n  cache:\n    image: redis:7\n    volumes: [\"data:/data\"]\n    build: .\n",
    );
    let out = shoal(&["deploy", &bad, "--api", &api]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`volumes`") && err.contains("`build`"),
        "{err}"
    );
    assert!(
        c.services(0).iter().all(|s| s["name"] != "cache"),
        "nothing deployed"
    );
}
