//! The sans-IO core of shoal.
//!
//! This crate holds everything an agent decides, and nothing it does: SWIM
//! membership (through `foca`), the hybrid logical clock, the replicated
//! last-writer-wins map with node-owned and cluster-wide keys, epidemic push
//! and anti-entropy sync, and the versioned CBOR wire format. A [`Node`] is
//! given the time, received frames and local writes, and returns frames to
//! send, timers to wait for and events. It opens no sockets, spawns no tasks,
//! reads no clock and draws randomness only from its seed, which is what lets
//! `shoal-sim` run thousands of nodes deterministically in one process.
//!
//! It does not know about QUIC, TLS, disks, containers or HTTP: those belong to
//! `shoal-net`, `shoal-store` and the `shoal` binary.

mod hlc;
mod membership;
mod node;
mod state;
pub mod wire;

pub use hlc::{Clock, ClockError, Hlc};
pub use membership::{NodeId, Status};
pub use node::{Config, Event, Node, Now, Output, Profile, Stats, LEFT_SUFFIX, SWIM_PACKET_SIZE};
pub use state::{
    validate, Delta, Entry, Reject, State, WriterId, MAX_KEY_LEN, MAX_VALUE_LEN, NODE_PREFIX,
};
