//! The DNS responder: one query's bytes in, the answer's bytes out. Sans-IO, so the
//! server, the tests and the fuzzer run the same code.
//!
//! The agent is authoritative for `<domain>` (default `shoal`) and nothing else:
//!
//! | name | types | answer |
//! |---|---|---|
//! | `<svc>.service.<domain>` | A, AAAA | the policy's endpoints, one record per distinct address |
//! | `<svc>.service.<domain>` | SRV | each endpoint's first port, target `<node>.node.<domain>` |
//! | `_<port>._<tcp\|udp>.<svc>.service.<domain>` | SRV | each endpoint's named port |
//! | `<node>.node.<domain>` | A, AAAA | the node's advertised address |
//!
//! SRV answers carry the targets' addresses as additional records; records come in
//! the policy's order (best first), priority 1, weight from the policy. An unknown
//! service, port or node is NXDOMAIN; a known service without a healthy endpoint, or
//! a type it has no records of, is an empty NOERROR with the zone's SOA (so negative
//! answers are cached for one TTL only). A name outside the domain is REFUSED: the
//! agent is not a recursor. An answer larger than the client can take over UDP (its
//! EDNS size, else 512 bytes) keeps the records that fit and sets TC, so the client
//! retries over TCP, which carries every record. A query that cannot be parsed is
//! FORMERR (or, shorter than a header or itself a response, dropped); nothing panics.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::resolve::Resolver;

/// Payload size advertised in our EDNS answers (the size DNS flag day 2020 settled on).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest UDP answer without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// Largest answer over TCP (its length prefix is 16 bits).
const TCP_MAX: usize = u16::MAX as usize;

/// How the responder is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The domain, lower case, without dots at the ends (`shoal`).
    pub domain: String,
    /// TTL of every record, in seconds.
    pub ttl: u32,
}

impl DnsConfig {
    /// A configuration for `domain` (checked: one or more DNS labels) and `ttl`.
    pub fn new(domain: &str, ttl: u32) -> Result<DnsConfig, String> {
        let d = domain.trim().trim_matches('.').to_ascii_lowercase();
        let ok = !d.is_empty()
            && d.len() <= 200
            && d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "{domain:?} is not a DNS domain (labels of letters, digits and '-', separated by dots)"
            ));
        }
        Ok(DnsConfig { domain: d, ttl })
    }
}

/// How a query was carried (decides the answer's size limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: the client's EDNS size, else 512 bytes.
    Udp,
    /// TCP: up to 65,535 bytes.
    Tcp,
}

/// What became of one query, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with this response code.
    Answered {
        /// Its response code.
        rcode: ResponseCode,
        /// TC was set: not every record fit.
        truncated: bool,
    },
    /// Not a DNS message we could read: answered FORMERR.
    Malformed,
    /// Shorter than a header, or itself a response: no answer at all.
    Dropped,
}

/// The responder's result for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Bytes to send back, if any.
    pub bytes: Option<Vec<u8>>,
    /// What happened.
    pub outcome: Outcome,
}

/// Answers one query (see the module docs).
pub fn respond(resolver: &Resolver, cfg: &DnsConfig, packet: &[u8], transport: Transport) -> Reply {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return Reply {
            bytes: None,
            outcome: Outcome::Dropped,
        };
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
            let mut m = Message::error_msg(id, op, ResponseCode::FormErr);
            m.metadata.recursion_desired = packet[2] & 0x01 != 0;
            return Reply {
                bytes: m.to_vec().ok(),
                outcome: Outcome::Malformed,
            };
        }
    };
    let mut response = Message::new(id, MessageType::Response, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    let max = match transport {
        Transport::Tcp => TCP_MAX,
        Transport::Udp => request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP, |e| usize::from(e.max_payload().max(512))),
    };
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    let rcode = if request.metadata.op_code != OpCode::Query {
        response.metadata.authoritative = false;
        ResponseCode::NotImp
    } else if request.queries.len() != 1 {
        response.metadata.authoritative = false;
        ResponseCode::FormErr
    } else {
        let query = request.queries[0].clone();
        response.add_query(query.clone());
        answer(resolver, cfg, &query, &mut response)
    };
    response.metadata.response_code = rcode;
    let (bytes, truncated) = fit(&mut response, max);
    Reply {
        bytes,
        outcome: Outcome::Answered { rcode, truncated },
    }
}

/// What a name in the domain is about.
enum Subject {
    /// The domain itself, `service.<d>` or `node.<d>`.
    Apex,
    /// `<svc>.service.<d>`.
    Service(String),
    /// `_<port>._<proto>.<svc>.service.<d>`.
    Port {
        service: String,
        port: String,
        proto: String,
    },
    /// `<node>.node.<d>`.
    Node(String),
    /// Anything else in the domain.
    Unknown,
}

/// The labels of `name`, lower case, if it lies in `domain`; else `None`.
fn in_domain(name: &Name, domain: &str) -> Option<Vec<String>> {
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    let dom: Vec<&str> = domain.split('.').collect();
    if labels.len() < dom.len() {
        return None;
    }
    let split = labels.len() - dom.len();
    if labels[split..].iter().zip(&dom).any(|(a, b)| a != b) {
        return None;
    }
    Some(labels[..split].to_vec())
}

fn subject(rel: &[String]) -> Subject {
    match rel {
        [] => Subject::Apex,
        [only] if only == "service" || only == "node" => Subject::Apex,
        [node, kind] if kind == "node" => Subject::Node(node.clone()),
        [svc, kind] if kind == "service" => Subject::Service(svc.clone()),
        [prefix @ .., proto, svc, kind]
            if kind == "service" && proto.starts_with('_') && !prefix.is_empty() =>
        {
            // Port names may contain dots: `_a.b._tcp.web.service.shoal`.
            let port = prefix.join(".");
            match port.strip_prefix('_') {
                Some(p) if !p.is_empty() => Subject::Port {
                    service: svc.clone(),
                    port: p.to_string(),
                    proto: proto[1..].to_string(),
                },
                _ => Subject::Unknown,
            }
        }
        _ => Subject::Unknown,
    }
}

/// Fills the answer to `query` into `out`; returns its response code.
fn answer(resolver: &Resolver, cfg: &DnsConfig, query: &Query, out: &mut Message) -> ResponseCode {
    let class = query.query_class();
    if class != DNSClass::IN && class != DNSClass::ANY {
        out.metadata.authoritative = false;
        return ResponseCode::Refused;
    }
    let Some(rel) = in_domain(query.name(), &cfg.domain) else {
        out.metadata.authoritative = false;
        return ResponseCode::Refused;
    };
    let qtype = query.query_type();
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        out.metadata.authoritative = false;
        return ResponseCode::Refused;
    }
    let rcode = fill(resolver, cfg, &rel, query, out);
    if out.answers.is_empty() && matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
        // Negative answers carry the SOA: its minimum bounds how long they are cached.
        out.add_authority(soa(resolver, cfg));
    }
    rcode
}

/// The records for `rel` (the name's labels below the domain) into `out`.
fn fill(
    resolver: &Resolver,
    cfg: &DnsConfig,
    rel: &[String],
    query: &Query,
    out: &mut Message,
) -> ResponseCode {
    let qtype = query.query_type();
    let name = query.name().clone();
    let ttl = cfg.ttl;
    match subject(rel) {
        Subject::Apex => {
            if qtype == RecordType::SOA && rel.is_empty() {
                out.add_answer(soa(resolver, cfg));
                return ResponseCode::NoError;
            }
            ResponseCode::NoError
        }
        Subject::Unknown => ResponseCode::NXDomain,
        Subject::Node(node) => match node_ip(resolver, &node) {
            None => ResponseCode::NXDomain,
            Some(ip) => {
                if let Some(r) = address_record(&name, ttl, ip, qtype) {
                    out.add_answer(r);
                }
                ResponseCode::NoError
            }
        },
        Subject::Service(svc) => match resolver.lookup(&svc) {
            None => ResponseCode::NXDomain,
            Some(a) => {
                match qtype {
                    RecordType::A | RecordType::AAAA | RecordType::ANY => {
                        let mut seen: Vec<IpAddr> = Vec::new();
                        for r in &a.endpoints {
                            let ip = r.endpoint.ip;
                            if seen.contains(&ip) {
                                continue;
                            }
                            seen.push(ip);
                            if let Some(rec) = address_record(&name, ttl, ip, qtype) {
                                out.add_answer(rec);
                            }
                        }
                    }
                    RecordType::SRV => srv_records(resolver, cfg, &name, &a, None, out),
                    _ => {}
                }
                ResponseCode::NoError
            }
        },
        Subject::Port {
            service,
            port,
            proto,
        } => {
            let Some(entry) = resolver.service(&service) else {
                return ResponseCode::NXDomain;
            };
            let Some(def) = entry
                .ports
                .iter()
                .find(|p| p.name.eq_ignore_ascii_case(&port) && p.protocol.as_str() == proto)
            else {
                return ResponseCode::NXDomain;
            };
            if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                if let Some(a) = resolver.lookup(&service) {
                    srv_records(resolver, cfg, &name, &a, Some(&def.name), out);
                }
            }
            ResponseCode::NoError
        }
    }
}

fn node_ip(resolver: &Resolver, label: &str) -> Option<IpAddr> {
    resolver.node_ip(label).or_else(|| {
        resolver
            .catalog()
            .nodes
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(label))
            .map(|(_, ip)| *ip)
    })
}

fn address_record(name: &Name, ttl: u32, ip: IpAddr, qtype: RecordType) -> Option<Record> {
    match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
            Some(Record::from_rdata(name.clone(), ttl, RData::A(A(v4))))
        }
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
            Some(Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(v6))))
        }
        _ => None,
    }
}

/// SRV records of `answer` (its endpoints' `port`, or their first port), with the
/// targets' addresses as additional records.
fn srv_records(
    resolver: &Resolver,
    cfg: &DnsConfig,
    name: &Name,
    answer: &crate::resolve::Answer,
    port: Option<&str>,
    out: &mut Message,
) {
    let mut glued: Vec<String> = Vec::new();
    for r in &answer.endpoints {
        let e = &r.endpoint;
        let found = match port {
            Some(p) => e.ports.iter().find(|(n, _)| n == p),
            None => e.ports.first(),
        };
        let Some((_, number)) = found else { continue };
        // A loopback-only replica is reached at the caller's own loopback, which is
        // not what `<node>.node` names.
        let target = if e.local_only && Some(e.ip) != resolver.node_ip(&e.node) {
            Name::from_ascii("localhost.")
        } else {
            Name::from_ascii(format!("{}.node.{}.", e.node, cfg.domain))
        };
        let Ok(target) = target else { continue };
        let weight = u16::try_from(r.weight).unwrap_or(u16::MAX);
        out.add_answer(Record::from_rdata(
            name.clone(),
            cfg.ttl,
            RData::SRV(SRV::new(1, weight, *number, target.clone())),
        ));
        let key = target.to_ascii();
        if glued.contains(&key) || key == "localhost." {
            continue;
        }
        glued.push(key);
        if let Some(ip) = resolver.node_ip(&e.node) {
            let qtype = if ip.is_ipv4() {
                RecordType::A
            } else {
                RecordType::AAAA
            };
            if let Some(rec) = address_record(&target, cfg.ttl, ip, qtype) {
                out.add_additional(rec);
            }
        }
    }
}

fn soa(resolver: &Resolver, cfg: &DnsConfig) -> Record {
    let apex = Name::from_ascii(format!("{}.", cfg.domain)).unwrap_or_else(|_| Name::root());
    let ns = Name::from_ascii(format!("ns.{}.", cfg.domain)).unwrap_or_else(|_| Name::root());
    let mail =
        Name::from_ascii(format!("hostmaster.{}.", cfg.domain)).unwrap_or_else(|_| Name::root());
    // Serial: the catalog generation (wraps after 4 billion changes, as serials may).
    let serial = resolver.generation() as u32;
    Record::from_rdata(
        apex,
        cfg.ttl,
        RData::SOA(SOA::new(ns, mail, serial, 3600, 600, 86_400, cfg.ttl)),
    )
}

/// Encodes `m` within `max` bytes: first whole, else without additional records and
/// with as many answers as fit, TC set. Returns the bytes and whether TC was set.
fn fit(m: &mut Message, max: usize) -> (Option<Vec<u8>>, bool) {
    match m.to_vec() {
        Ok(b) if b.len() <= max => return (Some(b), false),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("cannot encode a DNS answer: {e}");
            let mut fail =
                Message::error_msg(m.metadata.id, m.metadata.op_code, ResponseCode::ServFail);
            fail.add_queries(m.queries.iter().cloned());
            return (fail.to_vec().ok(), false);
        }
    }
    m.metadata.truncation = true;
    m.additionals.clear();
    m.authorities.clear();
    let answers = std::mem::take(&mut m.answers);
    // The largest prefix of the answers that fits (binary search on its length).
    let (mut lo, mut hi) = (0usize, answers.len());
    let mut best = None;
    while lo <= hi {
        let mid = (lo + hi) / 2;
        m.answers = answers[..mid].to_vec();
        match m.to_vec() {
            Ok(b) if b.len() <= max => {
                best = Some(b);
                lo = mid + 1;
            }
            _ => {
                if mid == 0 {
                    break;
                }
                hi = mid - 1;
            }
        }
    }
    (best, true)
}

#[cfg(test)]
mod tests;
