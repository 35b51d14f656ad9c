//! One name, one live identity: the guard in front of SWIM.
//!
//! A node's identity is its name (bound to its certificate) plus its SWIM identity:
//! the address it listens on and the generation of its process. TLS proves the name;
//! it cannot tell a restarted node from a second process holding the same
//! certificate (a copied `node.pem`, or one self-issued from `ca.key`). This guard
//! decides, for every SWIM packet whose sender claims a name that an *active* member
//! already holds under another identity, whether the claimant is let in:
//!
//! - same address as the holder: a restart in place (the old process cannot still
//!   hold the socket), or the holder renewing its own identity: let in, and SWIM's
//!   own conflict rule (higher generation wins) replaces the old identity;
//! - another address: the claimant's packets are held back while the holder is
//!   probed at its address under its name ([`Verdict::Verify`]). An answer means the
//!   holder lives: the claimant is refused ([`Guard::on_ack`]) and told why, and its
//!   node-owned writes are dropped from then on. No answer within the verification
//!   timeout means the holder is gone (it crashed or moved): the claimant is let in
//!   and the holder declared down ([`Guard::on_timeout`]).
//!
//! A real restart, on the same or a new address, is therefore accepted within
//! seconds, while a second live process with a live node's name never gets into the
//! membership and cannot overwrite that node's state. The guard is sans-IO like the
//! rest of the core: it returns verdicts, and the [`crate::Node`] sends the probes and
//! arms the timers.
//!
//! Not covered: a duplicate that reaches a part of the cluster that has never heard
//! of the holder (e.g. while a partition hides the holder) is let in there; when the
//! parts meet, every node that sees both probes again and refuses one of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::membership::NodeId;
use crate::state::WriterId;

/// How long a refusal is remembered (and the claimant's writes dropped).
const REFUSAL_MS: u64 = 10 * 60 * 1000;
/// A refused claimant is told at most this often.
const TELL_EVERY_MS: u64 = 1000;
/// How long an accepted replacement is let in before the normal rules apply again
/// (by then SWIM knows it and has declared the old identity down).
const ACCEPTED_MS: u64 = 60 * 1000;

/// What to do with a SWIM packet from a claimant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to SWIM.
    Admit,
    /// Drop it and probe the holder at `holder` with `nonce`; call
    /// [`Guard::on_timeout`] after the verification timeout.
    Verify {
        /// The holder's address.
        holder: SocketAddr,
        /// Nonce of the probe.
        nonce: u64,
    },
    /// Drop it: a verification of this name is in flight.
    Wait,
    /// Drop it; if `tell` is set, send the claimant this reason.
    Refuse {
        /// The reason to send, at most once per second per claimant.
        tell: Option<String>,
    },
}

/// A verification in flight.
#[derive(Debug, Clone)]
struct Check {
    holder: NodeId,
    claimant: NodeId,
    nonce: u64,
}

#[derive(Debug, Clone)]
struct Refusal {
    claimant: NodeId,
    /// The live identity whose answer caused the refusal; once it is no longer
    /// active the claimant is judged afresh (the holder may have died).
    holder: NodeId,
    reason: String,
    until_ms: u64,
    told_ms: Option<u64>,
}

/// The guard's state (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Guard {
    checks: BTreeMap<String, Check>,
    accepted: BTreeMap<String, (NodeId, u64)>,
    refused: Vec<Refusal>,
    next_nonce: u64,
}

/// The reason a claimant of `name` is refused.
pub(crate) fn held_by(name: &str, holder: SocketAddr) -> String {
    format!("name {name} is held by a live node at {holder}")
}

impl Guard {
    /// Judges a packet from `claimant`; `holder` is the active member that holds the
    /// same name under another identity, if any; `me` is our own identity (a claimant
    /// of our own name is refused at once: we are evidently alive).
    pub(crate) fn judge(
        &mut self,
        claimant: &NodeId,
        holder: Option<&NodeId>,
        me: &NodeId,
        now_ms: u64,
        nonce_seed: u64,
    ) -> Verdict {
        self.expire(now_ms);
        // A refusal stands while the identity that caused it is still the active one;
        // when the refused process speaks again after the holder died, it is judged
        // afresh.
        let holding = |r: &Refusal| r.holder == *me || holder == Some(&r.holder);
        self.refused
            .retain(|r| r.claimant != *claimant || holding(r));
        if let Some(r) = self.refused.iter_mut().find(|r| r.claimant == *claimant) {
            let tell = match r.told_ms {
                Some(t) if now_ms < t + TELL_EVERY_MS => None,
                _ => {
                    r.told_ms = Some(now_ms);
                    Some(r.reason.clone())
                }
            };
            return Verdict::Refuse { tell };
        }
        if claimant.name == me.name {
            if claimant.addr == me.addr {
                // Our own address under our name: a stale packet of an earlier
                // generation of ours, relayed back; SWIM ignores it.
                return Verdict::Admit;
            }
            return self.refuse(
                claimant.clone(),
                me.clone(),
                held_by(&me.name, me.addr),
                now_ms,
            );
        }
        let Some(holder) = holder else {
            return Verdict::Admit;
        };
        if holder.addr == claimant.addr {
            return Verdict::Admit;
        }
        if self
            .accepted
            .get(&claimant.name)
            .is_some_and(|(id, _)| id == claimant)
        {
            return Verdict::Admit;
        }
        if self.checks.contains_key(&claimant.name) {
            return Verdict::Wait;
        }
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let nonce = nonce_seed ^ self.next_nonce.rotate_left(32);
        self.checks.insert(
            claimant.name.clone(),
            Check {
                holder: holder.clone(),
                claimant: claimant.clone(),
                nonce,
            },
        );
        Verdict::Verify {
            holder: holder.addr,
            nonce,
        }
    }

    fn refuse(&mut self, claimant: NodeId, holder: NodeId, reason: String, now_ms: u64) -> Verdict {
        self.refused.push(Refusal {
            claimant,
            holder,
            reason: reason.clone(),
            until_ms: now_ms + REFUSAL_MS,
            told_ms: Some(now_ms),
        });
        Verdict::Refuse { tell: Some(reason) }
    }

    /// The holder answered a probe (`from_name` at `from`, authenticated by TLS). If
    /// it answers a verification in flight, the claimant is refused: returns the
    /// claimant, the holder and the reason to send.
    pub(crate) fn on_ack(
        &mut self,
        from_name: &str,
        from: SocketAddr,
        nonce: u64,
        now_ms: u64,
    ) -> Option<(NodeId, NodeId, String)> {
        let check = self.checks.get(from_name)?;
        if check.nonce != nonce || check.holder.addr != from {
            return None;
        }
        let check = self.checks.remove(from_name)?;
        let reason = held_by(from_name, check.holder.addr);
        self.refuse(
            check.claimant.clone(),
            check.holder.clone(),
            reason.clone(),
            now_ms,
        );
        Some((check.claimant, check.holder, reason))
    }

    /// The verification of `name` with `nonce` timed out: the holder did not answer,
    /// so the claimant replaces it. Returns (holder, claimant), or `None` if that
    /// verification already ended.
    pub(crate) fn on_timeout(
        &mut self,
        name: &str,
        nonce: u64,
        now_ms: u64,
    ) -> Option<(NodeId, NodeId)> {
        if self.checks.get(name).is_none_or(|c| c.nonce != nonce) {
            return None;
        }
        let check = self.checks.remove(name)?;
        self.accepted.insert(
            name.to_string(),
            (check.claimant.clone(), now_ms + ACCEPTED_MS),
        );
        Some((check.holder, check.claimant))
    }

    /// Whether node-owned writes of `writer` must be dropped: it is a process that was
    /// refused because another one held its name.
    pub(crate) fn is_refused_writer(&self, writer: &WriterId) -> bool {
        self.refused
            .iter()
            .any(|r| r.claimant.name == writer.node && r.claimant.gen == writer.gen)
    }

    /// Refusals in force.
    #[cfg(test)]
    pub(crate) fn refusals(&self) -> usize {
        self.refused.len()
    }

    fn expire(&mut self, now_ms: u64) {
        self.refused.retain(|r| r.until_ms > now_ms);
        self.accepted.retain(|_, (_, until)| *until > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, port: u16, gen: u64) -> NodeId {
        NodeId {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            gen,
        }
    }

    #[test]
    fn a_live_holder_refuses_the_claimant_and_its_writes() {
        let me = id("n9", 9000, 1);
        let holder = id("n1", 7001, 10);
        let claimant = id("n1", 7005, 20);
        let mut g = Guard::default();
        let Verdict::Verify { holder: at, nonce } = g.judge(&claimant, Some(&holder), &me, 0, 7)
        else {
            panic!("expected a verification");
        };
        assert_eq!(at, holder.addr);
        assert_eq!(g.judge(&claimant, Some(&holder), &me, 10, 7), Verdict::Wait);
        // An answer from anyone else, or with another nonce, proves nothing.
        assert!(g.on_ack("n2", holder.addr, nonce, 20).is_none());
        assert!(g.on_ack("n1", holder.addr, nonce ^ 1, 20).is_none());
        assert!(g.on_ack("n1", claimant.addr, nonce, 20).is_none());
        let (c, h, reason) = g.on_ack("n1", holder.addr, nonce, 30).expect("refused");
        assert_eq!((c, h), (claimant.clone(), holder.clone()));
        assert_eq!(reason, "name n1 is held by a live node at 127.0.0.1:7001");
        assert!(g.is_refused_writer(&WriterId {
            node: "n1".into(),
            gen: 20
        }));
        assert!(!g.is_refused_writer(&WriterId {
            node: "n1".into(),
            gen: 10
        }));
        // The holder's own packets do not lift the refusal.
        assert_eq!(g.judge(&holder, None, &me, 35, 7), Verdict::Admit);
        assert!(g.is_refused_writer(&WriterId {
            node: "n1".into(),
            gen: 20
        }));
        // Told once, then at most every second.
        assert_eq!(
            g.judge(&claimant, Some(&holder), &me, 40, 7),
            Verdict::Refuse { tell: None }
        );
        assert!(matches!(
            g.judge(&claimant, Some(&holder), &me, 1100, 7),
            Verdict::Refuse { tell: Some(_) }
        ));
        // The timeout of a finished verification does nothing.
        assert!(g.on_timeout("n1", nonce, 3000).is_none());
        // Once the holder is no longer active, the claimant is judged afresh.
        assert_eq!(g.judge(&claimant, None, &me, 4000, 7), Verdict::Admit);
        assert!(!g.is_refused_writer(&WriterId {
            node: "n1".into(),
            gen: 20
        }));
    }

    #[test]
    fn a_silent_holder_is_replaced_and_restarts_in_place_pass() {
        let me = id("n9", 9000, 1);
        let holder = id("n1", 7001, 10);
        let moved = id("n1", 7005, 20);
        let mut g = Guard::default();
        let Verdict::Verify { nonce, .. } = g.judge(&moved, Some(&holder), &me, 0, 3) else {
            panic!("expected a verification");
        };
        assert_eq!(
            g.on_timeout("n1", nonce, 2000),
            Some((holder.clone(), moved.clone()))
        );
        assert_eq!(g.judge(&moved, Some(&holder), &me, 2100, 3), Verdict::Admit);
        // Same address, new generation: a restart in place.
        let again = id("n1", 7001, 30);
        assert_eq!(g.judge(&again, Some(&holder), &me, 2200, 3), Verdict::Admit);
        // Nobody holds the name: let in.
        assert_eq!(g.judge(&id("n2", 7002, 5), None, &me, 0, 3), Verdict::Admit);
    }

    #[test]
    fn our_own_name_from_elsewhere_is_refused_at_once() {
        let me = id("n1", 7001, 10);
        let mut g = Guard::default();
        let v = g.judge(&id("n1", 7005, 20), None, &me, 0, 1);
        assert_eq!(
            v,
            Verdict::Refuse {
                tell: Some("name n1 is held by a live node at 127.0.0.1:7001".into())
            }
        );
        assert_eq!(g.refusals(), 1);
    }
}
