//! Builds the guest workspace in `plugins/` (built-in policies, test fixtures and the
//! example in `examples/policies/`) for `wasm32-wasip2`, and hands the components to
//! the crate through `OUT_DIR` (`include_bytes!` in `src/builtin.rs`, and the
//! `SHOAL_POLICY_GUEST_DIR` variable for tests and benchmarks).
//!
//! The nested cargo uses its own target directory, `<target>/shoal-plugins`: sharing
//! `<target>` itself deadlocks whenever the outer build uses the release profile
//! (`cargo build --release`, `cargo bench`), because both cargos then want the lock on
//! `<target>/release` (host artifacts of the nested build live there too). A stable
//! directory, unlike one under `OUT_DIR`, is shared by every profile, so the guests
//! are compiled once. The examples' `.wasm` files (and the hostile discovery fixture
//! the black-box tests install) are copied to `<target>/wasm32-wasip2/release/`,
//! where the READMEs say they are.
//!
//! Set `SHOAL_POLICY_PREBUILT_GUESTS` to a directory of prebuilt components to skip the
//! nested build (packagers, offline builds).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// Packages built together share one SDK feature (their world), so each group is one
/// cargo invocation; mixing worlds in one invocation would unify the SDK's features and
/// put every world's type information into every component.
const GROUPS: &[&[&str]] = &[
    &[
        "shoal-builtin-scheduler",
        "shoal-fixture-spin",
        "shoal-fixture-bomb",
        "shoal-fixture-trap",
        "shoal-fixture-malformed",
        "shoal-fixture-kv",
        "hybrid-cloud",
    ],
    &["shoal-builtin-scaler", "shoal-fixture-scaler-hostile"],
    &[
        "shoal-builtin-discovery",
        "shoal-fixture-discovery-trap",
        "local-first",
    ],
];

/// Components copied next to the root target's other wasm32-wasip2 outputs, where
/// the examples' READMEs and the black-box tests find them.
const PUBLIC: &[&str] = &[
    "hybrid_cloud.wasm",
    "local_first.wasm",
    "shoal_fixture_discovery_trap.wasm",
    "shoal_fixture_scaler_hostile.wasm",
];

fn main() {
    if let Err(e) = run() {
        // Cargo shows this output when the build script fails.
        eprintln!("error: building the WebAssembly guests failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?);
    let root = manifest
        .join("../..")
        .canonicalize()
        .map_err(|e| format!("workspace root: {e}"))?;
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);
    let plugins = root.join("plugins");

    for path in [
        root.join("wit"),
        plugins.join("Cargo.toml"),
        plugins.join("Cargo.lock"),
        plugins.join("sdk"),
        plugins.join("logic/src"),
        plugins.join("logic/Cargo.toml"),
        plugins.join("builtin"),
        plugins.join("fixtures"),
        root.join("examples/policies"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=SHOAL_POLICY_PREBUILT_GUESTS");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo:rustc-env=SHOAL_POLICY_GUEST_DIR={}", out.display());

    let names: Vec<String> = GROUPS
        .iter()
        .flat_map(|g| g.iter())
        .map(|p| format!("{}.wasm", p.replace('-', "_")))
        .collect();

    if let Some(prebuilt) = env::var_os("SHOAL_POLICY_PREBUILT_GUESTS") {
        return copy_all(Path::new(&prebuilt), &out, &names);
    }

    let target_dir = target_dir(&root, &out);
    let guest_dir = target_dir.join("shoal-plugins");
    ensure_wasm_target()?;
    for group in GROUPS {
        let mut cmd = cargo();
        cmd.current_dir(&plugins)
            .args(["build", "--release", "--target", TARGET, "--target-dir"])
            .arg(&guest_dir);
        for package in *group {
            cmd.args(["-p", package]);
        }
        let output = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`cargo build --target {TARGET}` in {} failed:\n{}{}",
                plugins.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    let built = guest_dir.join(TARGET).join("release");
    copy_all(&built, &out, &names)?;
    let public = target_dir.join(TARGET).join("release");
    fs::create_dir_all(&public).map_err(|e| format!("creating {}: {e}", public.display()))?;
    PUBLIC
        .iter()
        .try_for_each(|name| copy(&built.join(name), &public.join(name)))
}

/// `CARGO_TARGET_DIR` if absolute; otherwise the target directory `OUT_DIR` lives in
/// (cargo marks its root with `CACHEDIR.TAG`); otherwise `<root>/target`.
fn target_dir(root: &Path, out: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    out.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"))
}

/// A cargo command that does not inherit what the outer cargo set for this build
/// script (profile, target, host RUSTFLAGS, clippy's wrapper, ...), but keeps its
/// jobserver (`CARGO_MAKEFLAGS`) so both builds share the same job slots.
fn cargo() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    const KEEP: &[&str] = &["CARGO_HOME", "CARGO_MAKEFLAGS", "CARGO_TERM_COLOR"];
    const KEEP_PREFIX: &[&str] = &[
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let cargo_var = key.starts_with("CARGO_") || key.starts_with("__CARGO");
        let kept = KEEP.contains(&key) || KEEP_PREFIX.iter().any(|p| key.starts_with(p));
        if (cargo_var && !kept)
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Installs the wasm32-wasip2 standard library with rustup if the toolchain lacks it.
fn ensure_wasm_target() -> Result<(), String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("running {}: {e}", rustc.to_string_lossy()))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).is_dir() {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map_err(|e| format!("the {TARGET} target is missing and rustup could not be run ({e}); install the target's standard library for your toolchain"))?;
    if !status.success() {
        return Err(format!("`rustup target add {TARGET}` failed"));
    }
    Ok(())
}

fn copy_all(from: &Path, to: &Path, names: &[String]) -> Result<(), String> {
    names
        .iter()
        .try_for_each(|name| copy(&from.join(name), &to.join(name)))
}

/// Copies through a temporary file and a rename, so a concurrent reader never sees a
/// half-written component.
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_extension(format!("tmp{}", std::process::id()));
    fs::copy(from, &tmp)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), to.display()))
}
