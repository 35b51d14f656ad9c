//! Hot swap: installing and removing plugins while other threads schedule never fails
//! a call.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use shoal_policy::{DecidedBy, PolicyKind};

#[test]
fn installs_during_concurrent_calls_never_fail_one() {
    let host = Arc::new(host());
    let versions = [
        guest("hybrid_cloud.wasm"),
        shoal_policy::builtins::SCHEDULER.to_vec(),
    ];
    host.install(PolicyKind::Scheduler, None, "v0", &versions[0])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let (host, stop) = (host.clone(), stop.clone());
            std::thread::spawn(move || {
                let snapshot = five_nodes();
                let reqs = [
                    request(&format!("svc{t}"), 3, 500, 1),
                    request("web", 2, 500, 1),
                ];
                let mut rounds = 0u32;
                let mut plugin_answers = 0u32;
                while !stop.load(Ordering::Relaxed) || rounds < 20 {
                    for o in host.schedule(&snapshot, &reqs) {
                        assert_eq!(o.fallback_reason, None, "no call failed: {o:?}");
                        assert!(o.unplaced.is_none(), "{o:?}");
                        assert_ne!(o.decided_by, DecidedBy::Native);
                        plugin_answers +=
                            u32::from(matches!(o.decided_by, DecidedBy::Plugin { .. }));
                    }
                    rounds += 1;
                }
                (rounds, plugin_answers)
            })
        })
        .collect();
    for i in 1..=30 {
        host.install(
            PolicyKind::Scheduler,
            None,
            &format!("v{i}"),
            &versions[i % 2],
        )
        .unwrap();
        if i % 10 == 5 {
            host.remove(PolicyKind::Scheduler, None);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let (rounds, plugin_answers) = w.join().expect("worker thread did not panic");
        assert!(
            rounds >= 20 && plugin_answers > 0,
            "rounds {rounds}, plugin answers {plugin_answers}"
        );
    }
    let status = host.status();
    assert_eq!(status[0].name, "v30");
    assert_eq!(host.stats().plugin_failures, 0);
}
