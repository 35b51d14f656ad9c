//! Writing a `docker load` archive from an image's blobs.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::record::ImageBlob;

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A layer this node must include is not in its store.
    #[error("layer {diff_id} (blob {blob}) is not held on this node")]
    Missing {
        /// The layer's diff id.
        diff_id: String,
        /// Its blob.
        blob: String,
    },
    /// The image blob names something impossible.
    #[error("bad image blob: {0}")]
    Bad(String),
    /// Reading a layer or writing the archive failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Writes a legacy-layout `docker load` archive of `image` to `out`: its config,
/// a `manifest.json` tagging it with its reference, and each layer, read from the
/// file `layer_file(blob)` gives. Layer `i` is left out when `skip(i)` says the
/// engine already holds it (and every layer below it): `docker load` reads a layer
/// file only when the engine lacks it. Returns the bytes of layers written.
pub fn assemble(
    image: &ImageBlob,
    layer_file: &dyn Fn(&str) -> Option<PathBuf>,
    skip: &dyn Fn(usize) -> bool,
    out: impl Write,
) -> Result<u64, AssembleError> {
    if image.config_hex.len() != 64 || !image.config_hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AssembleError::Bad(format!(
            "config id {:?} is not a sha256",
            image.config_hex
        )));
    }
    let mut tar = tar::Builder::new(out);
    let out_path = PathBuf::from("<archive>");
    let werr = |source| AssembleError::Io {
        what: "write",
        path: out_path.clone(),
        source,
    };
    let config_name = format!("{}.json", image.config_hex);
    append_bytes(&mut tar, &config_name, image.config.as_bytes()).map_err(werr)?;
    let mut names = Vec::new();
    let mut written: BTreeSet<String> = BTreeSet::new();
    let mut bytes = 0u64;
    for (i, layer) in image.layers.iter().enumerate() {
        let hex = layer
            .diff_id
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| AssembleError::Bad(format!("diff id {:?}", layer.diff_id)))?;
        let name = format!("{hex}/layer.tar");
        names.push(name.clone());
        if skip(i) || !written.insert(name.clone()) {
            continue;
        }
        let path = layer_file(&layer.blob).ok_or_else(|| AssembleError::Missing {
            diff_id: layer.diff_id.clone(),
            blob: layer.blob.clone(),
        })?;
        bytes += append_file(&mut tar, &name, &path)?;
    }
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [image.reference],
        "Layers": names,
    }]);
    let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
    append_bytes(&mut tar, "manifest.json", &manifest).map_err(werr)?;
    tar.into_inner().map_err(werr)?.flush().map_err(werr)?;
    Ok(bytes)
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    h
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut h = header(bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    path: &Path,
) -> Result<u64, AssembleError> {
    let rerr = |what| {
        let path = path.to_path_buf();
        move |source| AssembleError::Io { what, path, source }
    };
    let f = File::open(path).map_err(rerr("open"))?;
    let size = f.metadata().map_err(rerr("stat"))?.len();
    let mut h = header(size);
    tar.append_data(&mut h, name, f).map_err(rerr("copy"))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use shoal_blob::BlobStore;

    use super::*;
    use crate::{split, ImageBlob};

    /// A fake image: layers of given contents, its config listing their diff ids.
    struct Fake {
        layers: Vec<Vec<u8>>,
        config: String,
        config_hex: String,
        diff_ids: Vec<String>,
    }

    fn fake(layers: &[&[u8]]) -> Fake {
        // Diff ids and the config id only need to look like sha256 here: docker
        // checks them on load, and the real-engine tests load real images.
        let diff_ids: Vec<String> = (0..layers.len())
            .map(|i| format!("sha256:{}", format!("{:02x}", i + 1).repeat(32)))
            .collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        Fake {
            layers: layers.iter().map(|l| l.to_vec()).collect(),
            config,
            config_hex: "ab".repeat(32),
            diff_ids,
        }
    }

    fn add(tar: &mut tar::Builder<&mut Vec<u8>>, name: &str, bytes: &[u8]) {
        let mut h = header(bytes.len() as u64);
        tar.append_data(&mut h, name, bytes).unwrap();
    }

    fn link(tar: &mut tar::Builder<&mut Vec<u8>>, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        tar.append_link(&mut h, name, target).unwrap();
    }

    /// `docker save` of a 20.10 engine: `<id>/layer.tar`, the second layer a symlink
    /// to the first (identical content), `<hex>.json`, `manifest.json`.
    fn legacy_archive(f: &Fake, dup_last: bool) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut t = tar::Builder::new(&mut buf);
            let mut names = Vec::new();
            for (i, l) in f.layers.iter().enumerate() {
                let name = format!("layer{i}/layer.tar");
                if dup_last && i + 1 == f.layers.len() && i > 0 {
                    link(&mut t, &name, "../layer0/layer.tar");
                } else {
                    add(&mut t, &name, l);
                }
                add(&mut t, &format!("layer{i}/VERSION"), b"1.0");
                names.push(name);
            }
            add(
                &mut t,
                &format!("{}.json", f.config_hex),
                f.config.as_bytes(),
            );
            let m = serde_json::json!([{
                "Config": format!("{}.json", f.config_hex),
                "RepoTags": ["app:1"],
                "Layers": names,
            }]);
            add(&mut t, "manifest.json", m.to_string().as_bytes());
            add(&mut t, "repositories", b"{}");
            t.finish().unwrap();
        }
        buf
    }

    /// The OCI layout (index.json → manifest → config and layers), no manifest.json.
    fn oci_archive(f: &Fake) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut t = tar::Builder::new(&mut buf);
            add(&mut t, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
            let mut layers = Vec::new();
            for (i, l) in f.layers.iter().enumerate() {
                let hex = format!("{:02x}", 0x10 + i).repeat(32);
                add(&mut t, &format!("blobs/sha256/{hex}"), l);
                layers.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{hex}"),
                    "size": l.len(),
                }));
            }
            add(
                &mut t,
                &format!("blobs/sha256/{}", f.config_hex),
                f.config.as_bytes(),
            );
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{}", f.config_hex),
                },
                "layers": layers,
            })
            .to_string();
            let mhex = "cd".repeat(32);
            add(&mut t, &format!("blobs/sha256/{mhex}"), manifest.as_bytes());
            let index = serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{mhex}"),
                    "annotations": {"io.containerd.image.name": "docker.io/library/app:1"},
                }],
            });
            add(&mut t, "index.json", index.to_string().as_bytes());
            t.finish().unwrap();
        }
        buf
    }

    /// Reads an archive back: file name → content.
    fn entries(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut a = tar::Archive::new(bytes);
        let mut out = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            out.insert(name, v);
        }
        out
    }

    fn round_trip(archive: &[u8], f: &Fake, layout: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("save.tar");
        std::fs::write(&path, archive).unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut calls = 0;
        let s = split(&path, "app:1", &store, &mut |done, total| {
            assert!(done <= total);
            calls += 1;
        })
        .unwrap();
        assert!(calls > 0);
        assert_eq!(s.layout, layout);
        assert_eq!(s.id, format!("sha256:{}", f.config_hex));
        assert_eq!(s.layers.len(), f.layers.len());
        for (l, (content, diff)) in s.layers.iter().zip(f.layers.iter().zip(&f.diff_ids)) {
            assert_eq!(&l.diff_id, diff);
            assert_eq!(l.size, content.len() as u64);
            let id = l.blob.parse().unwrap();
            assert_eq!(&store.read_all(&id).unwrap(), content);
        }
        let image = ImageBlob::decode(&store.read_all(&s.image_blob).unwrap()).unwrap();
        assert_eq!(image.config, f.config);

        // Back to a load archive: the same config bytes, every layer, tagged.
        let mut out = Vec::new();
        let path_of = |b: &str| store.path_of(&b.parse().ok()?);
        let bytes = assemble(&image, &path_of, &|_| false, &mut out).unwrap();
        let files = entries(&out);
        assert_eq!(
            files[&format!("{}.json", f.config_hex)],
            f.config.as_bytes()
        );
        let m: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(m[0]["RepoTags"][0], "app:1");
        let names: Vec<String> = m[0]["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let mut expect_bytes = 0;
        let mut distinct = BTreeSet::new();
        for (name, content) in names.iter().zip(&f.layers) {
            assert_eq!(&files[name], content);
            if distinct.insert(name.clone()) {
                expect_bytes += content.len() as u64;
            }
        }
        assert_eq!(bytes, expect_bytes);

        // Layers the engine already has are left out of the archive.
        let mut out = Vec::new();
        let bytes = assemble(&image, &path_of, &|i| i == 0, &mut out).unwrap();
        let files = entries(&out);
        assert!(!files.contains_key(&names[0]));
        assert_eq!(bytes, expect_bytes - f.layers[0].len() as u64);
    }

    #[test]
    fn legacy_archives_split_into_layers_and_load_archives_come_back() {
        let f = fake(&[&[1u8; 5000], b"second layer", &[7u8; 3 << 20]]);
        round_trip(&legacy_archive(&f, false), &f, "docker-save");
    }

    #[test]
    fn symlinked_duplicate_layers_are_followed() {
        let f = fake(&[b"same", b"middle", b"same"]);
        round_trip(&legacy_archive(&f, true), &f, "docker-save");
    }

    #[test]
    fn oci_archives_split_too() {
        let f = fake(&[b"base layer", &[3u8; 70_000]]);
        round_trip(&oci_archive(&f), &f, "oci");
    }

    #[test]
    fn the_same_layer_in_two_images_is_one_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut ids = Vec::new();
        for changed in [b"v1 top".as_slice(), b"v2 top"] {
            let f = fake(&[b"shared base", changed]);
            let path = dir.path().join("save.tar");
            std::fs::write(&path, legacy_archive(&f, false)).unwrap();
            ids.push(split(&path, "app:1", &store, &mut |_, _| {}).unwrap());
        }
        assert_eq!(ids[0].layers[0].blob, ids[1].layers[0].blob);
        assert_ne!(ids[0].layers[1].blob, ids[1].layers[1].blob);
    }

    #[test]
    fn bad_archives_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let path = dir.path().join("x.tar");
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).unwrap();
            let e = split(&path, "app:1", &store, &mut |_, _| {}).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        };
        check(b"", "empty");
        check(&[0xffu8; 1024], "x.tar");
        let mut buf = Vec::new();
        {
            let mut t = tar::Builder::new(&mut buf);
            add(&mut t, "hello.txt", b"hi");
            t.finish().unwrap();
        }
        check(&buf, "neither manifest.json nor index.json");
        let f = fake(&[b"a", b"b"]);
        let mut two = Vec::new();
        {
            let mut t = tar::Builder::new(&mut two);
            let m = serde_json::json!([
                {"Config": "a.json", "Layers": []},
                {"Config": "b.json", "Layers": []},
            ]);
            add(&mut t, "manifest.json", m.to_string().as_bytes());
            t.finish().unwrap();
        }
        check(&two, "holds 2 images");
        let mut missing = Vec::new();
        {
            let mut t = tar::Builder::new(&mut missing);
            add(
                &mut t,
                &format!("{}.json", f.config_hex),
                f.config.as_bytes(),
            );
            let m = serde_json::json!([{
                "Config": format!("{}.json", f.config_hex),
                "Layers": ["x/layer.tar", "y/layer.tar"],
            }]);
            add(&mut t, "manifest.json", m.to_string().as_bytes());
            t.finish().unwrap();
        }
        check(&missing, "x/layer.tar is named but missing");
    }

    #[test]
    fn a_missing_layer_blob_is_named() {
        let f = fake(&[b"a"]);
        let image = ImageBlob {
            reference: "app:1".into(),
            config: f.config.clone(),
            config_hex: f.config_hex.clone(),
            layers: vec![crate::LayerRef {
                diff_id: f.diff_ids[0].clone(),
                blob: "nope".into(),
                size: 1,
            }],
        };
        let e = assemble(&image, &|_| None, &|_| false, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("is not held on this node"), "{e}");
    }
}
