//! Content addressing: how a blob is cut into chunks and named.
//!
//! A blob is cut into fixed-size chunks (the last one may be short). Its
//! [`Manifest`] lists the size, the chunk size, blake3 of every chunk and blake3
//! of the whole content; the blob's [`BlobId`] is blake3 of the manifest's
//! canonical CBOR encoding. Knowing the id is therefore enough to check a
//! manifest received from anyone, and the manifest is enough to check every
//! chunk on its own, before the whole blob is there.

use serde::{Deserialize, Serialize, Serializer};

use crate::id::{BlobId, ContentHash};

/// Chunk size used unless configured otherwise: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk size: 8 MiB, so one chunk message fits in a 16 MiB frame.
pub const MAX_CHUNK_SIZE: u32 = 8 << 20;
/// Most chunks a manifest may list (256 GiB at the default chunk size); keeps
/// an encoded manifest under 8 MiB.
pub const MAX_CHUNKS: u32 = 1 << 18;
/// Manifest format version this build writes and reads.
const MANIFEST_VERSION: u8 = 1;

/// Why a manifest is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The chunk size is 0 or above [`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} is outside 1..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    /// The blob would need more than [`MAX_CHUNKS`] chunks.
    #[error("a {size}-byte blob in {chunk_size}-byte chunks needs more than {MAX_CHUNKS} chunks")]
    TooManyChunks {
        /// Blob size in bytes.
        size: u64,
        /// Chunk size in bytes.
        chunk_size: u32,
    },
    /// The chunk list does not match size / chunk size.
    #[error("a {size}-byte blob in {chunk_size}-byte chunks has {expected} chunks, manifest lists {got}")]
    ChunkCount {
        /// Blob size in bytes.
        size: u64,
        /// Chunk size in bytes.
        chunk_size: u32,
        /// Chunks the size implies.
        expected: u64,
        /// Chunks listed.
        got: u64,
    },
    /// A manifest written by an unknown format version.
    #[error("manifest format version {0} is not supported (this build reads {MANIFEST_VERSION})")]
    Version(u8),
    /// A hash field has the wrong length.
    #[error("manifest field `{field}` is {len} bytes, expected {expected}")]
    FieldLength {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Length required.
        expected: usize,
    },
    /// The bytes are not a CBOR manifest.
    #[error("malformed manifest: {0}")]
    Malformed(String),
}

/// Why one chunk does not match its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkMismatch {
    /// The index is past the last chunk.
    #[error("index out of range (blob has {chunks} chunks)")]
    OutOfRange {
        /// Number of chunks in the blob.
        chunks: u32,
    },
    /// Wrong length.
    #[error("length is {got} bytes, manifest says {expected}")]
    Length {
        /// Length the manifest implies.
        expected: u32,
        /// Length received.
        got: usize,
    },
    /// Wrong hash.
    #[error("blake3 is {got}, manifest says {expected}")]
    Hash {
        /// Hash in the manifest (hex).
        expected: String,
        /// Hash of the bytes (hex).
        got: String,
    },
}

/// Describes a blob: its size, chunking, chunk hashes and content hash.
///
/// Construct with [`Manifest::new`] (validated) or [`Manifest::for_bytes`];
/// a manifest always knows its own [`BlobId`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Repr")]
pub struct Manifest {
    size: u64,
    chunk_size: u32,
    content_hash: ContentHash,
    chunks: Vec<[u8; 32]>,
    // Derived from the fields above at construction, so it can never disagree.
    id: BlobId,
}

/// Number of chunks a blob of `size` bytes has at `chunk_size` (0 for empty).
fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

impl Manifest {
    /// A validated manifest from its parts.
    pub fn new(
        size: u64,
        chunk_size: u32,
        content_hash: ContentHash,
        chunks: Vec<[u8; 32]>,
    ) -> Result<Self, ManifestError> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(ManifestError::ChunkSize(chunk_size));
        }
        let expected = chunk_count(size, chunk_size);
        if expected > u64::from(MAX_CHUNKS) {
            return Err(ManifestError::TooManyChunks { size, chunk_size });
        }
        if expected != chunks.len() as u64 {
            return Err(ManifestError::ChunkCount {
                size,
                chunk_size,
                expected,
                got: chunks.len() as u64,
            });
        }
        let mut m = Manifest {
            size,
            chunk_size,
            content_hash,
            chunks,
            id: BlobId::from_bytes([0; 32]),
        };
        m.id = BlobId::from_bytes(*blake3::hash(&m.encode()).as_bytes());
        Ok(m)
    }

    /// The manifest of in-memory data cut into `chunk_size` chunks.
    pub fn for_bytes(data: &[u8], chunk_size: u32) -> Result<Self, ManifestError> {
        let mut b = Builder::new(chunk_size)?;
        for chunk in data.chunks(chunk_size as usize) {
            b.push(chunk);
        }
        b.finish()
    }

    /// The blob's id: blake3 of [`encode`](Self::encode).
    pub fn id(&self) -> BlobId {
        self.id
    }

    /// Blob size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes (every chunk but the last has exactly this length).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// blake3 of the whole content (what `b3sum` prints).
    pub fn content_hash(&self) -> ContentHash {
        self.content_hash
    }

    /// blake3 of each chunk, in order.
    pub fn chunks(&self) -> &[[u8; 32]] {
        &self.chunks
    }

    /// Number of chunks (0 for an empty blob).
    pub fn num_chunks(&self) -> u32 {
        // Bounded by MAX_CHUNKS at construction.
        self.chunks.len() as u32
    }

    /// Byte offset of chunk `idx` in the blob.
    pub fn chunk_offset(&self, idx: u32) -> u64 {
        u64::from(idx) * u64::from(self.chunk_size)
    }

    /// Length of chunk `idx`, or `None` past the end.
    pub fn chunk_len(&self, idx: u32) -> Option<u32> {
        if idx >= self.num_chunks() {
            return None;
        }
        let rest = self.size - self.chunk_offset(idx);
        Some(rest.min(u64::from(self.chunk_size)) as u32)
    }

    /// Checks `bytes` against the manifest's entry for chunk `idx`.
    pub fn verify_chunk(&self, idx: u32, bytes: &[u8]) -> Result<(), ChunkMismatch> {
        let expected_len = self.chunk_len(idx).ok_or(ChunkMismatch::OutOfRange {
            chunks: self.num_chunks(),
        })?;
        if bytes.len() != expected_len as usize {
            return Err(ChunkMismatch::Length {
                expected: expected_len,
                got: bytes.len(),
            });
        }
        let got = blake3::hash(bytes);
        let expected = &self.chunks[idx as usize];
        // blake3::Hash compares in constant time; not needed here, but free.
        if got != blake3::Hash::from_bytes(*expected) {
            return Err(ChunkMismatch::Hash {
                expected: blake3::Hash::from_bytes(*expected).to_hex().to_string(),
                got: got.to_hex().to_string(),
            });
        }
        Ok(())
    }

    /// Canonical CBOR encoding (the bytes the [`BlobId`] hashes).
    pub fn encode(&self) -> Vec<u8> {
        // Writing plain data into a Vec cannot fail.
        serde_cbor::to_vec(self).expect("CBOR encoding into a Vec is infallible")
    }

    /// Decodes and validates a manifest. Never panics on bad input.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        serde_cbor::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))
    }
}

/// Wire shape of a manifest. Field order is part of the blob id: never reorder.
/// Hashes travel as byte strings (chunk hashes concatenated), which keeps a
/// manifest at ~32 bytes per chunk instead of ~50 for arrays of integers.
#[derive(Serialize)]
struct ReprRef<'a> {
    v: u8,
    size: u64,
    chunk_size: u32,
    content: &'a serde_bytes::Bytes,
    chunks: &'a serde_bytes::Bytes,
}

#[derive(Deserialize)]
struct Repr {
    v: u8,
    size: u64,
    chunk_size: u32,
    content: serde_bytes::ByteBuf,
    chunks: serde_bytes::ByteBuf,
}

impl Serialize for Manifest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ReprRef {
            v: MANIFEST_VERSION,
            size: self.size,
            chunk_size: self.chunk_size,
            content: serde_bytes::Bytes::new(self.content_hash.as_bytes()),
            chunks: serde_bytes::Bytes::new(self.chunks.as_flattened()),
        }
        .serialize(s)
    }
}

impl TryFrom<Repr> for Manifest {
    type Error = ManifestError;

    fn try_from(r: Repr) -> Result<Self, Self::Error> {
        if r.v != MANIFEST_VERSION {
            return Err(ManifestError::Version(r.v));
        }
        let content: [u8; 32] =
            r.content
                .as_slice()
                .try_into()
                .map_err(|_| ManifestError::FieldLength {
                    field: "content",
                    len: r.content.len(),
                    expected: 32,
                })?;
        let (hashes, rest) = r.chunks.as_chunks::<32>();
        if !rest.is_empty() {
            return Err(ManifestError::FieldLength {
                field: "chunks",
                len: r.chunks.len(),
                expected: hashes.len() * 32,
            });
        }
        Manifest::new(
            r.size,
            r.chunk_size,
            ContentHash::from_bytes(content),
            hashes.to_vec(),
        )
    }
}

/// Builds a manifest chunk by chunk, so a blob of any size can be hashed
/// while it streams to disk.
pub(crate) struct Builder {
    chunk_size: u32,
    size: u64,
    chunks: Vec<[u8; 32]>,
    whole: blake3::Hasher,
}

impl Builder {
    pub(crate) fn new(chunk_size: u32) -> Result<Self, ManifestError> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(ManifestError::ChunkSize(chunk_size));
        }
        Ok(Builder {
            chunk_size,
            size: 0,
            chunks: Vec::new(),
            whole: blake3::Hasher::new(),
        })
    }

    /// Adds the next chunk. Every chunk but the last must be exactly
    /// `chunk_size` long; the caller guarantees it.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        debug_assert!(chunk.len() <= self.chunk_size as usize);
        self.size += chunk.len() as u64;
        self.chunks.push(*blake3::hash(chunk).as_bytes());
        self.whole.update(chunk);
    }

    pub(crate) fn finish(self) -> Result<Manifest, ManifestError> {
        Manifest::new(
            self.size,
            self.chunk_size,
            ContentHash::from_bytes(*self.whole.finalize().as_bytes()),
            self.chunks,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_stable_and_content_addressed() {
        let a = Manifest::for_bytes(b"hello world", 4).unwrap();
        let b = Manifest::for_bytes(b"hello world", 4).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.num_chunks(), 3);
        assert_eq!(a.chunk_len(2), Some(3));
        assert_eq!(a.chunk_len(3), None);
        assert_eq!(
            a.content_hash().to_hex(),
            blake3::hash(b"hello world").to_hex().as_str()
        );
        // Different content, or the same content chunked differently, is a different blob.
        assert_ne!(Manifest::for_bytes(b"hello worle", 4).unwrap().id(), a.id());
        assert_ne!(Manifest::for_bytes(b"hello world", 5).unwrap().id(), a.id());
        // The id is exactly blake3 of the encoding, which round-trips.
        assert_eq!(a.id().as_bytes(), blake3::hash(&a.encode()).as_bytes());
        assert_eq!(Manifest::decode(&a.encode()).unwrap(), a);
        // Pinned: changing the encoding changes every blob id in every cluster.
        let empty = Manifest::for_bytes(b"", DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(empty.id().to_hex(), PINNED_EMPTY_ID);
        // A CBOR map of 5 whose first entry is "v": 1.
        assert_eq!(&empty.encode()[..4], b"\xa5\x61v\x01");
    }

    const PINNED_EMPTY_ID: &str =
        "d9fd2a7f006af82c5a069fdf913417a11d7c98c5fc20981c49f3ee209aafd275";

    #[test]
    fn invalid_manifests_are_refused() {
        let h = ContentHash::from_bytes([0; 32]);
        assert_eq!(
            Manifest::new(0, 0, h, vec![]),
            Err(ManifestError::ChunkSize(0))
        );
        assert!(matches!(
            Manifest::new(10, 4, h, vec![[0; 32]; 2]),
            Err(ManifestError::ChunkCount {
                expected: 3,
                got: 2,
                ..
            })
        ));
        assert!(matches!(
            Manifest::new(u64::MAX, 1, h, vec![]),
            Err(ManifestError::TooManyChunks { .. })
        ));
        assert!(matches!(
            Manifest::decode(b"\xff\x00"),
            Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn verify_chunk_names_what_is_wrong() {
        let m = Manifest::for_bytes(b"abcdefghij", 4).unwrap();
        assert_eq!(m.verify_chunk(0, b"abcd"), Ok(()));
        assert_eq!(m.verify_chunk(2, b"ij"), Ok(()));
        assert_eq!(
            m.verify_chunk(2, b"ijk"),
            Err(ChunkMismatch::Length {
                expected: 2,
                got: 3
            })
        );
        assert!(matches!(
            m.verify_chunk(1, b"efgX"),
            Err(ChunkMismatch::Hash { .. })
        ));
        assert_eq!(
            m.verify_chunk(3, b""),
            Err(ChunkMismatch::OutOfRange { chunks: 3 })
        );
    }
}
