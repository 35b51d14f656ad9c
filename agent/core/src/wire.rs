//! The wire format: versioned CBOR frames with a size limit.
//!
//! A frame is `b"SH"`, one version byte, then the CBOR encoding of a
//! [`Msg`]. Decoding never panics: every failure is a [`DecodeError`] whose
//! [`reason`](DecodeError::reason) labels the drop in metrics.

use serde::{Deserialize, Serialize};

use crate::state::{Delta, Entry, WriterId};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SH";
/// The frame version this build speaks.
pub const VERSION: u8 = 1;
/// Largest frame accepted on a stream, in bytes.
pub const MAX_FRAME: usize = 16 << 20;
const HEADER_LEN: usize = 3;

/// One message between agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// A SWIM packet for the membership layer (sent as a datagram).
    Swim(#[serde(with = "serde_bytes")] Vec<u8>),
    /// New changes, pushed epidemically.
    Push {
        /// The entries.
        entries: Vec<Entry>,
    },
    /// Opens an anti-entropy round. Usually only the digest of the sender's
    /// heads travels; a receiver whose digest differs answers with a `SyncReq`
    /// carrying its full heads, which starts the delta exchange.
    SyncReq {
        /// Digest of the sender's heads ([`crate::State::digest`]).
        digest: u64,
        /// The sender's heads, when the receiver should answer with a delta.
        heads: Option<Vec<(WriterId, u64)>>,
    },
    /// What the receiver of a `SyncReq` (or `SyncResp` with `reply`) lacked.
    SyncResp {
        /// The sender's own heads, so the receiver can send back what the sender lacks.
        heads: Vec<(WriterId, u64)>,
        /// The entries the receiver lacks.
        delta: Delta,
        /// Whether the receiver should answer with its own delta.
        reply: bool,
    },
    /// A blob-transfer message (`shoal-blob`'s wire format), carried opaquely:
    /// drivers route it to their blob transfer by [`is_blob`], past the core.
    Blob(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A workload-logs message (the agent's logs request or answer), carried
    /// opaquely: drivers route it by [`is_logs`], past the core.
    Logs(#[serde(with = "serde_bytes")] Vec<u8>),
    /// "Are you still there?": sent to the holder of a name that another process
    /// claims ([`crate::identity`]); the holder answers with [`Msg::ProbeAck`].
    Probe {
        /// Echoed in the answer.
        nonce: u64,
    },
    /// The answer to a [`Msg::Probe`]: the sender (named by its certificate) is alive.
    ProbeAck {
        /// The probe's nonce.
        nonce: u64,
        /// The sender's current SWIM generation.
        gen: u64,
    },
    /// Lifeguard: the `by` node's probe of `member` failed at `incarnation`.
    /// Sent to the member itself (which refutes) and spread to a few peers (for
    /// whom it confirms the suspicion; see [`crate::lifeguard`]).
    Suspect {
        /// The suspected member.
        member: crate::NodeId,
        /// The incarnation its probe failed at.
        incarnation: u16,
        /// The node whose probe failed.
        by: String,
        /// `by` found the member failing with a confirmation check, started by
        /// another node's report; such reports start no further checks.
        #[serde(default)]
        checked: bool,
    },
    /// Our SWIM packets were refused, and why (e.g. our name is held by a live node).
    Refused {
        /// One line for the operator.
        reason: String,
    },
}

impl Msg {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Swim(_) => "swim",
            Msg::Push { .. } => "push",
            Msg::SyncReq { .. } => "sync_req",
            Msg::SyncResp { .. } => "sync_resp",
            Msg::Blob(_) => "blob",
            Msg::Logs(_) => "logs",
            Msg::Probe { .. } => "probe",
            Msg::ProbeAck { .. } => "probe_ack",
            Msg::Refused { .. } => "refused",
            Msg::Suspect { .. } => "suspect",
        }
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a shoal frame at all.
    #[error("not a shoal frame (bad magic)")]
    Garbage,
    /// A shoal frame of a version this build does not speak.
    #[error("unknown frame version {0} (this build speaks {VERSION})")]
    UnknownVersion(u8),
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    /// The CBOR body ended early.
    #[error("truncated frame")]
    Truncated,
    /// The CBOR body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// Metric label of this drop reason.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Garbage => "garbage",
            DecodeError::UnknownVersion(_) => "version",
            DecodeError::Oversized(_) => "oversized",
            DecodeError::Truncated => "truncated",
            DecodeError::Malformed(_) => "malformed",
        }
    }
}

/// The variant name of a frame's message (`b"Swim"`, `b"Blob"`, …) read without
/// decoding the frame: [`encode`] writes a [`Msg`] as a one-entry CBOR map keyed by
/// the variant name. `None` for anything else. Lets a driver route a frame (blob
/// chunks bypass the core) at the cost of a few byte comparisons.
pub fn variant(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < HEADER_LEN || frame[..2] != MAGIC || frame[2] != VERSION {
        return None;
    }
    let body = &frame[HEADER_LEN..];
    // 0xa1: a map of one pair; then a text string of length (b & 0x1f).
    if body.first() != Some(&0xa1) {
        return None;
    }
    let hdr = *body.get(1)?;
    if hdr & 0xe0 != 0x60 {
        return None;
    }
    body.get(2..2 + usize::from(hdr & 0x1f))
}

/// Whether a frame carries a [`Msg::Blob`].
pub fn is_blob(frame: &[u8]) -> bool {
    variant(frame) == Some(b"Blob")
}

/// Whether `frame` is a [`Msg::Logs`] (without decoding it).
pub fn is_logs(frame: &[u8]) -> bool {
    variant(frame) == Some(b"Logs")
}

/// Encodes a message as one frame.
pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    // Writing plain data into a Vec cannot fail.
    serde_cbor::to_writer(&mut out, msg).expect("CBOR encoding into a Vec is infallible");
    out
}

/// Decodes one frame.
pub fn decode(bytes: &[u8]) -> Result<Msg, DecodeError> {
    if bytes.len() > MAX_FRAME {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(DecodeError::Garbage);
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::UnknownVersion(bytes[2]));
    }
    serde_cbor::from_slice(&bytes[HEADER_LEN..]).map_err(|e| {
        if e.is_eof() {
            DecodeError::Truncated
        } else {
            DecodeError::Malformed(e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use proptest::prelude::*;

    fn sample() -> Msg {
        Msg::Push {
            entries: vec![Entry {
                key: "app/color".into(),
                value: Some(b"blue".to_vec()),
                hlc: Hlc(42),
                writer: WriterId {
                    node: "n1".into(),
                    gen: 7,
                },
                seq: 1,
            }],
        }
    }

    #[test]
    fn variants_are_read_without_decoding() {
        assert_eq!(variant(&encode(&sample())), Some(&b"Push"[..]));
        assert!(is_blob(&encode(&Msg::Blob(vec![1; 100]))));
        assert!(!is_blob(&encode(&Msg::Swim(vec![1]))));
        assert!(is_logs(&encode(&Msg::Logs(vec![2; 10]))));
        assert!(!is_logs(&encode(&Msg::Blob(vec![2; 10]))));
        assert_eq!(variant(b"SH\x01"), None);
        assert_eq!(variant(b"XX\x01\xa1\x64Blob"), None);
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(decode(&encode(&m)).unwrap(), m);
    }

    #[test]
    fn every_failure_has_a_reason() {
        assert_eq!(decode(b""), Err(DecodeError::Garbage));
        assert_eq!(decode(b"hello world"), Err(DecodeError::Garbage));
        let mut f = encode(&sample());
        f[2] = 99;
        assert_eq!(decode(&f), Err(DecodeError::UnknownVersion(99)));
        let f = encode(&sample());
        assert_eq!(decode(&f[..f.len() - 3]), Err(DecodeError::Truncated));
        let mut bad = MAGIC.to_vec();
        bad.push(VERSION);
        bad.extend_from_slice(&[0xff, 0x00, 0x13]);
        assert_eq!(decode(&bad).unwrap_err().reason(), "malformed");
        let big = vec![0u8; MAX_FRAME + 1];
        assert_eq!(decode(&big), Err(DecodeError::Oversized(MAX_FRAME + 1)));
    }

    proptest! {
        /// Random bytes, with or without a valid header, never panic.
        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512), header in any::<bool>()) {
            let mut f = Vec::new();
            if header { f.extend_from_slice(&MAGIC); f.push(VERSION); }
            f.extend_from_slice(&body);
            let _ = decode(&f);
        }

        /// Every prefix of a valid frame decodes to an error or the message, never a panic.
        #[test]
        fn truncation_never_panics(cut in 0usize..200) {
            let f = encode(&sample());
            let cut = cut.min(f.len());
            let _ = decode(&f[..cut]);
        }
    }
}
