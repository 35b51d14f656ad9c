//! QUIC transport of shoal: one quinn endpoint per agent that both listens and dials,
//! mutual TLS against a cluster CA (rustls with the ring provider), a connection cache
//! keyed by peer address, and the certificate tooling (`init_ca`, `issue`) that creates
//! that CA and the node certificates.
//!
//! Messages are opaque bytes: a reliable message travels as one unidirectional stream,
//! an unreliable one as one QUIC datagram. Each received message carries the sender's
//! name, read from its verified certificate, and its address. Peers that do not present
//! a certificate from the cluster CA are refused at the handshake and never produce a
//! message. Sending never blocks and never returns an error: failures are counted in
//! [`NetStats`] and logged at debug level, because the layers above treat the network as
//! lossy.
//!
//! This crate does not encode or decode frames, know about membership or replication,
//! retry failed messages, rotate certificates, or check revocation; it only moves bytes
//! between authenticated nodes.

mod certs;
mod endpoint;
mod error;
mod tls;

#[cfg(test)]
mod tests;

pub use certs::{init_ca, issue, Identity};
pub use endpoint::{Incoming, Net, NetConfig, NetStats};
pub use error::NetError;
