//! The in-memory driver behaves like the real ones where orchestrator tests rely on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_runtime::{
    Driver, DriverError, LogQuery, MemCall, MemDriver, MemOp, PortSpec, Protocol, RunState, Usage,
    WorkloadKind, WorkloadSpec,
};

fn spec(alloc: &str, ports: &[(&str, Option<u16>)]) -> WorkloadSpec {
    WorkloadSpec {
        service: "api".into(),
        slot: 1,
        version: 2,
        alloc_id: alloc.into(),
        kind: WorkloadKind::Docker {
            image: "api:1".into(),
            host_network: false,
        },
        env: BTreeMap::new(),
        ports: ports
            .iter()
            .map(|(name, host)| PortSpec {
                name: name.to_string(),
                container_port: 80,
                host_port: *host,
                protocol: Protocol::Tcp,
            })
            .collect(),
        cpu_millis: None,
        memory_bytes: None,
        labels: BTreeMap::new(),
    }
}

#[tokio::test]
async fn lifecycle_is_deterministic_and_idempotent() {
    let d: Arc<dyn Driver> = Arc::new(MemDriver::new());
    assert_eq!(d.name(), "mem");
    let a = d
        .start(&spec("a", &[("http", None), ("admin", Some(9000))]))
        .await
        .expect("start");
    let b = d.start(&spec("b", &[("http", None)])).await.expect("start");
    assert_eq!(a.handle, "mem-1");
    assert_eq!(b.handle, "mem-2");
    assert_eq!(
        a.ports,
        vec![("http".to_string(), 30000), ("admin".to_string(), 9000)]
    );
    assert_eq!(b.ports, vec![("http".to_string(), 30001)]);
    assert_eq!(a.state, RunState::Running);

    let again = d.start(&spec("a", &[("http", None)])).await.expect("start");
    assert_eq!(again, a, "a running alloc is returned, not restarted");

    // Futures are Send: the agent calls drivers from spawned tasks.
    let from_task = Arc::clone(&d);
    let listed: Vec<_> = tokio::spawn(async move { from_task.list().await })
        .await
        .expect("task")
        .expect("list")
        .into_iter()
        .map(|w| w.alloc_id)
        .collect();
    assert_eq!(listed, vec!["a", "b"]);

    d.stop("a", Duration::from_secs(1)).await.expect("stop");
    d.stop("a", Duration::from_secs(1))
        .await
        .expect("stop is idempotent");
    assert_eq!(d.status("a").await.expect("status"), None);
    assert_eq!(d.list().await.expect("list").len(), 1);
}

#[tokio::test]
async fn tests_can_script_exits_usage_logs_and_clock() {
    let d = MemDriver::new();
    d.set_now_ms(1234);
    d.start(&spec("a", &[])).await.expect("start");
    assert_eq!(
        d.status("a")
            .await
            .expect("status")
            .expect("exists")
            .started_at_ms,
        1234
    );

    let u = Usage {
        cpu_percent: 42.0,
        memory_bytes: 1 << 20,
    };
    assert!(d.set_usage("a", u));
    assert_eq!(d.usage("a").await.expect("usage"), Some(u));

    assert!(d.append_log("a", b"one\ntwo\nthree\n"));
    assert_eq!(
        d.logs("a", LogQuery::tail(2)).await.expect("logs").bytes,
        b"two\nthree\n"
    );
    assert!(matches!(
        d.logs("zzz", LogQuery::all()).await,
        Err(DriverError::NotFound { .. })
    ));

    assert!(d.exit("a", Some(1)));
    let st = d.status("a").await.expect("status").expect("exists");
    assert_eq!(st.state, RunState::Exited { code: Some(1) });
    assert_eq!(
        d.usage("a").await.expect("usage"),
        None,
        "no usage once ended"
    );
    let restarted = d.start(&spec("a", &[])).await.expect("restart");
    assert_eq!(restarted.state, RunState::Running);
    assert_ne!(
        restarted.handle, st.handle,
        "an ended alloc is started anew"
    );
    assert!(
        !d.exit("zzz", None),
        "unknown allocs are reported, not invented"
    );
}

#[tokio::test]
async fn injected_failures_and_missing_images_fail_once_and_change_nothing() {
    let d = MemDriver::new();
    d.fail_next(MemOp::Start, "disk full");
    let err = d.start(&spec("a", &[])).await.expect_err("injected");
    assert_eq!(err.to_string(), "mem: injected failure in start: disk full");
    assert!(d.list().await.expect("list").is_empty());
    d.start(&spec("a", &[]))
        .await
        .expect("the next start succeeds");

    d.fail_next(MemOp::Stop, "engine hung");
    assert!(d.stop("a", Duration::ZERO).await.is_err());
    assert!(
        d.status("a").await.expect("status").is_some(),
        "still there"
    );

    d.set_image_present("api:1", false);
    let err = d.start(&spec("b", &[])).await.expect_err("missing image");
    assert!(matches!(err, DriverError::ImageMissing { .. }), "{err}");
    d.set_image_present("api:1", true);
    d.start(&spec("b", &[])).await.expect("start");

    let mut bad = spec("c", &[]);
    bad.alloc_id = "a/b".into();
    assert!(matches!(
        d.start(&bad).await,
        Err(DriverError::InvalidSpec { .. })
    ));
}

#[tokio::test]
async fn calls_are_recorded_in_order() {
    let d = MemDriver::new();
    let s = spec("a", &[]);
    d.start(&s).await.expect("start");
    d.status("a").await.expect("status");
    d.stop("a", Duration::from_millis(500)).await.expect("stop");
    assert_eq!(
        d.take_calls(),
        vec![
            MemCall::Start(s),
            MemCall::Status("a".into()),
            MemCall::Stop {
                alloc_id: "a".into(),
                grace: Duration::from_millis(500)
            },
        ]
    );
    assert!(d.calls().is_empty());
}

#[tokio::test]
async fn adopted_workloads_are_listed() {
    let d = MemDriver::new();
    let mut st = d.start(&spec("a", &[])).await.expect("start");
    st.alloc_id = "old".into();
    st.handle = "left-by-earlier-agent".into();
    d.insert(st.clone());
    assert_eq!(d.status("old").await.expect("status"), Some(st));
}
