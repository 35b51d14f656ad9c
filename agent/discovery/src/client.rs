//! A minimal DNS client for shoal's own tools (the demo, benchmarks, tests): one
//! question over UDP, retried over TCP when the answer comes back truncated, as a
//! stub resolver does.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The records of one answer, as text (`10.0.0.1`, `1 100 30001 n1.node.shoal.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The response code (`NoError`, `NXDomain`, …).
    pub rcode: String,
    /// Answer records.
    pub records: Vec<String>,
    /// TC was set on the UDP answer (and TCP was used).
    pub truncated_over_udp: bool,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Asks `server` for `name` (`web.service.shoal.`) of type `qtype`.
pub async fn query(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    timeout: Duration,
) -> io::Result<Answered> {
    let name = Name::from_ascii(name).map_err(|e| bad(format!("{name:?}: {e}")))?;
    let id: u16 = rand_id();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    let bytes = m.to_vec().map_err(|e| bad(e.to_string()))?;

    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (
            "::".parse::<std::net::Ipv6Addr>()
                .map_err(|e| bad(e.to_string()))?,
            0,
        )
            .into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no DNS answer from {server}"),
            )
        })??;
    let reply = Message::from_vec(&buf[..n]).map_err(|e| bad(e.to_string()))?;
    if reply.metadata.id != id {
        return Err(bad("answer with another id"));
    }
    if !reply.metadata.truncation {
        return Ok(text(&reply, false));
    }
    let mut tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    tcp.write_all(&framed).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(timeout, tcp.read_exact(&mut len))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TCP answer"))??;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut body).await?;
    let reply = Message::from_vec(&body).map_err(|e| bad(e.to_string()))?;
    Ok(text(&reply, true))
}

fn text(m: &Message, truncated: bool) -> Answered {
    Answered {
        rcode: format!("{:?}", m.metadata.response_code),
        records: m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::SRV(s) => format!("{} {} {} {}", s.priority, s.weight, s.port, s.target),
                other => other.to_string(),
            })
            .collect(),
        truncated_over_udp: truncated,
    }
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u16
}
