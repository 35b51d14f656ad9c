//! Fuzzing entry points: one function per decoder of untrusted bytes, shared by
//! the cargo-fuzz targets in `agent/fuzz/libfuzzer` (nightly, libFuzzer) and by the
//! stable regression test that replays every committed corpus file.
//!
//! Each entry feeds its bytes to the real code path an attacker on the network or
//! the API reaches — frame decoding, SWIM through a whole [`shoal_core::Node`],
//! blob messages through a blob [`shoal_blob::Server`], service specs, image
//! references, DNS queries through the responder, the API's JSON bodies — and asserts what must hold for
//! any input (a decoded frame re-encodes to an equal message, a DNS answer parses).
//! A panic, a hang or an allocation past libFuzzer's limit is a finding. This
//! crate holds no fuzzing engine and no corpus logic of its own.

use std::net::SocketAddr;
use std::sync::OnceLock;

use shoal_blob::{BlobMsg, BlobStore, Manifest, RateLimiter, Server};
use shoal_core::wire::{self, Msg};
use shoal_core::{Config, Node, Now, Profile};
use shoal_discovery::{respond, Catalog, DnsConfig, InOrder, Outcome, Resolver, Transport};

/// A fuzzing entry point: any bytes in, a panic on a finding.
pub type Entry = fn(&[u8]);

/// Every target: its name (the corpus directory and cargo-fuzz target) and entry.
pub const TARGETS: [(&str, Entry); 7] = [
    ("wire_frame", wire_frame),
    ("swim_packet", swim_packet),
    ("blob_msg", blob_msg),
    ("service_spec", service_spec),
    ("image_ref", image_ref),
    ("dns_query", dns_query),
    ("api_json", api_json),
];

/// An agent frame, as it arrives on a stream or datagram.
pub fn wire_frame(data: &[u8]) {
    if let Ok(msg) = wire::decode(data) {
        let again = wire::decode(&wire::encode(&msg)).expect("a decoded frame re-encodes");
        assert_eq!(again, msg, "encode and decode disagree");
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

/// Bytes through a whole core node: first as one raw frame, then as the payload of
/// a SWIM frame, then split at `0xff` bytes into several SWIM packets from
/// different peers; timers and outputs are drained after each.
pub fn swim_packet(data: &[u8]) {
    let now = Now {
        mono_ms: 1_000,
        wall_ms: 1_700_000_000_000,
    };
    let mut node = Node::new(Config::new("fuzz", addr(7000), Profile::Lan, 8), 1, 7, now);
    node.join(&[addr(7001)], now);
    let drain = |node: &mut Node, t: u64| {
        let at = Now {
            mono_ms: now.mono_ms + t,
            wall_ms: now.wall_ms + t,
        };
        node.handle_timeout(at);
        while node.poll_output().is_some() {}
        at
    };
    node.handle_frame("peer", addr(7001), data, now);
    drain(&mut node, 1);
    node.handle_frame(
        "peer",
        addr(7001),
        &wire::encode(&Msg::Swim(data.to_vec())),
        now,
    );
    drain(&mut node, 2);
    for (i, part) in data.split(|b| *b == 0xff).enumerate().take(16) {
        let at = drain(&mut node, 10 + i as u64 * 150);
        let from = addr(7001 + (i % 3) as u16);
        let name = ["peer", "p2", "p3"][i % 3];
        node.handle_frame(name, from, &wire::encode(&Msg::Swim(part.to_vec())), at);
    }
    drain(&mut node, 5_000);
}

/// The blob server every `blob_msg` input is sent to: one small blob stored.
fn blob_server() -> &'static std::sync::Mutex<Server> {
    static SERVER: OnceLock<std::sync::Mutex<Server>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("shoal-fuzz-blobs-{}", std::process::id()));
        let store = BlobStore::open_with_chunk_size(&dir, 1024).expect("a blob store");
        store.put_bytes(&[7u8; 3000]).expect("a stored blob");
        std::sync::Mutex::new(Server::new(store, RateLimiter::unlimited()))
    })
}

/// A blob-transfer message from a peer, decoded and answered by a blob server;
/// the same bytes as a manifest.
pub fn blob_msg(data: &[u8]) {
    if let Ok(msg) = BlobMsg::decode(data) {
        let mut server = blob_server().lock().unwrap_or_else(|p| p.into_inner());
        let _ = server.handle(&msg, 1_000);
    }
    let _ = Manifest::decode(data);
}

/// A service spec as `shoal deploy` uploads it (the API refuses non-UTF-8 first).
pub fn service_spec(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = shoal_orch::ServiceSpec::from_toml("fuzz.toml", text) {
            // What validation accepted must survive the round trip the agent makes
            // when it stores the spec and reads it back.
            let bytes = serde_cbor::to_vec(&spec).expect("a spec encodes");
            let back: shoal_orch::ServiceSpec =
                serde_cbor::from_slice(&bytes).expect("a validated spec decodes again");
            assert_eq!(back, spec, "spec round trip");
        }
    }
}

/// An image reference, as `POST /v1/images`, `POST /v1/pulls` and
/// `DELETE /v1/images/{ref}` take it.
pub fn image_ref(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(norm) = shoal_image::normalize_reference(text) {
            assert_eq!(
                shoal_image::normalize_reference(&norm).ok().as_deref(),
                Some(norm.as_str()),
                "normalising is idempotent"
            );
        }
    }
}

/// Routes of the HTTP API with a JSON body, in the order the first byte of an
/// `api_json` input picks them.
pub const API_JSON_ROUTES: [&str; 4] = [
    "POST /v1/services/{name}/scale",
    "POST /v1/services/{name}/rollback",
    "POST /v1/images",
    "POST /v1/pulls",
];

/// A JSON request body through the decoder and checks the API's handlers use
/// ([`shoal_api::decode`]); the first byte picks the route ([`API_JSON_ROUTES`]).
/// A body that passes must pass again, unchanged, once encoded.
pub fn api_json(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    match usize::from(route) % API_JSON_ROUTES.len() {
        0 => body_round_trip::<shoal_api::ScaleBody>(body),
        1 => body_round_trip::<shoal_api::RollbackBody>(body),
        2 => body_round_trip::<shoal_api::PushBody>(body),
        _ => body_round_trip::<shoal_api::PullBody>(body),
    }
}

fn body_round_trip<T: shoal_api::RequestBody + PartialEq + std::fmt::Debug>(body: &[u8]) {
    if let Ok(v) = shoal_api::decode::<T>(body) {
        let bytes = serde_json::to_vec(&v).expect("a body encodes");
        let again = shoal_api::decode::<T>(&bytes).expect("an accepted body, encoded, is accepted");
        assert_eq!(again, v, "body round trip");
    }
}

/// The resolver every DNS input is asked: a catalog with one node and no service.
fn resolver() -> &'static (Resolver, DnsConfig) {
    static R: OnceLock<(Resolver, DnsConfig)> = OnceLock::new();
    R.get_or_init(|| {
        let catalog = Catalog {
            generation: 1,
            nodes: [("n1".to_string(), std::net::IpAddr::from([10, 0, 0, 1]))].into(),
            ..Catalog::default()
        };
        (
            Resolver::build(catalog, &InOrder, None),
            DnsConfig::new("shoal", 1).expect("a DNS config"),
        )
    })
}

/// A DNS query over UDP and over TCP; every answer must itself be a DNS message.
pub fn dns_query(data: &[u8]) {
    let (r, cfg) = resolver();
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = respond(r, cfg, data, transport);
        match (&reply.bytes, &reply.outcome) {
            (None, Outcome::Dropped) => {}
            (Some(bytes), _) => {
                shoal_discovery::proto::op::Message::from_vec(bytes)
                    .expect("an answer is a DNS message");
                if transport == Transport::Udp {
                    assert!(bytes.len() <= 65_535);
                }
            }
            (None, other) => panic!("no bytes for {other:?}"),
        }
    }
}
