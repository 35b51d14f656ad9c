//! Service discovery for shoal (ARCHITECTURE §6a): every service reachable by name,
//! with no central registry.
//!
//! - [`catalog`]: the healthy, running endpoints of every service as one agent sees
//!   them, built by a pure function from the agent's published views.
//! - [`resolve`]: the discovery policy's answer for this agent's node, cached per
//!   catalog generation.
//! - [`dns`]: a sans-IO authoritative DNS responder for `<svc>.service.<domain>` and
//!   `<node>.node.<domain>` (bytes in, bytes out; fuzzed and property-tested).
//! - [`server`]: the UDP and TCP listeners that feed the responder.
//! - [`render`]: proxy configs from templates (minijinja), for `shoal render`.
//! - [`view`]: the JSON shape of answers, shared by the HTTP API and the CLI.
//! - [`client`]: a minimal DNS client (UDP, then TCP on truncation) for shoal's tools.
//!
//! What this crate does not do: decide what runs where (the orchestrator), keep state
//! of its own beyond one published catalog (it is rebuilt from the views), recurse to
//! other DNS servers, or sign answers (no DNSSEC).

#![warn(missing_docs)]

pub mod catalog;
pub mod client;
pub mod dns;
pub mod render;
pub mod resolve;
pub mod server;
pub mod view;

pub use catalog::{Catalog, CatalogSource, Endpoint, NodeEntry, PortDef, ServiceEntry};
pub use dns::{respond, DnsConfig, Outcome, Reply, Transport};
pub use hickory_proto as proto;
pub use hickory_proto::rr::RecordType;
pub use resolve::{Answer, InOrder, Policy, Ranked, Resolver};
pub use server::{DnsServer, DnsStats};
pub use view::{AnswerView, CatalogView, EndpointView, LookupView};
