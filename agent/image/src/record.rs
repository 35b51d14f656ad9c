//! The image record in cluster state and the image blob.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Prefix of image records in cluster state: `image/<reference>`.
pub const IMAGE_PREFIX: &str = "image/";

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// The layer's diff id (`sha256:` of its uncompressed tar), from the image config.
    pub diff_id: String,
    /// The blob holding the layer's bytes exactly as `docker save` wrote them.
    pub blob: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Which nodes fetch an image as soon as it is pushed (`--to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preheat {
    /// Every node with a Docker Engine.
    All,
    /// Nodes with this label value.
    Label {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
}

impl Preheat {
    /// Parses `all` or `KEY=VALUE`.
    pub fn parse(s: &str) -> Result<Preheat, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(Preheat::All);
        }
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => Ok(Preheat::Label {
                key: k.trim().to_string(),
                value: v.trim().to_string(),
            }),
            _ => Err(format!(
                "--to {s:?}: expected `all` or LABEL=VALUE (e.g. zone=edge)"
            )),
        }
    }

    /// Whether a node with `labels` is meant.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Preheat::All => true,
            Preheat::Label { key, value } => labels.get(key) == Some(value),
        }
    }
}

impl std::fmt::Display for Preheat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Preheat::All => f.write_str("all"),
            Preheat::Label { key, value } => write!(f, "{key}={value}"),
        }
    }
}

/// `image/<reference>`: which blobs make up an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `name:tag`, normalized.
    pub reference: String,
    /// The image id (`sha256:` of its config), what `docker image inspect` shows.
    pub id: String,
    /// The image blob ([`ImageBlob`] as JSON).
    pub image_blob: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// Node that pushed it.
    pub pushed_by: String,
    /// When (ms since the Unix epoch).
    pub pushed_ms: u64,
    /// Nodes that fetch it at once.
    #[serde(default)]
    pub preheat: Option<Preheat>,
}

impl ImageRecord {
    /// The cluster-state key of `reference`.
    pub fn key(reference: &str) -> String {
        format!("{IMAGE_PREFIX}{reference}")
    }

    /// Bytes of all its layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Every blob it needs: the image blob and each distinct layer blob.
    pub fn blobs(&self) -> Vec<String> {
        let mut v = vec![self.image_blob.clone()];
        for l in &self.layers {
            if !v.contains(&l.blob) {
                v.push(l.blob.clone());
            }
        }
        v
    }
}

/// The small blob stored next to the layers: enough to write a `docker load`
/// archive with the same image id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBlob {
    /// `name:tag`.
    pub reference: String,
    /// The image config, byte for byte (its sha256 is the image id).
    pub config: String,
    /// Hex of the config's sha256 (the image id without `sha256:`).
    pub config_hex: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
}

impl ImageBlob {
    /// Encodes it (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes one.
    pub fn decode(bytes: &[u8]) -> Result<ImageBlob, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable image blob: {e}"))
    }
}

/// Why an image reference is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {reference:?}: {why}")]
pub struct ReferenceError {
    /// What was given.
    pub reference: String,
    /// What is wrong.
    pub why: &'static str,
}

/// Checks a reference and adds `:latest` when it names no tag (as Docker does):
/// `myapp` → `myapp:latest`, `reg:5000/app` → `reg:5000/app:latest`. Digests
/// (`@sha256:…`) are refused: shoal names images by tag.
pub fn normalize_reference(reference: &str) -> Result<String, ReferenceError> {
    let err = |why| ReferenceError {
        reference: reference.to_string(),
        why,
    };
    let r = reference.trim();
    if r.is_empty() {
        return Err(err("empty"));
    }
    if r.len() > 255 {
        return Err(err("longer than 255 characters"));
    }
    if r.contains('@') {
        return Err(err("digests are not supported: name an image by tag"));
    }
    if !r.chars().all(|c| {
        c.is_ascii_lowercase()
            || c.is_ascii_uppercase()
            || c.is_ascii_digit()
            || matches!(c, '.' | '_' | '-' | '/' | ':')
    }) {
        return Err(err(
            "only letters, digits and . _ - / : are allowed (name[:tag])",
        ));
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    let (name, tag) = match last.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (last, None),
    };
    if name.is_empty() || r.starts_with('/') || r.ends_with('/') || r.contains("//") {
        return Err(err("the name is empty"));
    }
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(err("repository names must be lowercase"));
    }
    let full = match tag {
        Some("") => return Err(err("the tag after `:` is empty")),
        Some(t) if t.contains(':') => return Err(err("more than one `:` in the tag")),
        Some(t) if t.len() > 128 => return Err(err("the tag is longer than 128 characters")),
        Some(_) => r.to_string(),
        None => format!("{r}:latest"),
    };
    // Checked on the result: a name of 250 characters is too long once `:latest` is
    // added (found by fuzzing: normalising must accept its own output).
    if full.len() > 255 {
        return Err(err("longer than 255 characters with its tag"));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_a_tag_and_bad_ones_are_named() {
        assert_eq!(normalize_reference("myapp").unwrap(), "myapp:latest");
        assert_eq!(normalize_reference("myapp:2.1").unwrap(), "myapp:2.1");
        assert_eq!(
            normalize_reference("reg:5000/team/app").unwrap(),
            "reg:5000/team/app:latest"
        );
        let long = "a".repeat(250);
        for bad in [
            "",
            "a b",
            "app:",
            "App:1",
            "app@sha256:00",
            "/app",
            "a//b",
            &long,
        ] {
            let e = normalize_reference(bad).unwrap_err();
            assert!(e.to_string().contains("image reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn preheat_parses_all_and_labels() {
        assert_eq!(Preheat::parse("all").unwrap(), Preheat::All);
        let p = Preheat::parse("zone=edge").unwrap();
        let mut labels = BTreeMap::new();
        assert!(!p.matches(&labels));
        labels.insert("zone".to_string(), "edge".to_string());
        assert!(p.matches(&labels));
        assert!(Preheat::parse("zone").is_err());
        assert!(Preheat::parse("=x").is_err());
    }
}
