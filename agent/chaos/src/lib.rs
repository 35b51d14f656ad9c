//! Real shoal agents in Linux network namespaces, wired so tests can cut and
//! restore the network between them.
//!
//! A [`Lab`] is an isolated little network on one machine: a *hub* namespace
//! holding bridges, and one namespace per agent whose only interface (`eth0`,
//! address `10.77.0.<i+1>/24`) is a veth pair to a port on a hub bridge. All
//! agents start on bridge 0; [`Lab::partition`] moves agents' ports onto other
//! bridges, so any grouping (singletons included) is one call, and
//! [`Lab::heal`] puts every port back. Addresses exist only inside the lab's
//! namespaces, so labs of parallel tests never see each other.
//!
//! Agents are real `shoal agent` processes (`ip netns exec <ns> shoal agent …`),
//! each with its own data dir under the lab's temp dir, joined through agent 0.
//! Their HTTP API listens on `127.0.0.1:7101` inside their namespace;
//! [`Lab::cli`] runs a `shoal` command there.
//!
//! Everything is removed when the lab is dropped, also after a failed test:
//! agents get SIGKILL (with their process group) and the namespaces are deleted.
//! Namespaces of labs whose creating process is dead (a test killed midway) are
//! removed when the next lab is created. Needs root (network namespaces).
//!
//! This crate does not decide what to test: fault schedules and invariants are
//! the callers'.

mod lab;

pub use lab::{Lab, LabAgent, LabConfig, AGENT_API, AGENT_PORT};
