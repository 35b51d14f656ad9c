//! Reading a `docker save` archive into blobs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_blob::{BlobId, BlobStore, StoreError};

use crate::record::{ImageBlob, LayerRef};

/// Small metadata files (configs, manifests) are read whole up to this size.
const MAX_META: u64 = 16 << 20;

/// What [`split`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The image id (`sha256:<hex>` of the config).
    pub id: String,
    /// The image blob.
    pub image_blob: BlobId,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// Which layout the archive had (`docker-save` or `oci`).
    pub layout: &'static str,
}

/// Why an archive could not be split.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// Reading the archive failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The archive.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The archive is not a `docker save` archive shoal understands.
    #[error("not a docker save archive: {0}")]
    Format(String),
    /// The blob store refused a blob.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One entry of the legacy `manifest.json` (also written by newer engines next to
/// their OCI layout).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LegacyManifest {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// An entry seen in the first pass.
enum Seen {
    File,
    Link(String),
}

/// Splits the `docker save` archive at `path` into one blob per layer and an
/// image blob naming `reference`, all put into `store` (content already there is
/// not stored twice). `progress(done, total)` is called with archive bytes as
/// layers are stored.
pub fn split(
    path: &Path,
    reference: &str,
    store: &BlobStore,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Split, SplitError> {
    let total = std::fs::metadata(path)
        .map_err(|source| SplitError::Io {
            what: "stat",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let seen = scan(path)?;
    let meta = read_files(
        path,
        &["manifest.json", "index.json"].map(String::from).into(),
    )?;
    let resolve = |p: &str| resolve_links(&seen, p);
    let (config_path, layer_paths, layout) = if let Some(m) = meta.get("manifest.json") {
        let list: Vec<LegacyManifest> = serde_json::from_slice(m)
            .map_err(|e| SplitError::Format(format!("manifest.json: {e}")))?;
        let one = single(list)?;
        let layers = one.layers.iter().map(|l| resolve(l)).collect();
        let layout = if one.config.starts_with("blobs/") {
            "oci"
        } else {
            "docker-save"
        };
        (resolve(&one.config), layers, layout)
    } else if let Some(i) = meta.get("index.json") {
        let index: OciIndex = serde_json::from_slice(i)
            .map_err(|e| SplitError::Format(format!("index.json: {e}")))?;
        let mut desc = single(index.manifests)?;
        // An index may point at another index (one per platform list): follow it.
        for _ in 0..4 {
            if !desc.media_type.contains("index") {
                break;
            }
            let p = blob_path(&desc.digest)?;
            let bytes = read_one(path, &p)?;
            let inner: OciIndex = serde_json::from_slice(&bytes)
                .map_err(|e| SplitError::Format(format!("{p}: {e}")))?;
            desc = single(inner.manifests)?;
        }
        let p = blob_path(&desc.digest)?;
        let bytes = read_one(path, &p)?;
        let m: OciManifest =
            serde_json::from_slice(&bytes).map_err(|e| SplitError::Format(format!("{p}: {e}")))?;
        let layers = m
            .layers
            .iter()
            .map(|l| blob_path(&l.digest).map(|p| resolve(&p)))
            .collect::<Result<Vec<_>, _>>()?;
        (resolve(&blob_path(&m.config.digest)?), layers, "oci")
    } else {
        return Err(SplitError::Format(
            "it has neither manifest.json nor index.json".into(),
        ));
    };
    for p in layer_paths.iter().chain(std::iter::once(&config_path)) {
        if !matches!(seen.get(p), Some(Seen::File)) {
            return Err(SplitError::Format(format!("{p} is named but missing")));
        }
    }
    let config_bytes = read_one(path, &config_path)?;
    let config: Config = serde_json::from_slice(&config_bytes)
        .map_err(|e| SplitError::Format(format!("image config {config_path}: {e}")))?;
    if config.rootfs.diff_ids.len() != layer_paths.len() {
        return Err(SplitError::Format(format!(
            "the config lists {} layers, the manifest {}",
            config.rootfs.diff_ids.len(),
            layer_paths.len()
        )));
    }
    let config_hex = config_hex(&config_path)?;
    let config_text = String::from_utf8(config_bytes)
        .map_err(|_| SplitError::Format("the image config is not UTF-8".into()))?;

    // Store every layer, streaming each one from the archive.
    let wanted: BTreeSet<&str> = layer_paths.iter().map(String::as_str).collect();
    let mut stored: BTreeMap<String, (BlobId, u64)> = BTreeMap::new();
    let mut archive = tar::Archive::new(open(path)?);
    let mut done = 0u64;
    let entries = archive.entries_with_seek().map_err(io("read", path))?;
    for entry in entries {
        let mut entry = entry.map_err(io("read", path))?;
        let name = entry_name(&entry)?;
        let size = entry.size();
        if wanted.contains(name.as_str()) && !stored.contains_key(&name) {
            let id = store.put_reader(&mut entry)?;
            stored.insert(name, (id, size));
        }
        done = done.saturating_add(size);
        progress(done.min(total), total);
    }
    let layers = layer_paths
        .iter()
        .zip(config.rootfs.diff_ids)
        .map(|(p, diff_id)| {
            let (id, size) = stored
                .get(p)
                .ok_or_else(|| SplitError::Format(format!("layer {p} was not found")))?;
            Ok(LayerRef {
                diff_id,
                blob: id.to_string(),
                size: *size,
            })
        })
        .collect::<Result<Vec<_>, SplitError>>()?;
    let image = ImageBlob {
        reference: reference.to_string(),
        config: config_text,
        config_hex: config_hex.clone(),
        layers: layers.clone(),
    };
    let image_blob = store.put_bytes(&image.encode())?;
    progress(total, total);
    Ok(Split {
        id: format!("sha256:{config_hex}"),
        image_blob,
        layers,
        layout,
    })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SplitError {
    let path = path.to_path_buf();
    move |source| SplitError::Io { what, path, source }
}

fn open(path: &Path) -> Result<File, SplitError> {
    File::open(path).map_err(io("open", path))
}

fn single<T>(mut list: Vec<T>) -> Result<T, SplitError> {
    match list.len() {
        1 => Ok(list.remove(0)),
        0 => Err(SplitError::Format("it holds no image".into())),
        n => Err(SplitError::Format(format!(
            "it holds {n} images; push them one at a time"
        ))),
    }
}

/// `sha256:<hex>` → `blobs/sha256/<hex>`.
fn blob_path(digest: &str) -> Result<String, SplitError> {
    match digest.split_once(':') {
        Some((alg, hex))
            if !alg.is_empty()
                && !hex.is_empty()
                && hex.chars().all(|c| c.is_ascii_hexdigit())
                && alg.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            Ok(format!("blobs/{alg}/{hex}"))
        }
        _ => Err(SplitError::Format(format!("bad digest {digest:?}"))),
    }
}

/// The config's sha256 hex from its path (`<hex>.json` or `blobs/sha256/<hex>`).
fn config_hex(path: &str) -> Result<String, SplitError> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let hex = base.strip_suffix(".json").unwrap_or(base);
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(SplitError::Format(format!(
            "the config {path} is not named by its sha256"
        )))
    }
}

/// An entry's path without a leading `./`, refusing absolute and `..` paths.
fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, SplitError> {
    let p = entry
        .path()
        .map_err(|e| SplitError::Format(format!("an entry has a bad path: {e}")))?;
    let s = p.to_string_lossy();
    Ok(normalize(&s))
}

/// Normalizes a slash path: no `./`, no empty parts, `..` applied (never above the root).
fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

/// Follows symlinks (newer engines link identical layers to one file).
fn resolve_links(seen: &BTreeMap<String, Seen>, p: &str) -> String {
    let mut cur = normalize(p);
    for _ in 0..16 {
        match seen.get(&cur) {
            Some(Seen::Link(target)) => {
                let base = cur.rsplit_once('/').map_or("", |(dir, _)| dir);
                cur = if target.starts_with('/') {
                    normalize(target)
                } else {
                    normalize(&format!("{base}/{target}"))
                };
            }
            _ => return cur,
        }
    }
    cur
}

/// First pass: every entry's path and whether it is a file or a link.
fn scan(path: &Path) -> Result<BTreeMap<String, Seen>, SplitError> {
    let mut seen = BTreeMap::new();
    let mut archive = tar::Archive::new(open(path)?);
    let entries = archive.entries_with_seek().map_err(io("read", path))?;
    for entry in entries {
        let entry = entry.map_err(io("read", path))?;
        let name = entry_name(&entry)?;
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let target = if kind.is_hard_link() {
                format!("/{target}")
            } else {
                target
            };
            seen.insert(name, Seen::Link(target));
        } else if kind.is_file() {
            seen.insert(name, Seen::File);
        }
    }
    if seen.is_empty() {
        return Err(SplitError::Format("the archive is empty".into()));
    }
    Ok(seen)
}

/// Reads the named small files.
fn read_files(
    path: &Path,
    wanted: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<u8>>, SplitError> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(open(path)?);
    let entries = archive.entries_with_seek().map_err(io("read", path))?;
    for entry in entries {
        let mut entry = entry.map_err(io("read", path))?;
        let name = entry_name(&entry)?;
        if !wanted.contains(&name) || !entry.header().entry_type().is_file() {
            continue;
        }
        if entry.size() > MAX_META {
            return Err(SplitError::Format(format!(
                "{name} is {} bytes, more than metadata may be",
                entry.size()
            )));
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf).map_err(io("read", path))?;
        out.insert(name, buf);
    }
    Ok(out)
}

fn read_one(path: &Path, name: &str) -> Result<Vec<u8>, SplitError> {
    read_files(path, &[name.to_string()].into())?
        .remove(name)
        .ok_or_else(|| SplitError::Format(format!("{name} is named but missing")))
}
