//! The sans-IO core of shoal.
//!
//! This crate holds everything an agent decides, and nothing it does: SWIM
//! membership (through `foca`, with Lifeguard's local health, confirmed
//! suspicions and buddy refutation around it), the hybrid logical clock, the replicated
//! last-writer-wins map with node-owned and cluster-wide keys, epidemic push
//! and anti-entropy sync, and the versioned CBOR wire format. A [`Node`] is
//! given the time, received frames and local writes, and returns frames to
//! send, timers to wait for and events. It opens no sockets, spawns no tasks,
//! reads no clock and draws randomness only from its seed, which is what lets
//! `shoal-sim` run thousands of nodes deterministically in one process.
//!
//! Two safety rules live here too. A node left without any live peer (every
//! other member down, e.g. after a partition into singletons) keeps announcing
//! itself to its seeds and to every member it knew, with backoff capped at
//! [`Config::rejoin_max`], so every partition heals once the links are back.
//! And one name has one live identity: a process that claims the name of a live
//! member from another address is refused (and its node-owned writes dropped)
//! as long as the holder answers at its address; a restart is accepted as soon
//! as the old identity no longer answers (see the `identity` module).
//!
//! It does not know about QUIC, TLS, disks, containers or HTTP: those belong to
//! `shoal-net`, `shoal-store` and the `shoal` binary.

mod histogram;
mod hlc;
mod identity;
pub mod lifeguard;
mod membership;
mod node;
mod state;
pub mod wire;

pub use histogram::{Histogram, BUCKETS_SECS};
pub use hlc::{Clock, ClockError, Hlc};
pub use lifeguard::LifeguardConfig;
pub use membership::{NodeId, Status};
pub use node::{
    Config, Event, ForgetRefusal, Node, Now, Output, Profile, Stats, FORGET_PREFIX, LEFT_SUFFIX,
    SWIM_PACKET_SIZE,
};
pub use state::{
    validate, Delta, Entry, Reject, State, WriterId, MAX_KEY_LEN, MAX_VALUE_LEN, NODE_PREFIX,
};
