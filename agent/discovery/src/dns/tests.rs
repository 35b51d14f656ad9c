use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use proptest::prelude::*;

use super::*;
use crate::catalog::{Catalog, Endpoint, PortDef, ServiceEntry};
use crate::resolve::{InOrder, Resolver};
use shoal_runtime::Protocol;

fn endpoint(i: usize, node: &str, ip: [u8; 4]) -> Endpoint {
    Endpoint {
        alloc_id: format!("web-{i}"),
        slot: i as u32,
        version: 1,
        node: node.into(),
        ip: IpAddr::from(ip),
        ports: vec![
            ("http".into(), 30000 + i as u16),
            ("metrics".into(), 40000 + i as u16),
        ],
        local_only: false,
        zone: String::new(),
        region: String::new(),
        load: 0.0,
    }
}

/// `web` with `n` endpoints on n1..n3 (two addresses), `idle` with none, 3 nodes.
fn resolver(n: usize) -> Resolver {
    let mut services = BTreeMap::new();
    let ports = vec![
        PortDef {
            name: "http".into(),
            protocol: Protocol::Tcp,
        },
        PortDef {
            name: "metrics".into(),
            protocol: Protocol::Tcp,
        },
    ];
    services.insert(
        "web".to_string(),
        ServiceEntry {
            ports: ports.clone(),
            params: BTreeMap::new(),
            endpoints: (0..n)
                .map(|i| {
                    let node = ["n1", "n2", "n3"][i % 3];
                    let ip = if i % 3 == 2 {
                        [10, 0, 0, 3]
                    } else {
                        [10, 0, 0, 1 + (i % 3) as u8]
                    };
                    endpoint(i, node, ip)
                })
                .collect(),
        },
    );
    services.insert(
        "idle".to_string(),
        ServiceEntry {
            ports,
            ..ServiceEntry::default()
        },
    );
    let nodes = [
        ("n1".to_string(), IpAddr::from([10, 0, 0, 1])),
        ("n2".to_string(), IpAddr::from([10, 0, 0, 2])),
        ("n3".to_string(), IpAddr::from([10, 0, 0, 3])),
        ("v6".to_string(), "fd00::6".parse().unwrap()),
    ]
    .into();
    Resolver::build(
        Catalog {
            generation: 7,
            services,
            nodes,
            ..Catalog::default()
        },
        &InOrder,
        None,
    )
}

fn cfg() -> DnsConfig {
    DnsConfig::new("shoal", 1).unwrap()
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(r: &Resolver, name: &str, qtype: RecordType) -> Message {
    ask_with(r, name, qtype, Some(1232), Transport::Udp)
}

fn ask_with(
    r: &Resolver,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
    t: Transport,
) -> Message {
    let reply = respond(r, &cfg(), &query(name, qtype, edns), t);
    let m = Message::from_vec(&reply.bytes.expect("an answer")).unwrap();
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

fn ips(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

fn srv(m: &Message) -> Vec<(u16, String)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_records_are_the_distinct_addresses_in_policy_order() {
    let m = ask(&resolver(3), "web.service.shoal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(!m.metadata.recursion_available);
    assert_eq!(ips(&m), vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert!(m.answers.iter().all(|r| r.ttl == 1));
    // Case does not matter; two replicas on one node give one record.
    let m = ask(&resolver(6), "WEB.Service.SHOAL.", RecordType::A);
    assert_eq!(ips(&m).len(), 3);
    assert!(m.edns.is_some(), "EDNS answered with EDNS");
}

#[test]
fn srv_records_name_nodes_and_glue_their_addresses() {
    let m = ask(&resolver(3), "web.service.shoal.", RecordType::SRV);
    assert_eq!(
        srv(&m),
        vec![
            (30000, "n1.node.shoal.".to_string()),
            (30001, "n2.node.shoal.".to_string()),
            (30002, "n3.node.shoal.".to_string()),
        ]
    );
    assert_eq!(m.additionals.len(), 3);
    let m = ask(
        &resolver(3),
        "_metrics._tcp.web.service.shoal.",
        RecordType::SRV,
    );
    assert_eq!(srv(&m)[0].0, 40000);
    match &m.answers[0].data {
        RData::SRV(s) => assert_eq!((s.priority, s.weight), (1, 100)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn node_names_resolve() {
    let m = ask(&resolver(0), "n2.node.shoal.", RecordType::A);
    assert_eq!(ips(&m), vec!["10.0.0.2"]);
    let m = ask(&resolver(0), "v6.node.shoal.", RecordType::AAAA);
    assert_eq!(ips(&m), vec!["fd00::6"]);
    // An A query of an IPv6-only node: no records, but the name exists.
    let m = ask(&resolver(0), "v6.node.shoal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[test]
fn unknown_names_are_nxdomain_and_empty_services_are_nodata() {
    let r = resolver(3);
    for name in [
        "nope.service.shoal.",
        "ghost.node.shoal.",
        "a.b.c.shoal.",
        "_nope._tcp.web.service.shoal.",
        "_http._udp.web.service.shoal.",
    ] {
        let m = ask(&r, name, RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(matches!(m.authorities[0].data, RData::SOA(_)), "{name}");
    }
    let m = ask(&r, "idle.service.shoal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    match &m.authorities[0].data {
        RData::SOA(s) => assert_eq!((s.serial, s.minimum), (7, 1)),
        other => panic!("{other:?}"),
    }
    // A type the service has no records of.
    let m = ask(&r, "web.service.shoal.", RecordType::TXT);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[test]
fn names_outside_the_domain_are_refused() {
    let r = resolver(3);
    for name in ["example.com.", "shoal.example.com.", "."] {
        let m = ask(&r, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!m.metadata.authoritative);
    }
    let m = ask(&r, "shoal.", RecordType::SOA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
}

#[test]
fn other_domains_are_configurable() {
    let c = DnsConfig::new("Cluster.Example.", 5).unwrap();
    assert_eq!(c.domain, "cluster.example");
    let r = resolver(1);
    let reply = respond(
        &r,
        &c,
        &query("web.service.cluster.example.", RecordType::A, None),
        Transport::Udp,
    );
    let m = Message::from_vec(&reply.bytes.unwrap()).unwrap();
    assert_eq!(ips(&m), vec!["10.0.0.1"]);
    assert_eq!(m.answers[0].ttl, 5);
    assert!(DnsConfig::new("bad domain", 1).is_err());
    assert!(DnsConfig::new("", 1).is_err());
}

#[test]
fn large_answers_set_tc_over_udp_and_are_whole_over_tcp() {
    let r = resolver(60);
    // Without EDNS: 512 bytes.
    let reply = respond(
        &r,
        &cfg(),
        &query("web.service.shoal.", RecordType::SRV, None),
        Transport::Udp,
    );
    assert_eq!(
        reply.outcome,
        Outcome::Answered {
            rcode: ResponseCode::NoError,
            truncated: true
        }
    );
    let bytes = reply.bytes.unwrap();
    assert!(bytes.len() <= 512);
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation);
    assert!(!m.answers.is_empty() && m.answers.len() < 60);
    // With EDNS 1232: more fit, still truncated.
    let m2 = ask_with(
        &r,
        "web.service.shoal.",
        RecordType::SRV,
        Some(1232),
        Transport::Udp,
    );
    assert!(m2.metadata.truncation);
    assert!(m2.answers.len() > m.answers.len());
    // TCP: every record, no TC.
    let all = ask_with(
        &r,
        "web.service.shoal.",
        RecordType::SRV,
        None,
        Transport::Tcp,
    );
    assert!(!all.metadata.truncation);
    assert_eq!(all.answers.len(), 60);
    assert_eq!(all.additionals.len(), 3);
}

#[test]
fn malformed_and_unusual_queries_are_answered_or_dropped() {
    let r = resolver(3);
    // Too short for a header: dropped.
    assert_eq!(
        respond(&r, &cfg(), &[1, 2, 3], Transport::Udp).outcome,
        Outcome::Dropped
    );
    // A response: dropped (no reflection loops).
    let mut resp = query("web.service.shoal.", RecordType::A, None);
    resp[2] |= 0x80;
    assert_eq!(
        respond(&r, &cfg(), &resp, Transport::Udp).outcome,
        Outcome::Dropped
    );
    // A header claiming a question that is not there: FORMERR with its id.
    let mut bad = query("web.service.shoal.", RecordType::A, None);
    bad.truncate(14);
    let reply = respond(&r, &cfg(), &bad, Transport::Udp);
    assert_eq!(reply.outcome, Outcome::Malformed);
    let m = Message::from_vec(&reply.bytes.unwrap()).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (4242, ResponseCode::FormErr)
    );
    // Two questions: FORMERR.
    let mut two = Message::new(1, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(
        Name::from_ascii("web.service.shoal.").unwrap(),
        RecordType::A,
    ));
    two.add_query(Query::query(
        Name::from_ascii("n1.node.shoal.").unwrap(),
        RecordType::A,
    ));
    let reply = respond(&r, &cfg(), &two.to_vec().unwrap(), Transport::Udp);
    let m = Message::from_vec(&reply.bytes.unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Another opcode: NOTIMP. Another class: REFUSED. Zone transfer: REFUSED.
    let mut upd = Message::new(1, MessageType::Query, OpCode::Update);
    upd.add_query(Query::query(
        Name::from_ascii("shoal.").unwrap(),
        RecordType::SOA,
    ));
    let m = Message::from_vec(
        &respond(&r, &cfg(), &upd.to_vec().unwrap(), Transport::Udp)
            .bytes
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    let mut chaos = Message::new(1, MessageType::Query, OpCode::Query);
    let mut q = Query::query(
        Name::from_ascii("web.service.shoal.").unwrap(),
        RecordType::A,
    );
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    let m = Message::from_vec(
        &respond(&r, &cfg(), &chaos.to_vec().unwrap(), Transport::Udp)
            .bytes
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let m = ask(&r, "shoal.", RecordType::AXFR);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any bytes: an answer or nothing, never a panic; every answer parses and keeps
    /// the query's id.
    #[test]
    fn any_bytes_are_answered_or_dropped(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let r = resolver(4);
        for t in [Transport::Udp, Transport::Tcp] {
            let reply = respond(&r, &cfg(), &bytes, t);
            if let Some(b) = reply.bytes {
                let m = Message::from_vec(&b).unwrap();
                prop_assert_eq!(m.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
                if t == Transport::Udp {
                    prop_assert!(b.len() <= 4096);
                }
            }
        }
    }

    /// Mutations of a valid query: the same.
    #[test]
    fn mutated_queries_never_panic(flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6)) {
        let r = resolver(4);
        let mut q = query("_http._tcp.web.service.shoal.", RecordType::SRV, Some(4096));
        for (i, b) in flips {
            let n = q.len();
            q[i % n] = b;
        }
        let _ = respond(&r, &cfg(), &q, Transport::Udp);
    }
}
