//! The process driver against real processes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{free_port, pid_is_running, pid_start_ticks, wait_for};
use shoal_runtime::{
    Driver, DriverError, LogQuery, PortSpec, ProcessDriver, Protocol, RunState, WorkloadKind,
    WorkloadSpec, WorkloadStatus,
};

const WAIT: Duration = Duration::from_secs(10);

fn spec(alloc: &str, command: &[&str]) -> WorkloadSpec {
    WorkloadSpec {
        service: "svc".into(),
        slot: 2,
        version: 5,
        alloc_id: alloc.into(),
        kind: WorkloadKind::Process {
            command: command.iter().map(|s| s.to_string()).collect(),
        },
        env: BTreeMap::new(),
        ports: vec![],
        cpu_millis: None,
        memory_bytes: None,
        labels: BTreeMap::new(),
    }
}

fn sh(alloc: &str, script: &str) -> WorkloadSpec {
    spec(alloc, &["sh", "-c", script])
}

fn pid(st: &WorkloadStatus) -> i32 {
    st.handle.parse().expect("process handle is a pid")
}

async fn log_text(d: &ProcessDriver, alloc: &str) -> String {
    String::from_utf8_lossy(&d.logs(alloc, LogQuery::all()).await.expect("logs").bytes).into_owned()
}

async fn wait_log(d: &ProcessDriver, alloc: &str, needle: &str) -> String {
    wait_for(
        &format!("{needle:?} in the log of {alloc}"),
        WAIT,
        || async {
            let text = log_text(d, alloc).await;
            text.contains(needle).then_some(text)
        },
    )
    .await
}

async fn wait_state(d: &ProcessDriver, alloc: &str, want: &RunState) -> WorkloadStatus {
    wait_for(&format!("{alloc} to be {want}"), WAIT, || async {
        d.status(alloc)
            .await
            .expect("status")
            .filter(|s| &s.state == want)
    })
    .await
}

#[tokio::test]
async fn env_and_output_reach_the_workload_and_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    let mut s = sh(
        "env1",
        "echo \"hello $GREETING\"; echo to-stderr >&2; echo \"alloc=$SHOAL_ALLOC_ID slot=$SHOAL_SLOT\"; echo \"home=[$HOME]\"; exec sleep 300",
    );
    s.env.insert("GREETING".into(), "world".into());
    let st = d.start(&s).await.expect("start");
    assert_eq!(st.state, RunState::Running);
    assert_eq!((st.service.as_str(), st.slot, st.version), ("svc", 2, 5));
    assert!(st.started_at_ms > 0);

    let text = wait_log(&d, "env1", "home=").await;
    assert!(text.contains("hello world\n"), "{text}");
    assert!(
        text.contains("to-stderr\n"),
        "stderr is captured too: {text}"
    );
    assert!(text.contains("alloc=env1 slot=2\n"), "{text}");
    // Only PATH is passed on from the agent: its HOME (and secrets) are not.
    assert!(text.contains("home=[]\n"), "{text}");
    let last = d.logs("env1", LogQuery::tail(1)).await.expect("tail").bytes;
    assert_eq!(last, b"home=[]\n");

    d.stop("env1", Duration::from_secs(2)).await.expect("stop");
    assert!(!pid_is_running(pid(&st)));
    assert!(d.status("env1").await.expect("status").is_none());
    assert!(matches!(
        d.logs("env1", LogQuery::all()).await,
        Err(DriverError::NotFound { .. })
    ));
    assert!(!d.log_path("env1").exists(), "stop removes the log");
    d.stop("env1", Duration::ZERO)
        .await
        .expect("stopping again is fine");
}

#[tokio::test]
async fn stop_kills_everything_the_workload_forked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    let st = d
        .start(&sh("grp", "sleep 300 & echo \"child=$!\"; wait"))
        .await
        .expect("start");
    let text = wait_log(&d, "grp", "child=").await;
    let child: i32 = text
        .trim()
        .strip_prefix("child=")
        .and_then(|p| p.parse().ok())
        .expect("child pid in log");
    assert!(pid_is_running(pid(&st)) && pid_is_running(child));

    d.stop("grp", Duration::from_secs(5)).await.expect("stop");
    assert!(!pid_is_running(pid(&st)), "the leader is gone");
    assert!(!pid_is_running(child), "the forked child is gone too");
}

/// A grandchild that leaves the workload's process group with `setsid` (and so is
/// reparented away when its parent exits) still dies with `stop`: the workload's
/// cgroup holds it. Also after the leader itself has exited.
#[tokio::test]
async fn stop_kills_a_grandchild_that_escaped_with_setsid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    for (alloc, script) in [
        // The leader keeps running.
        ("esc1", "setsid sleep 300 & echo \"escaped=$!\"; sleep 300"),
        // The leader exits at once, leaving only the escaped grandchild.
        ("esc2", "setsid sleep 300 & echo \"escaped=$!\""),
    ] {
        d.start(&sh(alloc, script)).await.expect("start");
        let text = wait_log(&d, alloc, "escaped=").await;
        let escaped: i32 = text
            .trim()
            .strip_prefix("escaped=")
            .and_then(|p| p.parse().ok())
            .expect("pid in log");
        wait_for("the escaped process running", WAIT, || async {
            pid_is_running(escaped).then_some(())
        })
        .await;
        d.stop(alloc, Duration::from_secs(2)).await.expect("stop");
        assert!(
            !pid_is_running(escaped),
            "{alloc}: the process that called setsid is gone too"
        );
    }
}

/// The memory reservation is the workload's memory limit.
#[tokio::test]
async fn the_memory_reservation_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    let mut s = sh(
        "mem",
        "echo \"limit=$(cat /proc/self/cgroup | grep memory)\"; sleep 300",
    );
    s.memory_bytes = Some(64 << 20);
    d.start(&s).await.expect("start");
    let text = wait_log(&d, "mem", "limit=").await;
    let path = text
        .trim()
        .strip_prefix("limit=")
        .and_then(|l| l.splitn(3, ':').nth(2))
        .expect("a memory cgroup");
    assert!(path.ends_with("/mem"), "its own memory cgroup: {path}");
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{}/memory.limit_in_bytes",
        path
    ))
    .expect("the limit file");
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    d.stop("mem", Duration::from_secs(2)).await.expect("stop");
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    // An ignored signal stays ignored in children, so the whole group ignores SIGTERM.
    let st = d
        .start(&sh(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        ))
        .await
        .expect("start");
    wait_log(&d, "stubborn", "ready").await;
    let grace = Duration::from_millis(300);
    let t0 = Instant::now();
    d.stop("stubborn", grace).await.expect("stop");
    assert!(
        t0.elapsed() >= grace,
        "SIGKILL came before the grace period ended"
    );
    assert!(!pid_is_running(pid(&st)));
}

#[tokio::test]
async fn exits_are_detected_with_their_code_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    d.start(&sh("exit7", "echo bye; exit 7"))
        .await
        .expect("start");
    let st = wait_state(&d, "exit7", &RunState::Exited { code: Some(7) }).await;
    assert!(!pid_is_running(pid(&st)), "the exited child was reaped");
    assert_eq!(d.usage("exit7").await.expect("usage"), None);
    assert_eq!(log_text(&d, "exit7").await, "bye\n");

    let listed = d.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, RunState::Exited { code: Some(7) });

    // The exit code was written down: a new agent still knows it.
    drop(d);
    let d2 = ProcessDriver::new(dir.path()).expect("driver");
    let st2 = d2
        .status("exit7")
        .await
        .expect("status")
        .expect("still listed");
    assert_eq!(st2.state, RunState::Exited { code: Some(7) });

    // Starting an ended alloc again runs it anew.
    let again = d2
        .start(&sh("exit7", "exec sleep 300"))
        .await
        .expect("restart");
    assert_eq!(again.state, RunState::Running);
    assert_ne!(again.handle, st.handle);
    assert_eq!(
        log_text(&d2, "exit7").await,
        "bye\n",
        "the new run appends to the log, so the previous run's output stays"
    );
    d2.stop("exit7", Duration::from_secs(2))
        .await
        .expect("stop");
}

#[tokio::test]
async fn a_killed_workload_is_reported_failed_with_its_signal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    let st = d
        .start(&spec("killed", &["sleep", "300"]))
        .await
        .expect("start");
    // SAFETY: plain syscall on the pid we just started.
    assert_eq!(unsafe { libc::kill(pid(&st), libc::SIGKILL) }, 0);
    let failed = wait_for("the kill to be reported", WAIT, || async {
        d.status("killed")
            .await
            .expect("status")
            .filter(|s| matches!(s.state, RunState::Failed { .. }))
    })
    .await;
    let RunState::Failed { reason } = failed.state else {
        unreachable!()
    };
    assert!(reason.contains("signal 9"), "{reason}");
    d.stop("killed", Duration::ZERO).await.expect("stop");
}

#[tokio::test]
async fn a_restarted_agent_adopts_running_processes_without_restarting_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = ProcessDriver::new(dir.path()).expect("driver");
    let s = spec("adopt", &["sleep", "300"]);
    let st = first.start(&s).await.expect("start");
    let p = pid(&st);
    let born = pid_start_ticks(p).expect("start time");
    drop(first); // the agent goes away; its workload must not

    let second = ProcessDriver::new(dir.path()).expect("driver");
    let listed = second.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].alloc_id, "adopt");
    assert_eq!(listed[0].state, RunState::Running);
    assert_eq!(listed[0].handle, st.handle, "same pid");
    assert_eq!(listed[0].started_at_ms, st.started_at_ms);

    let again = second.start(&s).await.expect("start is idempotent");
    assert_eq!(again.handle, st.handle, "not restarted");
    assert_eq!(pid_start_ticks(p), Some(born), "the very same process");

    second
        .stop("adopt", Duration::from_secs(2))
        .await
        .expect("stop");
    wait_for("the adopted process to be gone", WAIT, || async {
        (!pid_is_running(p)).then_some(())
    })
    .await;
    assert!(second.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn ports_are_reserved_and_passed_in_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    let fixed = free_port();
    let mut s = sh(
        "ports",
        "echo \"port=$PORT http=$PORT_HTTP admin=$PORT_ADMIN_API\"; exec sleep 300",
    );
    s.ports = vec![
        PortSpec {
            name: "http".into(),
            container_port: 8080,
            host_port: None,
            protocol: Protocol::Tcp,
        },
        PortSpec {
            name: "admin-api".into(),
            container_port: 9000,
            host_port: Some(fixed),
            protocol: Protocol::Tcp,
        },
    ];
    let st = d.start(&s).await.expect("start");
    let http = st
        .ports
        .iter()
        .find(|(n, _)| n == "http")
        .map(|(_, p)| *p)
        .expect("http port reported");
    assert_ne!(http, 0);
    assert_eq!(st.ports[1], ("admin-api".to_string(), fixed));
    let text = wait_log(&d, "ports", "port=").await;
    assert_eq!(text, format!("port={http} http={http} admin={fixed}\n"));
    d.stop("ports", Duration::from_secs(2)).await.expect("stop");
}

#[tokio::test]
async fn usage_reports_memory_and_cpu_of_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    // The busy loop runs in a child of the leader: usage must count the whole group.
    d.start(&sh("busy", "sh -c 'while :; do :; done' & wait"))
        .await
        .expect("start");
    let first = d.usage("busy").await.expect("usage").expect("running");
    assert!(first.memory_bytes > 0, "{first:?}");
    assert!(first.cpu_percent.is_finite() && first.cpu_percent >= 0.0);
    let busy = wait_for("the busy loop to show CPU use", WAIT, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let u = d.usage("busy").await.expect("usage").expect("running");
        (u.cpu_percent > 20.0).then_some(u)
    })
    .await;
    assert!(
        busy.cpu_percent < 250.0,
        "one busy loop is about one core: {busy:?}"
    );
    d.stop("busy", Duration::from_secs(2)).await.expect("stop");
}

#[tokio::test]
async fn bad_requests_are_clear_errors_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");

    let mut docker = spec("dock", &["x"]);
    docker.kind = WorkloadKind::Docker {
        image: "busybox:1".into(),
        host_network: false,
    };
    let err = d.start(&docker).await.expect_err("docker kind");
    assert!(matches!(err, DriverError::Unsupported { .. }), "{err}");

    let err = d
        .start(&spec("nope", &["/definitely/not/a/program"]))
        .await
        .expect_err("missing program");
    assert!(matches!(err, DriverError::Spawn { .. }), "{err}");
    assert!(
        err.to_string().contains("/definitely/not/a/program"),
        "{err}"
    );

    let err = d
        .stop("../escape", Duration::ZERO)
        .await
        .expect_err("bad id");
    assert!(matches!(err, DriverError::InvalidSpec { .. }), "{err}");
    let err = d
        .logs("unknown", LogQuery::all())
        .await
        .expect_err("unknown alloc");
    assert!(matches!(err, DriverError::NotFound { .. }), "{err}");
    d.stop("unknown", Duration::ZERO)
        .await
        .expect("stop of nothing is fine");

    assert!(d.list().await.expect("list").is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("allocs"))
            .expect("dir")
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("logs"))
            .expect("dir")
            .count(),
        0
    );
}

#[tokio::test]
async fn usage_of_many_workloads_is_one_call_and_skips_the_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = ProcessDriver::new(dir.path()).expect("driver");
    for id in ["m1", "m2", "m3"] {
        d.start(&spec(id, &["sleep", "300"])).await.expect("start");
    }
    d.start(&sh("done1", "exit 0")).await.expect("start");
    wait_state(&d, "done1", &RunState::Exited { code: Some(0) }).await;
    let ids: Vec<String> = ["m1", "m2", "m3", "done1", "unknown"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let all = d.usage_many(&ids).await.expect("usage_many");
    let mut got: Vec<&str> = all.keys().map(String::as_str).collect();
    got.sort_unstable();
    assert_eq!(got, vec!["m1", "m2", "m3"], "{all:?}");
    assert!(all.values().all(|u| u.memory_bytes > 0), "{all:?}");
    for id in ["m1", "m2", "m3", "done1"] {
        d.stop(id, Duration::from_secs(2)).await.expect("stop");
    }
}

#[tokio::test]
async fn logs_rotate_at_their_cap_and_reads_stay_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = shoal_runtime::LogPolicy {
        max_bytes: 256 << 10,
        max_files: 3,
    };
    let d = ProcessDriver::with_logs(dir.path(), policy).expect("driver");
    // 1 MB of 100-byte lines, then quiet.
    d.start(&sh(
        "chatty",
        // The padding is made once: a `$(…)` per line forks 10,000 times, which
        // took over 10 s on a loaded 2-core CI machine.
        "pad=$(printf '%080d' 0); i=0; while [ $i -lt 10000 ]; do echo \"line $i $pad\"; i=$((i+1)); done; echo done; sleep 300",
    ))
    .await
    .expect("start");
    wait_log(&d, "chatty", "done\n").await;
    let path = d.log_path("chatty");
    let before = std::fs::metadata(&path).expect("log").len();
    assert!(before > 512 << 10, "{before}");
    // A tail reads from the end: one line, whatever the size.
    let last = d.logs("chatty", LogQuery::tail(2)).await.expect("tail");
    assert_eq!(
        String::from_utf8_lossy(&last.bytes)
            .lines()
            .last()
            .unwrap_or(""),
        "done"
    );
    assert_eq!(last.next_offset, before);
    // A page is bounded and says more follows.
    let page = d
        .logs(
            "chatty",
            LogQuery {
                limit: 4096,
                ..LogQuery::from(0)
            },
        )
        .await
        .expect("page");
    assert!(
        page.bytes.len() <= 4096 && page.more,
        "{}",
        page.bytes.len()
    );
    assert!(page.bytes.ends_with(b"\n"), "pages end on a line");

    d.housekeep().await.expect("housekeep");
    let rotated = dir.path().join("logs/chatty.log.1");
    assert_eq!(
        std::fs::metadata(&rotated).expect("rotated copy").len(),
        before
    );
    assert!(std::fs::metadata(&path).expect("log").len() < 4096);
    // The workload keeps writing into the (now small) current file.
    let after = d
        .logs("chatty", LogQuery::from(before))
        .await
        .expect("follow");
    assert_eq!(
        after.next_offset,
        before + std::fs::metadata(&path).unwrap().len()
    );

    d.stop("chatty", Duration::from_secs(2))
        .await
        .expect("stop");
    assert!(!rotated.exists(), "stop removes the rotated copies too");
}
