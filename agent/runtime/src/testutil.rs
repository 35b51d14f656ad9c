//! Test helpers (feature `testutil`): a real container image for tests, made on this
//! machine because no registry is reachable.
//!
//! [`ensure_test_image`] builds `shoal-test-http:latest`, a `FROM scratch` image holding
//! one statically linked HTTP server (source: `src/testutil/http_server.rs`, std only).
//! What it needs is what building this crate already needs, nothing more:
//! - `rustc` (`$RUSTC` if set, else the one on `PATH`) for `x86_64-unknown-linux-gnu`;
//! - glibc's static libraries (`libc.a`, Debian's `libc6-dev`, which Rust's linking on
//!   Linux requires anyway), for `-C target-feature=+crt-static`;
//! - a Docker Engine; the image is built by its classic builder from a tarball context,
//!   which needs no network for `FROM scratch`.
//!
//! The image is labelled with a hash of the server source and rebuilt only when that
//! changes, so repeated test runs pay for it once.

use std::path::{Path, PathBuf};

use bollard::query_parameters::{BuildImageOptions, BuilderVersion};
use futures_util::StreamExt;

use crate::docker::DockerDriver;
use crate::error::DriverError;

/// The test image's reference.
pub const TEST_IMAGE: &str = "shoal-test-http:latest";
/// Source of the test server inside the image.
pub const SERVER_SOURCE: &str = include_str!("testutil/http_server.rs");
/// Port the test server listens on unless `PORT` says otherwise.
pub const SERVER_DEFAULT_PORT: u16 = 8080;
const SOURCE_LABEL: &str = "shoal.test.source";

/// Why the test image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestImageError {
    /// The compiler could not be run at all.
    #[error("cannot run {program} to build the test server: {source}")]
    Spawn {
        /// The compiler.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The compiler ran and failed.
    #[error(
        "compiling the static test server failed ({status}); glibc's static libraries \
         (libc.a, Debian package libc6-dev) are needed:\n{stderr}"
    )]
    Compile {
        /// Exit status.
        status: std::process::ExitStatus,
        /// What the compiler said.
        stderr: String,
    },
    /// A local file could not be written or read.
    #[error("test image: {what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The engine refused the build.
    #[error("docker: build {image}: {message}")]
    Build {
        /// The image being built.
        image: String,
        /// The engine's message.
        message: String,
    },
    /// A driver call failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
}

fn source_hash() -> String {
    blake3::hash(SERVER_SOURCE.as_bytes()).to_hex()[..16].to_string()
}

/// Compiles the test server into `out_dir` as a static executable and returns its path.
pub async fn compile_test_server(out_dir: &Path) -> Result<PathBuf, TestImageError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| TestImageError::Io { what, path, source }
    };
    let src = out_dir.join("shoal-test-http.rs");
    let bin = out_dir.join("shoal-test-http");
    tokio::fs::write(&src, SERVER_SOURCE)
        .await
        .map_err(io("write", &src))?;
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out = tokio::process::Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "-C",
            "opt-level=1",
            "-C",
            "strip=symbols",
        ])
        // Static: a FROM scratch image has no dynamic loader or libc.
        .args(["-C", "target-feature=+crt-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .await
        .map_err(|source| TestImageError::Spawn {
            program: rustc.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestImageError::Compile {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(bin)
}

/// Makes sure [`TEST_IMAGE`] exists on the engine `driver` talks to, building it if it
/// is missing or stale. Returns the image reference.
pub async fn ensure_test_image(driver: &DockerDriver) -> Result<&'static str, TestImageError> {
    // Tests run in parallel; one build is enough and concurrent tags would race.
    static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = BUILD.lock().await;
    let hash = source_hash();
    let docker = driver.client();
    if let Ok(img) = docker.inspect_image(TEST_IMAGE).await {
        let current = img
            .config
            .and_then(|c| c.labels)
            .and_then(|l| l.get(SOURCE_LABEL).cloned());
        if current.as_deref() == Some(hash.as_str()) {
            return Ok(TEST_IMAGE);
        }
    }

    let dir = std::env::temp_dir().join(format!("shoal-test-http-{}-{hash}", std::process::id()));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|source| TestImageError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
    let result = build_in(driver, &dir, &hash).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn build_in(
    driver: &DockerDriver,
    dir: &Path,
    hash: &str,
) -> Result<&'static str, TestImageError> {
    let bin = compile_test_server(dir).await?;
    let binary = tokio::fs::read(&bin)
        .await
        .map_err(|source| TestImageError::Io {
            what: "read",
            path: bin.clone(),
            source,
        })?;
    let dockerfile = format!(
        "FROM scratch\nCOPY shoal-test-http /shoal-test-http\nEXPOSE {SERVER_DEFAULT_PORT}\n\
         LABEL {SOURCE_LABEL}={hash}\nENTRYPOINT [\"/shoal-test-http\"]\n"
    );
    build_image(
        driver,
        TEST_IMAGE,
        &dockerfile,
        &[("shoal-test-http", 0o755, &binary)],
    )
    .await?;
    if !driver.has_image(TEST_IMAGE).await? {
        return Err(TestImageError::Build {
            image: TEST_IMAGE.into(),
            message: "the build finished but the image is not there".into(),
        });
    }
    Ok(TEST_IMAGE)
}

/// Builds `tag` on the engine `driver` talks to from a Dockerfile and context files
/// (`(name, mode, bytes)`), with the classic builder (no network needed for images
/// built `FROM scratch` or from local images).
pub async fn build_image(
    driver: &DockerDriver,
    tag: &str,
    dockerfile: &str,
    files: &[(&str, u32, &[u8])],
) -> Result<(), TestImageError> {
    let mut context = Vec::new();
    tar_entry(&mut context, "Dockerfile", 0o644, dockerfile.as_bytes());
    for (name, mode, data) in files {
        tar_entry(&mut context, name, *mode, data);
    }
    context.extend_from_slice(&[0u8; 1024]); // end-of-archive marker
    let opts = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(tag.into()),
        rm: true,
        forcerm: true,
        // The classic builder: BuildKit would need a session this client does not run.
        version: BuilderVersion::BuilderV1,
        ..Default::default()
    };
    let mut stream = driver.client().build_image(
        opts,
        None,
        Some(bollard::body_full(bytes::Bytes::from(context))),
    );
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| TestImageError::Build {
            image: tag.into(),
            message: e.to_string(),
        })?;
        if let Some(detail) = info.error_detail {
            return Err(TestImageError::Build {
                image: tag.into(),
                message: detail.message.unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// Appends one regular file to a ustar archive (names under 100 bytes).
fn tar_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    fn octal(field: &mut [u8], value: u64) {
        let s = format!("{:0width$o}\0", value, width = field.len() - 1);
        field.copy_from_slice(s.as_bytes());
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], data.len() as u64);
    octal(&mut h[136..148], 0); // mtime
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field read as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

pub use crate::scratch::Engine;
