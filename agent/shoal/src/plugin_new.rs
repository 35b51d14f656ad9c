//! `shoal plugin new`: scaffolds a policy crate that builds anywhere.
//!
//! The crate gets the policy SDK, the built-in policies' logic and the
//! `shoal:policy` WIT copied in (`shoal/sdk`, `shoal/logic`, `shoal/wit`, embedded in
//! this binary at build time), so `cargo build --release --target wasm32-wasip2`
//! needs no shoal checkout, only crates.io. With it come a starting policy of the
//! chosen kind, a README and `tests/cases.json` for `shoal plugin test`. It writes
//! files only; it does not build them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use shoal_policy::PolicyKind;

/// The SDK as it is in this build, its WIT path pointed at the copy beside it.
const SDK_LIB: &str = include_str!("../../../plugins/sdk/src/lib.rs");
/// The logic crate's sources.
const LOGIC: &[(&str, &str)] = &[
    ("lib.rs", include_str!("../../../plugins/logic/src/lib.rs")),
    (
        "model.rs",
        include_str!("../../../plugins/logic/src/model.rs"),
    ),
    (
        "schedule.rs",
        include_str!("../../../plugins/logic/src/schedule.rs"),
    ),
    (
        "scale.rs",
        include_str!("../../../plugins/logic/src/scale.rs"),
    ),
    (
        "discover.rs",
        include_str!("../../../plugins/logic/src/discover.rs"),
    ),
];
/// The WIT package.
const WIT: &[(&str, &str)] = &[
    ("host.wit", include_str!("../../../wit/host.wit")),
    ("scheduler.wit", include_str!("../../../wit/scheduler.wit")),
    ("scaler.wit", include_str!("../../../wit/scaler.wit")),
    ("discovery.wit", include_str!("../../../wit/discovery.wit")),
];

const SDK_TOML: &str = r#"[package]
name = "shoal-policy-sdk"
description = "Write shoal policies as WebAssembly components (copied in by `shoal plugin new`)."
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"
publish = false

[features]
default = []
scheduler = []
scaler = []
discovery = []

[dependencies]
shoal-policy-logic = { path = "../logic" }
wit-bindgen = { version = "0.61", default-features = false, features = ["macros", "realloc", "std"] }
"#;

const LOGIC_TOML: &str = r#"[package]
name = "shoal-policy-logic"
description = "shoal's built-in policies as plain Rust (copied in by `shoal plugin new`)."
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"
publish = false

[features]
default = []
serde = ["dep:serde"]

[dependencies]
jiff = { version = "0.2", default-features = false, features = ["std", "tzdb-bundle-always"] }
serde = { version = "1", default-features = false, features = ["std", "derive"], optional = true }
"#;

/// What `plugin new` wrote.
#[derive(Debug)]
pub struct Scaffolded {
    /// The crate's directory.
    pub dir: PathBuf,
    /// The component's file name once built, relative to `dir`.
    pub wasm: String,
}

/// A crate name cargo accepts and that names a plugin well.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!("plugin name {name:?}: use 1-64 of a-z, 0-9, '-' and '_', starting with a letter");
    }
    Ok(())
}

/// Writes a new policy crate `name` of `kind` into `dir` (default `./name`).
pub fn scaffold(kind: PolicyKind, name: &str, dir: Option<&Path>) -> anyhow::Result<Scaffolded> {
    check_name(name)?;
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: pick another --dir (nothing was written)",
            dir.display()
        );
    }
    let kind_str = kind.as_str();
    let crate_name = name.replace('-', "_");
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{kind}}", kind_str)
            .replace("{{crate}}", &crate_name)
    };
    let (lib, cases) = match kind {
        PolicyKind::Scheduler => (
            include_str!("../templates/plugin/scheduler.rs"),
            include_str!("../templates/plugin/scheduler.json"),
        ),
        PolicyKind::Scaler => (
            include_str!("../templates/plugin/scaler.rs"),
            include_str!("../templates/plugin/scaler.json"),
        ),
        PolicyKind::Discovery => (
            include_str!("../templates/plugin/discovery.rs"),
            include_str!("../templates/plugin/discovery.json"),
        ),
    };
    let cargo = format!(
        r#"[package]
name = "{name}"
description = "A shoal {kind_str} policy."
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
shoal-policy-sdk = {{ path = "shoal/sdk", features = ["{kind_str}"] }}

# Its own workspace: it builds wherever it is.
[workspace]

# Small, fast guests. No unwinding: a panic is a trap, which the agent turns into
# its built-in policy's answer.
[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = true
panic = "abort"
"#
    );
    let sdk = SDK_LIB.replace("path: \"../../wit\"", "path: \"../wit\"");
    let mut files: Vec<(PathBuf, String)> = vec![
        ("Cargo.toml".into(), cargo),
        ("src/lib.rs".into(), fill(lib)),
        ("tests/cases.json".into(), cases.to_string()),
        (
            "README.md".into(),
            fill(include_str!("../templates/plugin/README.md")),
        ),
        (".gitignore".into(), "/target\n".into()),
        ("shoal/sdk/Cargo.toml".into(), SDK_TOML.into()),
        ("shoal/sdk/src/lib.rs".into(), sdk),
        ("shoal/logic/Cargo.toml".into(), LOGIC_TOML.into()),
    ];
    for (f, text) in LOGIC {
        files.push((Path::new("shoal/logic/src").join(f), (*text).into()));
    }
    for (f, text) in WIT {
        files.push((Path::new("shoal/wit").join(f), (*text).into()));
    }
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Scaffolded {
        dir,
        wasm: format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_copy_points_at_its_own_wit_and_names_are_checked() {
        // Every `path:` of the SDK's bindings must have been rewritten.
        assert_eq!(SDK_LIB.matches("path: \"../../wit\"").count(), 4);
        let sdk = SDK_LIB.replace("path: \"../../wit\"", "path: \"../wit\"");
        assert!(!sdk.contains("../../wit"));
        for bad in ["", "Web", "9lives", "a b", "x/y", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("my-policy_2").unwrap();
        // The copied manifests ask for what the checkout's guests build with.
        let guests = include_str!("../../../plugins/Cargo.toml");
        let wit_bindgen = guests
            .lines()
            .find(|l| l.starts_with("wit-bindgen = "))
            .unwrap();
        assert!(SDK_TOML.contains(wit_bindgen), "{wit_bindgen}");
        let logic = include_str!("../../../plugins/logic/Cargo.toml");
        for dep in logic
            .lines()
            .filter(|l| l.starts_with("jiff = ") || l.starts_with("serde = "))
        {
            assert!(LOGIC_TOML.contains(dep), "{dep}");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = scaffold(
            PolicyKind::Scaler,
            "cpu-target",
            Some(&dir.path().join("p")),
        )
        .unwrap();
        assert_eq!(out.wasm, "target/wasm32-wasip2/release/cpu_target.wasm");
        let readme = std::fs::read_to_string(out.dir.join("README.md")).unwrap();
        assert!(readme.contains("--kind scaler") && !readme.contains("{{"));
        // Not over an existing crate.
        let again = scaffold(PolicyKind::Scaler, "cpu-target", Some(&out.dir));
        assert!(again.unwrap_err().to_string().contains("not empty"));
    }
}
