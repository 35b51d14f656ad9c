//! SWIM membership: a thin layer over the `foca` crate.
//!
//! foca is sans-IO like the rest of the core: it is handed packets and timer
//! events and accumulates packets to send, timers to set and notifications.
//! This module supplies the identity type, a CBOR codec for foca's packets and
//! the view `shoal nodes` shows (alive, suspect, down).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use foca::{
    AccumulatingRuntime, Codec, Foca, Header, Member, NoCustomBroadcast, OwnedNotification,
};
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

/// A member's identity in SWIM: its name, QUIC address and process generation.
///
/// The address is what SWIM uses to tell identities apart; a restarted agent
/// on the same address has a larger generation and replaces its old self.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// The node's name, as in its certificate.
    pub name: String,
    /// Where the node listens for QUIC.
    pub addr: SocketAddr,
    /// Generation of the node's process; larger wins.
    pub gen: u64,
}

impl NodeId {
    /// A placeholder identity for a seed address whose name is not known yet.
    pub fn seed(addr: SocketAddr) -> Self {
        NodeId {
            name: String::new(),
            addr,
            gen: 0,
        }
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            gen: self.gen.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.gen > adversary.gen
    }
}

/// foca's codec errors.
#[derive(Debug, thiserror::Error)]
#[error("SWIM codec: {0}")]
pub struct CodecError(String);

/// Encodes foca's headers and member updates as CBOR.
#[derive(Debug, Default, Clone, Copy)]
pub struct CborCodec;

fn decode_one<T: for<'de> Deserialize<'de>>(mut buf: impl Buf) -> Result<T, CodecError> {
    let mut de = serde_cbor::Deserializer::from_slice(buf.chunk());
    let v = T::deserialize(&mut de).map_err(|e| CodecError(e.to_string()))?;
    let used = de.byte_offset();
    buf.advance(used);
    Ok(v)
}

impl Codec<NodeId> for CborCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), CodecError> {
        serde_cbor::to_writer(buf.writer(), header).map_err(|e| CodecError(e.to_string()))
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeId>, CodecError> {
        decode_one(buf)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), CodecError> {
        serde_cbor::to_writer(buf.writer(), member).map_err(|e| CodecError(e.to_string()))
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeId>, CodecError> {
        decode_one(buf)
    }
}

/// Reads the sender of a SWIM packet without handing it to foca.
pub fn packet_sender(packet: &[u8]) -> Option<NodeId> {
    decode_one::<Header<NodeId>>(packet).ok().map(|h| h.src)
}

/// A member's status as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Answering probes.
    Alive,
    /// Missed probes; will be declared down unless it refutes.
    Suspect,
    /// Declared down by the cluster.
    Down,
    /// Left gracefully.
    Left,
}

impl Status {
    /// Lower-case name, as in the CLI and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Alive => "alive",
            Status::Suspect => "suspect",
            Status::Down => "down",
            Status::Left => "left",
        }
    }
}

/// The foca instance type used by shoal.
pub type Swim = Foca<NodeId, CborCodec, SmallRng, NoCustomBroadcast>;

/// SWIM membership with its accumulated effects.
pub struct Membership {
    foca: Swim,
    rt: AccumulatingRuntime<NodeId>,
}

/// Effects produced by the membership layer.
pub enum MemberEffect {
    /// Send this SWIM packet.
    Send(NodeId, Vec<u8>),
    /// Call [`Membership::handle_timer`] with this timer after the delay.
    Timer(foca::Timer<NodeId>, Duration),
    /// Something happened.
    Notify(OwnedNotification<NodeId>),
}

/// The foca timer type.
pub type SwimTimer = foca::Timer<NodeId>;

impl Membership {
    /// Starts membership as `id` with the given foca config and RNG.
    pub fn new(id: NodeId, config: foca::Config, rng: SmallRng) -> Self {
        Membership {
            foca: Foca::new(id, config, rng, CborCodec),
            rt: AccumulatingRuntime::new(),
        }
    }

    /// Our current identity.
    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Asks `seed` to let us in.
    pub fn announce(&mut self, seed: NodeId) -> Result<(), foca::Error> {
        self.foca.announce(seed, &mut self.rt)
    }

    /// Feeds one received SWIM packet.
    pub fn handle_data(&mut self, packet: &[u8]) -> Result<(), foca::Error> {
        self.foca.handle_data(packet, &mut self.rt)
    }

    /// Fires a timer set earlier.
    pub fn handle_timer(&mut self, timer: SwimTimer) -> Result<(), foca::Error> {
        self.foca.handle_timer(timer, &mut self.rt)
    }

    /// Declares `id` down (a process elsewhere took over its name and it did not
    /// answer); the update spreads through SWIM like any other.
    pub fn declare_down(&mut self, id: NodeId) -> Result<(), foca::Error> {
        self.foca
            .apply_many(std::iter::once(Member::down(id)), true, &mut self.rt)
    }

    /// The incarnation foca holds `id` at, if it knows it.
    pub fn incarnation_of(&self, id: &NodeId) -> Option<u16> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id() == id)
            .map(|m| m.incarnation())
    }

    /// Whether foca holds `id` active (alive or suspect) at exactly `incarnation`.
    pub fn is_active_at(&self, id: &NodeId, incarnation: u16) -> bool {
        self.foca.iter_membership_state().any(|m| {
            m.id() == id && m.incarnation() == incarnation && m.state() != foca::State::Down
        })
    }

    /// Sends pending membership updates to a few random members now, rather than
    /// at the next periodic gossip (for news that should not wait: a refutation,
    /// a member declared down).
    pub fn gossip(&mut self) -> Result<(), foca::Error> {
        self.foca.gossip(&mut self.rt)
    }

    /// Whether foca holds `id` suspect at exactly `incarnation`.
    pub fn is_suspect_at(&self, id: &NodeId, incarnation: u16) -> bool {
        self.foca.iter_membership_state().any(|m| {
            m.id() == id && m.incarnation() == incarnation && m.state() == foca::State::Suspect
        })
    }

    /// Refutes a suspicion of ourselves at `incarnation` (foca raises our
    /// incarnation past it and spreads that we are alive).
    pub fn refute(&mut self, incarnation: u16) -> Result<(), foca::Error> {
        let me = Member::new(
            self.foca.identity().clone(),
            incarnation,
            foca::State::Suspect,
        );
        self.foca
            .apply_many(std::iter::once(me), true, &mut self.rt)
    }

    /// Announces our departure; peers mark us down.
    pub fn leave(&mut self) -> Result<(), foca::Error> {
        self.foca.leave_cluster(&mut self.rt)
    }

    /// Active members (alive or suspect), excluding ourselves.
    pub fn active_peers(&self) -> impl Iterator<Item = &NodeId> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Number of active members, excluding ourselves.
    pub fn num_active(&self) -> usize {
        self.foca.num_members()
    }

    /// Everyone foca knows about (excluding ourselves) with their SWIM status.
    pub fn members(&self) -> Vec<(NodeId, Status)> {
        self.foca
            .iter_membership_state()
            .map(|m| {
                let st = match m.state() {
                    foca::State::Alive => Status::Alive,
                    foca::State::Suspect => Status::Suspect,
                    foca::State::Down => Status::Down,
                };
                (m.id().clone(), st)
            })
            .collect()
    }

    /// Members foca holds in suspicion.
    pub fn suspects(&self) -> Vec<NodeId> {
        self.foca
            .iter_membership_state()
            .filter(|m| m.state() == foca::State::Suspect)
            .map(|m| m.id().clone())
            .collect()
    }

    /// Drains the accumulated effects.
    pub fn drain(&mut self, out: &mut Vec<MemberEffect>) {
        while let Some((to, data)) = self.rt.to_send() {
            out.push(MemberEffect::Send(to, data.to_vec()));
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            out.push(MemberEffect::Timer(timer, after));
        }
        while let Some(n) = self.rt.to_notify() {
            out.push(MemberEffect::Notify(n));
        }
    }
}
