//! Messages of the blob transfer protocol, as CBOR.
//!
//! These bytes are meant to be carried as an opaque payload inside the core's
//! versioned frame, one request/response pair per QUIC stream. Decoding never
//! panics and never allocates more than the input's size on garbage.

use serde::{Deserialize, Serialize};

use crate::id::BlobId;
use crate::manifest::Manifest;

/// Largest message accepted, in bytes (a maximal chunk or manifest fits).
pub const MAX_MSG: usize = 16 << 20;

/// One message between a fetching agent and a serving agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobMsg {
    /// Asks for a blob's manifest.
    GetManifest {
        /// The blob.
        id: BlobId,
    },
    /// A manifest (the receiver checks that it hashes to `id`).
    Manifest {
        /// The blob.
        id: BlobId,
        /// Its manifest.
        manifest: Manifest,
    },
    /// Asks for one chunk.
    GetChunk {
        /// The blob.
        id: BlobId,
        /// The chunk index.
        idx: u32,
    },
    /// One chunk's bytes (the receiver checks them against the manifest).
    Chunk {
        /// The blob.
        id: BlobId,
        /// The chunk index.
        idx: u32,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The sender does not have (a usable copy of) the blob.
    NotFound {
        /// The blob.
        id: BlobId,
    },
    /// The sender is over its upload rate; ask again later or elsewhere.
    Busy {
        /// The blob.
        id: BlobId,
        /// The chunk that was refused.
        idx: u32,
        /// When the sender expects to have capacity again, in milliseconds.
        retry_after_ms: u64,
    },
}

/// Why bytes could not be turned into (or made from) a [`BlobMsg`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_MSG`].
    #[error("blob message of {0} bytes exceeds the {MAX_MSG}-byte limit")]
    Oversized(usize),
    /// The CBOR ended early.
    #[error("truncated blob message")]
    Truncated,
    /// Not a valid message.
    #[error("malformed blob message: {0}")]
    Malformed(String),
    /// Could not be encoded (only possible for oversized messages).
    #[error("cannot encode blob message: {0}")]
    Encode(String),
}

impl WireError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Oversized(_) => "oversized",
            WireError::Truncated => "truncated",
            WireError::Malformed(_) => "malformed",
            WireError::Encode(_) => "encode",
        }
    }
}

impl BlobMsg {
    /// The blob the message is about.
    pub fn id(&self) -> BlobId {
        match self {
            BlobMsg::GetManifest { id }
            | BlobMsg::Manifest { id, .. }
            | BlobMsg::GetChunk { id, .. }
            | BlobMsg::Chunk { id, .. }
            | BlobMsg::NotFound { id }
            | BlobMsg::Busy { id, .. } => *id,
        }
    }

    /// Whether this is a request (to be answered by the serving side).
    pub fn is_request(&self) -> bool {
        matches!(self, BlobMsg::GetManifest { .. } | BlobMsg::GetChunk { .. })
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BlobMsg::GetManifest { .. } => "get_manifest",
            BlobMsg::Manifest { .. } => "manifest",
            BlobMsg::GetChunk { .. } => "get_chunk",
            BlobMsg::Chunk { .. } => "chunk",
            BlobMsg::NotFound { .. } => "not_found",
            BlobMsg::Busy { .. } => "busy",
        }
    }

    /// CBOR encoding.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let out = serde_cbor::to_vec(self).map_err(|e| WireError::Encode(e.to_string()))?;
        if out.len() > MAX_MSG {
            return Err(WireError::Oversized(out.len()));
        }
        Ok(out)
    }

    /// Decodes one message; any garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_MSG {
            return Err(WireError::Oversized(bytes.len()));
        }
        serde_cbor::from_slice(bytes).map_err(|e| {
            if e.is_eof() {
                WireError::Truncated
            } else {
                WireError::Malformed(e.to_string())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<BlobMsg> {
        let m = Manifest::for_bytes(b"some plugin bytes", 4).unwrap();
        let id = m.id();
        vec![
            BlobMsg::GetManifest { id },
            BlobMsg::Manifest { id, manifest: m },
            BlobMsg::GetChunk { id, idx: 3 },
            BlobMsg::Chunk {
                id,
                idx: 3,
                bytes: b"in b".to_vec(),
            },
            BlobMsg::NotFound { id },
            BlobMsg::Busy {
                id,
                idx: 1,
                retry_after_ms: 250,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode().unwrap();
            assert_eq!(BlobMsg::decode(&bytes).unwrap(), m, "{}", m.kind());
        }
    }

    #[test]
    fn chunk_bytes_are_a_byte_string_not_an_int_array() {
        let id = BlobId::from_bytes([1; 32]);
        let bytes = vec![0xAB; 4096];
        let enc = BlobMsg::Chunk { id, idx: 0, bytes }.encode().unwrap();
        assert!(enc.len() < 4096 + 80, "{} bytes", enc.len());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert_eq!(BlobMsg::decode(b""), Err(WireError::Truncated));
        assert!(matches!(
            BlobMsg::decode(b"\xff\xff"),
            Err(WireError::Malformed(_))
        ));
        let full = samples()[1].encode().unwrap();
        assert_eq!(
            BlobMsg::decode(&full[..full.len() - 3]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            BlobMsg::decode(&vec![0; MAX_MSG + 1]),
            Err(WireError::Oversized(MAX_MSG + 1))
        );
        // A manifest message whose manifest is internally inconsistent is refused.
        let bad = b"\xa1hManifest\xa2bidX\x20AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAhmanifest\xa0";
        assert!(matches!(BlobMsg::decode(bad), Err(WireError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn decode_of_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = BlobMsg::decode(&bytes);
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decode_of_mutated_messages_never_panics(
            which in 0usize..6,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = samples()[which].encode().unwrap();
            for (pos, x) in flips {
                let n = bytes.len();
                bytes[pos % n] ^= x;
            }
            let _ = BlobMsg::decode(&bytes);
        }
    }
}
