//! Replays every committed corpus file through its target on stable (the
//! regression half of fuzzing), then a few thousand deterministic mutations of
//! each. `SHOAL_FUZZ_WRITE_SEEDS=1 cargo test -p shoal-fuzz` rewrites the seed
//! files (`seed-*`) from real encoders; files libFuzzer found are kept as they are.

use std::path::{Path, PathBuf};

use shoal_blob::{BlobMsg, BlobStore};
use shoal_core::wire::{self, Msg};
use shoal_core::{Config, Node, Now, Output, Profile};
use shoal_discovery::proto::op::{Edns, Message, MessageType, OpCode, Query};
use shoal_discovery::proto::rr::{Name, RecordType};
use shoal_fuzz::TARGETS;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn files(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus(target))
        .unwrap_or_else(|e| panic!("corpus/{target}: {e}"))
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Rewrites the seed files once per test run when asked to.
fn seeds_written() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("SHOAL_FUZZ_WRITE_SEEDS").is_some() {
            write_seeds();
        }
    });
}

#[test]
fn every_corpus_file_replays_without_a_panic() {
    seeds_written();
    for (target, run) in TARGETS {
        let inputs = files(target);
        assert!(
            inputs.iter().any(|(n, _)| n.starts_with("seed-")),
            "corpus/{target} has no seed files"
        );
        for (name, bytes) in &inputs {
            let r = std::panic::catch_unwind(|| run(bytes));
            assert!(r.is_ok(), "{target}: corpus/{target}/{name} panicked");
        }
    }
}

/// Cheap stable fuzzing: flips, truncations, splices and inserted bytes of the
/// corpus, from a fixed seed, so the suite fails the same way every time.
#[test]
fn mutated_corpus_inputs_do_not_panic() {
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    seeds_written();
    for (target, run) in TARGETS {
        let inputs: Vec<Vec<u8>> = files(target).into_iter().map(|(_, b)| b).collect();
        assert!(!inputs.is_empty(), "corpus/{target} is empty");
        for round in 0..3000 {
            let mut b = inputs[next() % inputs.len()].clone();
            for _ in 0..1 + next() % 4 {
                match next() % 5 {
                    0 if !b.is_empty() => {
                        let i = next() % b.len();
                        b[i] ^= 1 << (next() % 8);
                    }
                    1 if !b.is_empty() => b.truncate(next() % b.len()),
                    2 => {
                        let i = next() % (b.len() + 1);
                        b.insert(i, next() as u8);
                    }
                    3 if !b.is_empty() => {
                        let i = next() % b.len();
                        b[i] = [0, 0xff, 0x7f, 0x80, 0x1b, 0x9f][next() % 6];
                    }
                    _ => {
                        let other = &inputs[next() % inputs.len()];
                        let cut = next() % (other.len() + 1);
                        b.extend_from_slice(&other[cut..]);
                    }
                }
            }
            let r = std::panic::catch_unwind(|| run(&b));
            assert!(
                r.is_ok(),
                "{target}: mutation round {round} panicked on {:02x?}",
                &b[..b.len().min(256)]
            );
        }
    }
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

/// Frames two real core nodes exchange while joining and writing.
fn exchanged_frames() -> Vec<Vec<u8>> {
    let addr = |p: u16| std::net::SocketAddr::from(([10, 0, 0, 1], p));
    let now = |t: u64| Now {
        mono_ms: t,
        wall_ms: 1_700_000_000_000 + t,
    };
    let mut a = Node::new(Config::new("a", addr(1), Profile::Lan, 2), 1, 1, now(0));
    let mut b = Node::new(Config::new("b", addr(2), Profile::Lan, 2), 1, 2, now(0));
    b.join(&[addr(1)], now(0));
    let mut frames = Vec::new();
    for t in (0..6_000).step_by(50) {
        if t == 2_000 {
            a.put("app/color", Some(b"blue".to_vec()), now(t)).unwrap();
            b.put("app/size", Some(b"3".to_vec()), now(t)).unwrap();
        }
        a.handle_timeout(now(t));
        b.handle_timeout(now(t));
        let mut moved = true;
        while moved {
            moved = false;
            while let Some(o) = a.poll_output() {
                if let Output::Transmit { bytes, .. } = o {
                    b.handle_frame("a", addr(1), &bytes, now(t));
                    frames.push(bytes);
                    moved = true;
                }
            }
            while let Some(o) = b.poll_output() {
                if let Output::Transmit { bytes, .. } = o {
                    a.handle_frame("b", addr(2), &bytes, now(t));
                    frames.push(bytes);
                    moved = true;
                }
            }
        }
    }
    frames
}

fn write_seeds() {
    for (target, _) in TARGETS {
        for (name, _) in files(target) {
            if name.starts_with("seed-") {
                std::fs::remove_file(corpus(target).join(name)).unwrap();
            }
        }
    }
    // Frames and SWIM packets: one of each distinct variant, the first 24 SWIM ones.
    let frames = exchanged_frames();
    let mut seen = std::collections::BTreeSet::new();
    let mut swim = 0;
    for f in &frames {
        match wire::decode(f).expect("a real frame") {
            Msg::Swim(p) => {
                if swim < 24 {
                    write("swim_packet", &format!("{swim:02}"), &p);
                    if swim < 4 {
                        write("wire_frame", &format!("swim-{swim}"), f);
                    }
                    swim += 1;
                }
            }
            other => {
                let kind = format!("{other:?}")
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or("msg")
                    .to_lowercase();
                if seen.insert(kind.clone()) {
                    write("wire_frame", &kind, f);
                }
            }
        }
    }
    write(
        "wire_frame",
        "probe",
        &wire::encode(&Msg::Probe { nonce: 7 }),
    );
    write(
        "wire_frame",
        "blob",
        &wire::encode(&Msg::Blob(vec![1, 2, 3])),
    );
    write(
        "wire_frame",
        "suspect",
        &wire::encode(&Msg::Suspect {
            member: shoal_core::NodeId {
                name: "n2".into(),
                addr: "127.0.0.1:7002".parse().unwrap(),
                gen: 3,
            },
            incarnation: 1,
            by: "n1".into(),
            checked: false,
        }),
    );

    // Blob messages about a real stored blob.
    let dir = std::env::temp_dir().join(format!("shoal-fuzz-seed-{}", std::process::id()));
    let store = BlobStore::open_with_chunk_size(&dir, 1024).unwrap();
    let id = store.put_bytes(&[7u8; 3000]).unwrap();
    let manifest = store.manifest(&id).unwrap();
    let msgs = [
        ("get-manifest", BlobMsg::GetManifest { id }),
        (
            "manifest",
            BlobMsg::Manifest {
                id,
                manifest: manifest.clone(),
            },
        ),
        ("get-chunk", BlobMsg::GetChunk { id, idx: 1 }),
        (
            "chunk",
            BlobMsg::Chunk {
                id,
                idx: 0,
                bytes: vec![7; 1024],
            },
        ),
        ("not-found", BlobMsg::NotFound { id }),
        (
            "busy",
            BlobMsg::Busy {
                id,
                idx: 2,
                retry_after_ms: 50,
            },
        ),
    ];
    for (name, m) in msgs {
        write("blob_msg", name, &m.encode().unwrap());
    }
    write("blob_msg", "raw-manifest", &manifest.encode());
    let _ = std::fs::remove_dir_all(&dir);

    // Specs: every example.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/services");
    for e in std::fs::read_dir(examples).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        write("service_spec", &name, &std::fs::read(e.path()).unwrap());
    }

    for (i, r) in [
        "myapp:2.1",
        "myapp",
        "registry.local:5000/team/app:v1",
        "library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "UPPER:case",
        " spaced :tag",
    ]
    .iter()
    .enumerate()
    {
        write("image_ref", &format!("{i}"), r.as_bytes());
    }

    for (name, q, t, edns) in [
        ("a", "web.service.shoal.", RecordType::A, Some(1232)),
        (
            "srv",
            "_http._tcp.web.service.shoal.",
            RecordType::SRV,
            Some(1232),
        ),
        ("aaaa-noedns", "n1.node.shoal.", RecordType::AAAA, None),
        ("any", "shoal.", RecordType::ANY, Some(512)),
        ("outside", "example.com.", RecordType::A, None),
    ] {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(q).unwrap(), t));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        write("dns_query", name, &m.to_vec().unwrap());
    }

    // API bodies: the first byte picks the route (shoal_fuzz::API_JSON_ROUTES).
    for (name, route, body) in [
        ("scale", 0u8, r#"{"replicas": 3}"#),
        ("scale-zero", 0, r#"{"replicas":0}"#),
        ("rollback-to", 1, r#"{"to": 2}"#),
        ("rollback-empty", 1, "{}"),
        (
            "push",
            2,
            r#"{"reference": "web:1", "to": "zone=edge", "replace": true}"#,
        ),
        (
            "push-all",
            2,
            r#"{"reference":"registry.local:5000/team/app:v1","to":"all"}"#,
        ),
        ("pull", 3, r#"{"reference": "myapp"}"#),
        ("pull-escaped", 3, r#"{"reference": "my\u0061pp:2"}"#),
    ] {
        let mut bytes = vec![route];
        bytes.extend_from_slice(body.as_bytes());
        write("api_json", name, &bytes);
    }
}
