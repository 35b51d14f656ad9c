//! The on-disk blob store and partial downloads.
//!
//! Layout under the store's directory:
//!
//! ```text
//! blobs/<id>/data       complete content            } a blob is complete iff
//! blobs/<id>/manifest   CBOR manifest               } its directory is in blobs/
//! partial/<id>/data     content being assembled (sparse, preallocated)
//! partial/<id>/manifest the manifest being fetched
//! partial/<id>/have     bitmap: bit i set = chunk i written and verified
//! tmp/                  staging for puts and removals; emptied on open
//! ```
//!
//! Invariant: a directory only ever appears in `blobs/` through one
//! `rename`, after its `data` and `manifest` have been fsynced and verified
//! against the manifest, so no crash can leave a complete-looking blob that is
//! corrupt. Removal renames out of `blobs/` first for the same reason.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::id::{BlobId, ContentHash};
use crate::manifest::{
    Builder, ChunkMismatch, Manifest, ManifestError, DEFAULT_CHUNK_SIZE, MAX_CHUNKS,
};

const BLOBS: &str = "blobs";
const PARTIAL: &str = "partial";
const TMP: &str = "tmp";
const DATA: &str = "data";
const MANIFEST: &str = "manifest";
const HAVE: &str = "have";

/// What went wrong in the store. Every variant names the blob, chunk or path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The blob is not complete in this store.
    #[error("blob {0} is not in the store")]
    NotFound(BlobId),
    /// A chunk index past the end of the blob.
    #[error("blob {id} has {chunks} chunks, no chunk {idx}")]
    NoSuchChunk {
        /// The blob.
        id: BlobId,
        /// The index asked for.
        idx: u32,
        /// How many chunks it has.
        chunks: u32,
    },
    /// A chunk offered for writing does not match the manifest; nothing was written.
    #[error("chunk {idx} of blob {id} rejected: {reason}")]
    BadChunk {
        /// The blob.
        id: BlobId,
        /// The chunk.
        idx: u32,
        /// How it differs.
        reason: ChunkMismatch,
    },
    /// `finish` was called before every chunk was written.
    #[error("blob {id} is incomplete: {missing} of {total} chunks missing")]
    Incomplete {
        /// The blob.
        id: BlobId,
        /// Chunks still missing.
        missing: u32,
        /// Chunks in the blob.
        total: u32,
    },
    /// Bytes on disk no longer match their chunk hashes (torn write, bit rot,
    /// tampering). For a partial download those chunks are marked missing again.
    #[error("blob {id}: {} on disk do not match the manifest", list_chunks(chunks))]
    Corrupt {
        /// The blob.
        id: BlobId,
        /// The bad chunks.
        chunks: Vec<u32>,
    },
    /// Every chunk matches but the whole content does not: the manifest itself
    /// is inconsistent, so this blob can never be assembled.
    #[error("blob {id}: content blake3 is {got}, manifest says {expected}")]
    ContentMismatch {
        /// The blob.
        id: BlobId,
        /// Content hash in the manifest.
        expected: ContentHash,
        /// Content hash of the assembled bytes.
        got: ContentHash,
    },
    /// A data file whose length disagrees with its manifest.
    #[error("blob {id}: {} is {got} bytes, manifest says {expected}", path.display())]
    SizeMismatch {
        /// The blob.
        id: BlobId,
        /// The data file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        got: u64,
    },
    /// A manifest file that cannot be used.
    #[error("manifest {}: {reason}", path.display())]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Content that cannot be stored as a blob (too many chunks, ...).
    #[error("cannot store {}: {reason}", source_path.display())]
    Unstorable {
        /// Where the content came from.
        source_path: PathBuf,
        /// Why.
        reason: ManifestError,
    },
    /// The configured chunk size is invalid.
    #[error("invalid chunk size: {0}")]
    ChunkSize(ManifestError),
    /// Another [`Partial`] for this blob is open in this process.
    #[error("blob {0} is already being downloaded")]
    Busy(BlobId),
}

fn list_chunks(chunks: &[u32]) -> String {
    const SHOWN: usize = 8;
    let head: Vec<String> = chunks.iter().take(SHOWN).map(u32::to_string).collect();
    let more = chunks.len().saturating_sub(SHOWN);
    let noun = if chunks.len() == 1 { "chunk" } else { "chunks" };
    if more > 0 {
        format!("{noun} {} and {more} more", head.join(", "))
    } else {
        format!("{noun} {}", head.join(", "))
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a directory's entries (creations, renames) durable.
fn fsync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", path))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_manifest_file(path: &Path, expect: Option<BlobId>) -> Result<Manifest> {
    let bytes = fs::read(path).map_err(io_err("read", path))?;
    let m = Manifest::decode(&bytes).map_err(|e| StoreError::BadManifest {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(id) = expect {
        if m.id() != id {
            return Err(StoreError::BadManifest {
                path: path.to_path_buf(),
                reason: format!("describes blob {}, expected {id}", m.id()),
            });
        }
    }
    Ok(m)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Result of re-reading a data file against its manifest.
struct Scan {
    bad: Vec<u32>,
    content: ContentHash,
}

/// Re-reads `path` chunk by chunk, hashing each chunk and the whole content.
/// Holds one chunk in memory at a time.
fn scan(path: &Path, m: &Manifest) -> Result<Scan> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut buf = vec![0u8; m.chunk_size() as usize];
    let mut whole = blake3::Hasher::new();
    let mut bad = Vec::new();
    for idx in 0..m.num_chunks() {
        let len = m.chunk_len(idx).unwrap_or(0) as usize;
        f.read_exact(&mut buf[..len])
            .map_err(io_err("read", path))?;
        if m.verify_chunk(idx, &buf[..len]).is_err() {
            bad.push(idx);
        }
        whole.update(&buf[..len]);
    }
    Ok(Scan {
        bad,
        content: ContentHash::from_bytes(*whole.finalize().as_bytes()),
    })
}

struct Inner {
    root: PathBuf,
    chunk_size: u32,
    /// Manifests of complete blobs, so serving a chunk does not re-read one.
    manifests: Mutex<HashMap<BlobId, Arc<Manifest>>>,
    /// Blobs with an open [`Partial`]: two writers on one bitmap would lose bits.
    open_partials: Mutex<HashSet<BlobId>>,
    seq: AtomicU64,
}

/// A blake3-addressed blob store in a directory. Cheap to clone (shared).
///
/// One process should own a directory at a time (the agent owns its data dir).
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("root", &self.inner.root)
            .field("chunk_size", &self.inner.chunk_size)
            .finish()
    }
}

/// A staging directory under tmp/, removed on drop unless published.
struct Stage {
    dir: Option<PathBuf>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            // Best effort: tmp/ is emptied on the next open anyway.
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl BlobStore {
    /// Opens (creating if needed) a store with the default 1 MiB chunk size.
    ///
    /// Open a directory once per process and clone the handle: opening
    /// clears `tmp/`, and the guard against two downloads of one blob lives
    /// in the handle.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_chunk_size(dir, DEFAULT_CHUNK_SIZE)
    }

    /// Opens a store that cuts new blobs into `chunk_size`-byte chunks.
    ///
    /// Blobs fetched from peers keep the chunking of their manifest.
    pub fn open_with_chunk_size(dir: impl AsRef<Path>, chunk_size: u32) -> Result<Self> {
        Builder::new(chunk_size).map_err(StoreError::ChunkSize)?;
        let root = dir.as_ref().to_path_buf();
        for sub in [BLOBS, PARTIAL, TMP] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        // Leftovers of puts or removals interrupted by a crash.
        let tmp = root.join(TMP);
        for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let path = entry.map_err(io_err("list", &tmp))?.path();
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.map_err(io_err("remove", &path))?;
        }
        Ok(BlobStore {
            inner: Arc::new(Inner {
                root,
                chunk_size,
                manifests: Mutex::new(HashMap::new()),
                open_partials: Mutex::new(HashSet::new()),
                seq: AtomicU64::new(0),
            }),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Chunk size used for new blobs.
    pub fn chunk_size(&self) -> u32 {
        self.inner.chunk_size
    }

    fn blob_dir(&self, id: &BlobId) -> PathBuf {
        self.inner.root.join(BLOBS).join(id.to_hex())
    }

    fn partial_dir(&self, id: &BlobId) -> PathBuf {
        self.inner.root.join(PARTIAL).join(id.to_hex())
    }

    fn tmp_path(&self, kind: &str) -> PathBuf {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .root
            .join(TMP)
            .join(format!("{kind}-{}-{n}", std::process::id()))
    }

    /// Stores in-memory bytes; returns their id. Storing the same bytes twice is a no-op.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<BlobId> {
        let mut r = bytes;
        self.put_reader(&mut r)
    }

    /// Stores a file, streaming it (one chunk in memory at a time).
    pub fn put_file(&self, path: impl AsRef<Path>) -> Result<BlobId> {
        let path = path.as_ref();
        let mut f = File::open(path).map_err(io_err("open", path))?;
        let (stage, m) = self.stage(&mut f, path)?;
        self.publish(stage, &m)
    }

    /// Stores everything a reader yields (e.g. the output of `docker save`), streaming.
    pub fn put_reader(&self, r: &mut impl Read) -> Result<BlobId> {
        let (stage, m) = self.stage(r, Path::new("<stream>"))?;
        self.publish(stage, &m)
    }

    /// Copies `r` into a fresh staging directory with its manifest, both fsynced.
    fn stage(&self, r: &mut impl Read, source: &Path) -> Result<(Stage, Manifest)> {
        let dir = self.tmp_path("put");
        fs::create_dir(&dir).map_err(io_err("create directory", &dir))?;
        let stage = Stage {
            dir: Some(dir.clone()),
        };
        let data_path = dir.join(DATA);
        let mut out = File::create_new(&data_path).map_err(io_err("create", &data_path))?;
        let cs = self.inner.chunk_size;
        let mut builder = Builder::new(cs).map_err(StoreError::ChunkSize)?;
        let mut buf = vec![0u8; cs as usize];
        let mut n_chunks = 0u64;
        loop {
            let n = read_full(r, &mut buf).map_err(io_err("read", source))?;
            if n == 0 {
                break;
            }
            n_chunks += 1;
            if n_chunks > u64::from(MAX_CHUNKS) {
                // Stop early rather than copy hundreds of GiB we will refuse.
                return Err(StoreError::Unstorable {
                    source_path: source.to_path_buf(),
                    reason: ManifestError::TooManyChunks {
                        size: n_chunks * u64::from(cs),
                        chunk_size: cs,
                    },
                });
            }
            builder.push(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io_err("write", &data_path))?;
            if n < buf.len() {
                break;
            }
        }
        out.sync_all().map_err(io_err("fsync", &data_path))?;
        let m = builder.finish().map_err(|reason| StoreError::Unstorable {
            source_path: source.to_path_buf(),
            reason,
        })?;
        write_synced(&dir.join(MANIFEST), &m.encode())?;
        fsync_dir(&dir)?;
        Ok((stage, m))
    }

    /// Moves a fully written, fsynced directory into `blobs/` with one rename.
    fn publish(&self, mut stage: Stage, m: &Manifest) -> Result<BlobId> {
        let id = m.id();
        let Some(dir) = stage.dir.clone() else {
            return Ok(id);
        };
        self.publish_dir(&dir, m)?;
        stage.dir = None;
        Ok(id)
    }

    fn publish_dir(&self, dir: &Path, m: &Manifest) -> Result<()> {
        let id = m.id();
        let target = self.blob_dir(&id);
        if !self.has(&id) {
            if let Err(e) = fs::rename(dir, &target) {
                // Lost a race with another put of the same content: fine.
                if !self.has(&id) {
                    return Err(io_err("rename into place", &target)(e));
                }
            }
            let blobs = self.inner.root.join(BLOBS);
            fsync_dir(&blobs)?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        if dir.exists() {
            // Already had it: drop the duplicate copy.
            fs::remove_dir_all(dir).map_err(io_err("remove", dir))?;
        }
        lock(&self.inner.manifests).insert(id, Arc::new(m.clone()));
        Ok(())
    }

    /// Whether the blob is complete in this store.
    pub fn has(&self, id: &BlobId) -> bool {
        let dir = self.blob_dir(id);
        dir.join(DATA).is_file() && dir.join(MANIFEST).is_file()
    }

    /// The manifest of a complete blob, shared from the cache (no copy).
    pub(crate) fn manifest_arc(&self, id: &BlobId) -> Result<Arc<Manifest>> {
        if let Some(m) = lock(&self.inner.manifests).get(id) {
            return Ok(m.clone());
        }
        if !self.has(id) {
            return Err(StoreError::NotFound(*id));
        }
        let dir = self.blob_dir(id);
        let m = read_manifest_file(&dir.join(MANIFEST), Some(*id))?;
        let data = dir.join(DATA);
        let len = fs::metadata(&data).map_err(io_err("stat", &data))?.len();
        if len != m.size() {
            return Err(StoreError::SizeMismatch {
                id: *id,
                path: data,
                expected: m.size(),
                got: len,
            });
        }
        let m = Arc::new(m);
        lock(&self.inner.manifests).insert(*id, m.clone());
        Ok(m)
    }

    /// The manifest of a complete blob.
    pub fn manifest(&self, id: &BlobId) -> Result<Manifest> {
        self.manifest_arc(id).map(|m| (*m).clone())
    }

    /// One chunk of a complete blob, checked against its hash before it is returned.
    pub fn read_chunk(&self, id: &BlobId, idx: u32) -> Result<Vec<u8>> {
        let m = self.manifest_arc(id)?;
        let len = m.chunk_len(idx).ok_or(StoreError::NoSuchChunk {
            id: *id,
            idx,
            chunks: m.num_chunks(),
        })?;
        let path = self.blob_dir(id).join(DATA);
        let mut f = File::open(&path).map_err(io_err("open", &path))?;
        f.seek(SeekFrom::Start(m.chunk_offset(idx)))
            .map_err(io_err("seek", &path))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(io_err("read", &path))?;
        // Never hand out bytes that rotted on disk; the peer would blame us anyway.
        if m.verify_chunk(idx, &buf).is_err() {
            return Err(StoreError::Corrupt {
                id: *id,
                chunks: vec![idx],
            });
        }
        Ok(buf)
    }

    /// The whole content of a complete blob, checked against its content hash.
    /// Loads it all in memory: meant for small blobs (plugins), not images.
    pub fn read_all(&self, id: &BlobId) -> Result<Vec<u8>> {
        let m = self.manifest_arc(id)?;
        let path = self.blob_dir(id).join(DATA);
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let got = ContentHash::from_bytes(*blake3::hash(&bytes).as_bytes());
        if got != m.content_hash() {
            return Err(StoreError::ContentMismatch {
                id: *id,
                expected: m.content_hash(),
                got,
            });
        }
        Ok(bytes)
    }

    /// Re-reads a complete blob and checks every chunk and the content hash.
    pub fn verify(&self, id: &BlobId) -> Result<()> {
        let m = self.manifest_arc(id)?;
        let s = scan(&self.blob_dir(id).join(DATA), &m)?;
        if !s.bad.is_empty() {
            return Err(StoreError::Corrupt {
                id: *id,
                chunks: s.bad,
            });
        }
        if s.content != m.content_hash() {
            return Err(StoreError::ContentMismatch {
                id: *id,
                expected: m.content_hash(),
                got: s.content,
            });
        }
        Ok(())
    }

    /// Path of a complete blob's content, for streaming it elsewhere (e.g. `docker load`).
    /// The file must not be modified.
    pub fn path_of(&self, id: &BlobId) -> Option<PathBuf> {
        self.has(id).then(|| self.blob_dir(id).join(DATA))
    }

    fn ids_in(&self, sub: &str) -> Result<Vec<BlobId>> {
        let dir = self.inner.root.join(sub);
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            // Anything not named like a blob id is not ours: skip it.
            if let Some(id) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Complete blobs, sorted by id.
    pub fn list(&self) -> Result<Vec<BlobId>> {
        Ok(self
            .ids_in(BLOBS)?
            .into_iter()
            .filter(|id| self.has(id))
            .collect())
    }

    /// Blobs with a partial download on disk (to resume after a restart), sorted.
    pub fn partials(&self) -> Result<Vec<BlobId>> {
        Ok(self
            .ids_in(PARTIAL)?
            .into_iter()
            .filter(|id| self.partial_dir(id).join(MANIFEST).is_file())
            .collect())
    }

    /// Removes a blob, complete and partial. Returns whether anything was there.
    pub fn remove(&self, id: &BlobId) -> Result<bool> {
        if lock(&self.inner.open_partials).contains(id) {
            return Err(StoreError::Busy(*id));
        }
        lock(&self.inner.manifests).remove(id);
        let mut found = false;
        for (dir, parent) in [(self.blob_dir(id), BLOBS), (self.partial_dir(id), PARTIAL)] {
            if !dir.exists() {
                continue;
            }
            found = true;
            // Out of blobs/ in one rename first: a crash mid-delete must not
            // leave a half-deleted blob that still looks complete.
            let trash = self.tmp_path("rm");
            fs::rename(&dir, &trash).map_err(io_err("rename", &dir))?;
            fsync_dir(&self.inner.root.join(parent))?;
            fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
        }
        Ok(found)
    }

    /// Starts (or resumes) downloading the blob `manifest` describes.
    ///
    /// A partial download already on disk for the same blob is picked up, with
    /// the chunks it recorded as written. Fails with [`StoreError::Busy`] if
    /// another `Partial` for this blob is open.
    pub fn begin(&self, manifest: &Manifest) -> Result<Partial> {
        let id = manifest.id();
        if !lock(&self.inner.open_partials).insert(id) {
            return Err(StoreError::Busy(id));
        }
        // From here on the guard's Drop releases the open mark on every error path.
        let guard = OpenMark {
            store: self.clone(),
            id,
        };
        let dir = self.partial_dir(&id);
        let mpath = dir.join(MANIFEST);
        let resumable = dir.join(DATA).is_file()
            && mpath.is_file()
            && read_manifest_file(&mpath, Some(id)).is_ok();
        if !resumable {
            self.create_partial(&dir, manifest)?;
        }
        let data_path = dir.join(DATA);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_err("open", &data_path))?;
        let len = data.metadata().map_err(io_err("stat", &data_path))?.len();
        if len != manifest.size() {
            data.set_len(manifest.size())
                .map_err(io_err("resize", &data_path))?;
        }
        let have_path = dir.join(HAVE);
        let bitmap_len = (manifest.num_chunks() as usize).div_ceil(8);
        let mut have = fs::read(&have_path).unwrap_or_default();
        if have.len() != bitmap_len {
            // Unknown state: forget it. Chunks are refetched, never trusted.
            have = vec![0; bitmap_len];
        }
        let mut have_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&have_path)
            .map_err(io_err("open", &have_path))?;
        have_file
            .set_len(bitmap_len as u64)
            .map_err(io_err("resize", &have_path))?;
        have_file
            .seek(SeekFrom::Start(0))
            .and_then(|_| have_file.write_all(&have))
            .map_err(io_err("write", &have_path))?;
        let mut p = Partial {
            guard,
            manifest: Arc::new(manifest.clone()),
            dir,
            data,
            have_file,
            have,
            missing: 0,
            done: false,
        };
        // Bits past the last chunk are never set, but a foreign file might have them.
        p.missing = (0..p.manifest.num_chunks())
            .filter(|&i| !p.has_chunk(i))
            .count() as u32;
        Ok(p)
    }

    fn create_partial(&self, dir: &Path, m: &Manifest) -> Result<()> {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(io_err("remove", dir))?;
        }
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        // The manifest is fsynced now because `finish` renames this directory
        // into blobs/ and relies on it being durable.
        write_synced(&dir.join(MANIFEST), &m.encode())?;
        let data_path = dir.join(DATA);
        let data = File::create(&data_path).map_err(io_err("create", &data_path))?;
        data.set_len(m.size())
            .map_err(io_err("resize", &data_path))?;
        fsync_dir(dir)?;
        fsync_dir(&self.inner.root.join(PARTIAL))
    }

    /// Reopens the partial download of `id` left on disk, if there is a usable one.
    pub fn resume(&self, id: &BlobId) -> Result<Option<Partial>> {
        let mpath = self.partial_dir(id).join(MANIFEST);
        if !mpath.is_file() {
            return Ok(None);
        }
        match read_manifest_file(&mpath, Some(*id)) {
            Ok(m) => self.begin(&m).map(Some),
            // A torn manifest from a crash: as if there were no partial.
            Err(StoreError::BadManifest { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Releases a blob's "partial open" mark when the [`Partial`] goes away.
struct OpenMark {
    store: BlobStore,
    id: BlobId,
}

impl Drop for OpenMark {
    fn drop(&mut self) {
        lock(&self.store.inner.open_partials).remove(&self.id);
    }
}

/// A download in progress: verified chunks are written in place, and which
/// ones are present is persisted, so a restarted agent resumes where it was.
pub struct Partial {
    guard: OpenMark,
    manifest: Arc<Manifest>,
    dir: PathBuf,
    data: File,
    have_file: File,
    have: Vec<u8>,
    missing: u32,
    done: bool,
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("id", &self.guard.id)
            .field("missing", &self.missing)
            .field("total", &self.manifest.num_chunks())
            .finish()
    }
}

impl Partial {
    /// The blob being downloaded.
    pub fn id(&self) -> BlobId {
        self.guard.id
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether chunk `idx` is written and verified.
    pub fn has_chunk(&self, idx: u32) -> bool {
        self.have
            .get(idx as usize / 8)
            .is_some_and(|b| b & (1 << (idx % 8)) != 0)
    }

    /// Chunk `idx` if it is written and verified (checked against its hash again on
    /// the way out), so a download in progress can serve what it already has.
    pub fn read_chunk(&self, idx: u32) -> Result<Vec<u8>> {
        let id = self.id();
        let len = self
            .manifest
            .chunk_len(idx)
            .ok_or(StoreError::NoSuchChunk {
                id,
                idx,
                chunks: self.manifest.num_chunks(),
            })?;
        if !self.has_chunk(idx) {
            return Err(StoreError::NoSuchChunk {
                id,
                idx,
                chunks: self.manifest.num_chunks(),
            });
        }
        let path = self.dir.join(DATA);
        let mut f = File::open(&path).map_err(io_err("open", &path))?;
        f.seek(SeekFrom::Start(self.manifest.chunk_offset(idx)))
            .map_err(io_err("seek", &path))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(io_err("read", &path))?;
        if self.manifest.verify_chunk(idx, &buf).is_err() {
            return Err(StoreError::Corrupt {
                id,
                chunks: vec![idx],
            });
        }
        Ok(buf)
    }

    /// Indices of the chunks still missing, ascending.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.manifest.num_chunks())
            .filter(|&i| !self.has_chunk(i))
            .collect()
    }

    /// How many chunks are still missing.
    pub fn missing_count(&self) -> u32 {
        self.missing
    }

    /// Whether [`finish`](Self::finish) has moved the blob into place.
    pub fn is_finished(&self) -> bool {
        self.done
    }

    fn set_bit(&mut self, idx: u32, on: bool) -> Result<()> {
        let byte = idx as usize / 8;
        let was = self.has_chunk(idx);
        if on {
            self.have[byte] |= 1 << (idx % 8);
        } else {
            self.have[byte] &= !(1 << (idx % 8));
        }
        match (was, on) {
            (false, true) => self.missing -= 1,
            (true, false) => self.missing += 1,
            _ => {}
        }
        // Not fsynced: a bit that survives a crash without its data is caught
        // by the full re-check in `finish`, which clears it again.
        let path = self.dir.join(HAVE);
        self.have_file
            .seek(SeekFrom::Start(byte as u64))
            .and_then(|_| self.have_file.write_all(&self.have[byte..=byte]))
            .map_err(io_err("write", &path))
    }

    /// Verifies chunk `idx` against the manifest and writes it.
    ///
    /// A chunk that does not match is refused with [`StoreError::BadChunk`] and
    /// nothing is written. Writing a chunk already present is a no-op.
    pub fn write_chunk(&mut self, idx: u32, bytes: &[u8]) -> Result<()> {
        let id = self.id();
        self.manifest
            .verify_chunk(idx, bytes)
            .map_err(|reason| StoreError::BadChunk { id, idx, reason })?;
        if self.has_chunk(idx) {
            return Ok(());
        }
        let path = self.dir.join(DATA);
        self.data
            .seek(SeekFrom::Start(self.manifest.chunk_offset(idx)))
            .and_then(|_| self.data.write_all(bytes))
            .map_err(io_err("write", &path))?;
        self.set_bit(idx, true)
    }

    /// Checks the assembled content and moves it into the store atomically.
    ///
    /// Every chunk and the whole content are re-read and re-hashed from disk
    /// first. Chunks that no longer match are marked missing again and
    /// reported as [`StoreError::Corrupt`] (fetch them again, then retry).
    /// Calling it again after success returns the id.
    pub fn finish(&mut self) -> Result<BlobId> {
        let id = self.id();
        if self.done {
            return Ok(id);
        }
        if self.missing > 0 {
            return Err(StoreError::Incomplete {
                id,
                missing: self.missing,
                total: self.manifest.num_chunks(),
            });
        }
        let data_path = self.dir.join(DATA);
        self.data.sync_all().map_err(io_err("fsync", &data_path))?;
        let s = scan(&data_path, &self.manifest)?;
        if !s.bad.is_empty() {
            for &idx in &s.bad {
                self.set_bit(idx, false)?;
            }
            return Err(StoreError::Corrupt { id, chunks: s.bad });
        }
        if s.content != self.manifest.content_hash() {
            return Err(StoreError::ContentMismatch {
                id,
                expected: self.manifest.content_hash(),
                got: s.content,
            });
        }
        let store = self.guard.store.clone();
        store.publish_dir(&self.dir, &self.manifest)?;
        // Only bookkeeping is left in the published directory; a stray bitmap is harmless.
        let _ = fs::remove_file(store.blob_dir(&id).join(HAVE));
        self.done = true;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn content(len: usize, seed: u8) -> Vec<u8> {
        // Distinct bytes per position so a misplaced chunk cannot go unnoticed.
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    fn store(dir: &Path) -> BlobStore {
        BlobStore::open_with_chunk_size(dir, 1024).unwrap()
    }

    #[test]
    fn small_blob_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let id = s.put_bytes(b"(module)").unwrap();
        assert!(s.has(&id));
        assert_eq!(s.read_all(&id).unwrap(), b"(module)");
        let m = s.manifest(&id).unwrap();
        assert_eq!(m.num_chunks(), 1);
        assert_eq!(
            m.content_hash().to_hex(),
            blake3::hash(b"(module)").to_hex().as_str()
        );
        assert_eq!(fs::read(s.path_of(&id).unwrap()).unwrap(), b"(module)");
        s.verify(&id).unwrap();
    }

    #[test]
    fn multi_chunk_blob_round_trips_from_file() {
        let t = tempfile::tempdir().unwrap();
        let s = store(&t.path().join("store"));
        let data = content(5 * 1024 + 512, 1); // 5.5 chunks
        let src = t.path().join("image.tar");
        fs::write(&src, &data).unwrap();
        let id = s.put_file(&src).unwrap();
        let m = s.manifest(&id).unwrap();
        assert_eq!((m.size(), m.num_chunks()), (5632, 6));
        let mut joined = Vec::new();
        for i in 0..6 {
            joined.extend(s.read_chunk(&id, i).unwrap());
        }
        assert_eq!(joined, data);
        assert_eq!(s.read_all(&id).unwrap(), data);
        assert!(matches!(
            s.read_chunk(&id, 6),
            Err(StoreError::NoSuchChunk {
                idx: 6,
                chunks: 6,
                ..
            })
        ));
        // Same bytes from memory: same id (content-addressed), no second copy.
        assert_eq!(s.put_bytes(&data).unwrap(), id);
        assert_eq!(s.list().unwrap(), vec![id]);
        assert_eq!(id, Manifest::for_bytes(&data, 1024).unwrap().id());
    }

    #[test]
    fn id_is_stable_across_stores_and_depends_on_chunking() {
        let t = tempfile::tempdir().unwrap();
        let data = content(3000, 2);
        let a = store(&t.path().join("a")).put_bytes(&data).unwrap();
        let b = store(&t.path().join("b")).put_bytes(&data).unwrap();
        assert_eq!(a, b);
        let c = BlobStore::open_with_chunk_size(t.path().join("c"), 512)
            .unwrap()
            .put_bytes(&data)
            .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn corrupted_chunk_is_rejected_at_write_and_nothing_is_written() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let data = content(4096, 3);
        let m = Manifest::for_bytes(&data, 1024).unwrap();
        let mut p = s.begin(&m).unwrap();
        let mut bad = data[1024..2048].to_vec();
        bad[7] ^= 1;
        let e = p.write_chunk(1, &bad).unwrap_err();
        assert!(matches!(e, StoreError::BadChunk { idx: 1, .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("chunk 1 of blob {}", m.id())),
            "{e}"
        );
        assert!(!p.has_chunk(1));
        assert_eq!(p.missing(), vec![0, 1, 2, 3]);
        // The region stayed zero: nothing of the bad chunk reached the disk.
        let on_disk = fs::read(s.partial_dir(&m.id()).join(DATA)).unwrap();
        assert!(on_disk[1024..2048].iter().all(|&b| b == 0));
        assert!(matches!(
            p.write_chunk(4, b"x"),
            Err(StoreError::BadChunk { .. })
        ));
        assert!(matches!(
            p.write_chunk(3, &data[3072..4000]),
            Err(StoreError::BadChunk {
                reason: ChunkMismatch::Length { .. },
                ..
            })
        ));
    }

    #[test]
    fn partial_assembles_in_any_order_and_finish_publishes() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let data = content(5 * 1024 + 512, 4);
        let m = Manifest::for_bytes(&data, 1024).unwrap();
        let mut p = s.begin(&m).unwrap();
        assert!(matches!(s.begin(&m), Err(StoreError::Busy(_))));
        for i in [5u32, 0, 3, 1, 4] {
            let off = i as usize * 1024;
            p.write_chunk(i, &data[off..(off + 1024).min(data.len())])
                .unwrap();
        }
        assert_eq!(p.missing(), vec![2]);
        assert!(matches!(
            p.finish(),
            Err(StoreError::Incomplete {
                missing: 1,
                total: 6,
                ..
            })
        ));
        assert!(!s.has(&m.id()));
        p.write_chunk(2, &data[2048..3072]).unwrap();
        assert_eq!(p.finish().unwrap(), m.id());
        assert!(s.has(&m.id()));
        assert_eq!(s.read_all(&m.id()).unwrap(), data);
        assert!(s.partials().unwrap().is_empty());
        assert!(!s.blob_dir(&m.id()).join(HAVE).exists());
        drop(p);
        // The open mark is released with the Partial.
        s.begin(&m).unwrap();
    }

    #[test]
    fn finish_refuses_content_whose_hash_does_not_match() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let data = content(2500, 5);
        let honest = Manifest::for_bytes(&data, 1024).unwrap();
        // Chunk hashes right, content hash wrong: a manifest made up by someone.
        let lying = Manifest::new(
            honest.size(),
            1024,
            ContentHash::from_bytes([9; 32]),
            honest.chunks().to_vec(),
        )
        .unwrap();
        let mut p = s.begin(&lying).unwrap();
        for i in 0..3u32 {
            let off = i as usize * 1024;
            p.write_chunk(i, &data[off..(off + 1024).min(data.len())])
                .unwrap();
        }
        let e = p.finish().unwrap_err();
        assert!(matches!(e, StoreError::ContentMismatch { .. }), "{e}");
        assert!(
            e.to_string().contains(&honest.content_hash().to_hex()),
            "{e}"
        );
        assert!(!s.has(&lying.id()));
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn resume_after_restart_continues_with_missing_chunks_only() {
        let t = tempfile::tempdir().unwrap();
        let data = content(10 * 1024, 6);
        let m = Manifest::for_bytes(&data, 1024).unwrap();
        {
            let s = store(t.path());
            let mut p = s.begin(&m).unwrap();
            for i in (0..10u32).step_by(2) {
                let off = i as usize * 1024;
                p.write_chunk(i, &data[off..off + 1024]).unwrap();
            }
            // Agent stops here: Partial and store dropped without finish.
        }
        let s = store(t.path());
        assert!(!s.has(&m.id()));
        assert_eq!(s.partials().unwrap(), vec![m.id()]);
        let mut p = s
            .resume(&m.id())
            .unwrap()
            .expect("partial survives restart");
        assert_eq!(p.missing(), vec![1, 3, 5, 7, 9]);
        for i in p.missing() {
            let off = i as usize * 1024;
            p.write_chunk(i, &data[off..off + 1024]).unwrap();
        }
        p.finish().unwrap();
        assert_eq!(s.read_all(&m.id()).unwrap(), data);
    }

    #[test]
    fn crash_before_rename_leaves_no_complete_corrupt_blob() {
        let t = tempfile::tempdir().unwrap();
        let data = content(4 * 1024, 7);
        let m = Manifest::for_bytes(&data, 1024).unwrap();
        {
            let s = store(t.path());
            // A put that crashed after writing, before its rename.
            let (stage, _) = s.stage(&mut &data[..], Path::new("<test>")).unwrap();
            std::mem::forget(stage); // a crash runs no destructors
                                     // A download with every chunk written whose last write was torn.
            let mut p = s.begin(&m).unwrap();
            for i in 0..4u32 {
                let off = i as usize * 1024;
                p.write_chunk(i, &data[off..off + 1024]).unwrap();
            }
            let mut f = OpenOptions::new()
                .write(true)
                .open(s.partial_dir(&m.id()).join(DATA))
                .unwrap();
            f.seek(SeekFrom::Start(3 * 1024 + 100)).unwrap();
            f.write_all(&[0; 16]).unwrap();
        }
        let s = store(t.path());
        assert!(!s.has(&m.id()));
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(s.read_all(&m.id()), Err(StoreError::NotFound(_))));
        assert_eq!(fs::read_dir(t.path().join(TMP)).unwrap().count(), 0);
        let mut p = s.resume(&m.id()).unwrap().unwrap();
        assert!(p.missing().is_empty(), "the bitmap believes the torn chunk");
        let e = p.finish().unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { chunks, .. } if chunks == &[3]),
            "{e}"
        );
        assert!(!s.has(&m.id()));
        assert_eq!(p.missing(), vec![3]);
        p.write_chunk(3, &data[3072..]).unwrap();
        p.finish().unwrap();
        assert_eq!(s.read_all(&m.id()).unwrap(), data);
    }

    #[test]
    fn torn_manifest_in_partial_area_is_ignored() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let m = Manifest::for_bytes(&content(3000, 8), 1024).unwrap();
        drop(s.begin(&m).unwrap());
        let mpath = s.partial_dir(&m.id()).join(MANIFEST);
        let bytes = fs::read(&mpath).unwrap();
        fs::write(&mpath, &bytes[..bytes.len() / 2]).unwrap();
        assert!(s.resume(&m.id()).unwrap().is_none());
        // begin starts it over cleanly.
        assert_eq!(s.begin(&m).unwrap().missing(), vec![0, 1, 2]);
    }

    #[test]
    fn list_and_remove() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let a = s.put_bytes(b"a").unwrap();
        let b = s.put_bytes(&content(5000, 9)).unwrap();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(s.list().unwrap(), want);
        fs::create_dir(t.path().join(BLOBS).join("not-a-blob")).unwrap();
        assert_eq!(s.list().unwrap(), want);
        assert!(s.remove(&a).unwrap());
        assert!(!s.remove(&a).unwrap());
        assert!(!s.has(&a));
        assert!(matches!(s.manifest(&a), Err(StoreError::NotFound(_))));
        assert_eq!(s.list().unwrap(), vec![b]);
        // A blob being downloaded cannot be removed under the downloader.
        let m = Manifest::for_bytes(b"zzz", 1024).unwrap();
        let p = s.begin(&m).unwrap();
        assert!(matches!(s.remove(&m.id()), Err(StoreError::Busy(_))));
        drop(p);
        assert!(s.remove(&m.id()).unwrap());
        assert!(s.partials().unwrap().is_empty());
    }

    #[test]
    fn on_disk_corruption_of_complete_blob_is_detected_not_served() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let id = s.put_bytes(&content(3000, 10)).unwrap();
        let path = s.path_of(&id).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[1500] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        assert!(
            matches!(&s.read_chunk(&id, 1), Err(StoreError::Corrupt { chunks, .. }) if chunks == &[1])
        );
        assert!(s.read_chunk(&id, 0).is_ok());
        assert!(matches!(
            s.read_all(&id),
            Err(StoreError::ContentMismatch { .. })
        ));
        assert!(matches!(s.verify(&id), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn empty_blob_and_bad_chunk_size() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let id = s.put_bytes(b"").unwrap();
        assert_eq!(s.read_all(&id).unwrap(), b"");
        assert_eq!(s.manifest(&id).unwrap().num_chunks(), 0);
        let e = BlobStore::open_with_chunk_size(t.path(), 0).unwrap_err();
        assert!(e.to_string().contains("chunk size 0"), "{e}");
        let e = s.put_file(t.path().join("missing.wasm")).unwrap_err();
        assert!(e.to_string().contains("missing.wasm"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_chunkings_round_trip(
            len in 0usize..6000,
            chunk_size in 1u32..2048,
            seed: u8,
            order_seed: u64,
        ) {
            let t = tempfile::tempdir().unwrap();
            let data = content(len, seed);
            let a = BlobStore::open_with_chunk_size(t.path().join("a"), chunk_size).unwrap();
            let id = a.put_bytes(&data).unwrap();
            prop_assert_eq!(a.read_all(&id).unwrap(), data.clone());
            let m = a.manifest(&id).unwrap();
            prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m.clone());
            // Reassemble elsewhere chunk by chunk, in a shuffled order.
            let b = BlobStore::open(t.path().join("b")).unwrap();
            let mut p = b.begin(&m).unwrap();
            let mut order: Vec<u32> = (0..m.num_chunks()).collect();
            let mut x = order_seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            for i in order {
                p.write_chunk(i, &a.read_chunk(&id, i).unwrap()).unwrap();
            }
            prop_assert_eq!(p.finish().unwrap(), id);
            prop_assert_eq!(b.read_all(&id).unwrap(), data);
        }
    }
}
