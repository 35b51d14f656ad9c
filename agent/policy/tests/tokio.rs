//! The host from a tokio application: calls are synchronous and run on blocking
//! threads (`spawn_blocking`), including ones whose plugin traps.

mod common;

use std::sync::Arc;

use common::*;
use shoal_policy::{DecidedBy, PolicyHost, PolicyKind};

#[test]
fn usable_from_tokio_via_spawn_blocking() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PolicyHost>();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let host = Arc::new(tokio::task::spawn_blocking(host).await.unwrap());
        host.install(
            PolicyKind::Scheduler,
            Some("bad"),
            "trap",
            &guest("shoal_fixture_trap.wasm"),
        )
        .unwrap();
        let calls = (0..4).map(|i| {
            let host = host.clone();
            tokio::task::spawn_blocking(move || {
                let service = if i % 2 == 0 { "bad" } else { "good" };
                host.schedule(&five_nodes(), &[request(service, 2, 100, 0)])
            })
        });
        for call in calls {
            let out = call.await.expect("call did not panic");
            assert_eq!(out[0].indices.len(), 2);
            assert_eq!(out[0].decided_by, DecidedBy::Builtin);
        }
    });
}
