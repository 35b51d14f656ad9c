//! Container images as shoal blobs, so the mesh itself can be the registry.
//!
//! An image is stored as one blob per layer plus a small *image blob* (the image
//! config, its reference and the ordered list of layers). [`split`] reads a
//! `docker save` archive — the legacy layout (`manifest.json`, `<id>/layer.tar`,
//! `<id>.json`) or the OCI layout of newer engines (`index.json`, `blobs/sha256/…`)
//! — and puts those blobs into a [`shoal_blob::BlobStore`]; [`assemble`] writes a
//! `docker load` archive back from the blobs a node holds. The [`ImageRecord`] is
//! what cluster state keeps under `image/<reference>` so any node knows which blobs
//! make up an image and which nodes to fetch them from.
//!
//! Layers are opaque bytes: they are never unpacked or recompressed, so the image a
//! node loads has the same id (`sha256` of its config) as the one pushed. This
//! crate does no network I/O and does not talk to Docker; it reads and writes files
//! synchronously (call it from a blocking-friendly thread). Which images to fetch,
//! from whom, and when to `docker load` are the agent's decisions.

#![warn(missing_docs)]

mod archive;
mod assemble;
mod record;

pub use archive::{split, Split, SplitError};
pub use assemble::{assemble, AssembleError};
pub use record::{
    normalize_reference, ImageBlob, ImageRecord, LayerRef, Preheat, ReferenceError, IMAGE_PREFIX,
};
