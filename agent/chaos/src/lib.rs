//! Real shoal agents in Linux network namespaces, wired so tests can cut and
//! restore the network between them, and a seeded chaos runner on top.
//!
//! A [`Lab`] is an isolated little network on one machine: a *hub* namespace
//! holding bridges, and one namespace per agent whose only interface (`eth0`,
//! address `10.77.0.<i+1>/16`) is a veth pair to a port on a hub bridge. All
//! agents start on bridge 0; [`Lab::partition`] moves agents' ports onto other
//! bridges, so any grouping (singletons included) is one call, and
//! [`Lab::heal`] puts every port back. [`Lab::set_loss`] drops a share of an
//! agent's incoming packets (iptables `statistic` inside its namespace),
//! [`Lab::set_delay`] holds them for a while (the kernel's NFQUEUE hands them to
//! a [`Delayer`] thread of the harness; this kernel has no `netem`), and
//! [`Lab::fill_disk`] fills an agent's tmpfs data dir. Addresses exist only
//! inside the lab's namespaces, so labs of parallel tests never see each other.
//!
//! Agents are real `shoal agent` processes (`ip netns exec <ns> shoal agent …`),
//! each with its own data dir under the lab's temp dir, joined through agent 0.
//! Their HTTP API listens on `127.0.0.1:7101` inside their namespace;
//! [`Lab::cli`] runs a `shoal` command there.
//!
//! Everything is removed when the lab is dropped, also after a failed test:
//! agents get SIGKILL (with their process group), workloads tagged with the lab
//! are killed, tmpfs data dirs are unmounted and the namespaces are deleted.
//! Namespaces of labs whose creating process is dead (a test or runner killed
//! midway) are removed, with whatever still runs in them, when the next lab is
//! created. Needs root (network namespaces).
//!
//! The chaos runner ([`run`]) plays a seeded [`Schedule`] of faults (partitions
//! of every shape, loss, delay, `kill -9` and restart, SIGSTOP/SIGCONT, full disks)
//! with client load (kv writes, deploys, scales, removals), heals, and checks
//! the invariants: every acknowledged write everywhere, one value per key, each
//! live slot run by exactly one process on the host, no process that no slot
//! names, no node over its CPU, no agent panicked. A failing run prints its seed
//! and the command that replays it. It does not check failure-detection timing
//! (the simulator and `tests/chaos.rs` do).

mod delay;
mod lab;
mod run;
mod schedule;

pub use delay::Delayer;
pub use lab::{Lab, LabAgent, LabConfig, Starver, Workload, AGENT_API, AGENT_PORT};
pub use run::{run, violations, ChaosConfig, Ledger, RunFailure, RunReport};
pub use schedule::{Fault, Op, OpKind, Rng, Schedule, Step, CI_SEEDS, CI_STEPS};
