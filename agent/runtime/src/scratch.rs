//! Throwaway Docker Engines: an extra `dockerd` per test or benchmark, so several
//! agents on one machine each get an engine of their own (image distribution tests,
//! `shoal bench images`). Not used by the agent itself.

use std::path::PathBuf;

/// An extra Docker Engine for tests and benchmarks: its own `dockerd` with an empty config file
/// (the system `daemon.json` sets data-root and storage driver), its own data root,
/// exec root, pid file and socket, vfs storage, no iptables. Without a bridge
/// (`--bridge=none`: host or no networking) or with a Linux bridge of its own that it
/// creates, so bridge networking is tested without the host's `docker0`, which some
/// machines lack. On drop its containers are removed, the daemon is stopped, what it
/// left mounted is unmounted and its files and bridge are removed.
pub struct Engine {
    dir: PathBuf,
    child: std::process::Child,
    bridge: Option<String>,
}

impl Engine {
    /// Starts an engine without a bridge; fails (with the reason) if `dockerd` does
    /// not start and answer within 30 s.
    pub fn start() -> Result<Engine, String> {
        Engine::launch(None)
    }

    /// Starts an engine whose bridge network is a Linux bridge made for it
    /// (`172.31.<n>.1/24`), so containers get bridge networking and published ports.
    pub fn start_with_bridge() -> Result<Engine, String> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("shb{}x{n}", std::process::id() % 100_000);
        let subnet = (std::process::id() as u32 * 7 + n) % 250 + 1;
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "`ip {}` failed (needs root and iproute2)",
                args.join(" ")
            );
        };
        ip(&["link", "add", &name, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("172.31.{subnet}.1/24"),
            "dev",
            &name,
        ]);
        ip(&["link", "set", &name, "up"]);
        Engine::launch(Some(name))
    }

    fn launch(bridge: Option<String>) -> Result<Engine, String> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("shoal-engine-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let io = |what: &str, e: std::io::Error| format!("{what} under {}: {e}", dir.display());
        std::fs::create_dir_all(&dir).map_err(|e| io("creating the engine's directory", e))?;
        let empty = dir.join("empty.json");
        std::fs::write(&empty, "{}").map_err(|e| io("writing the engine's config", e))?;
        let log = std::fs::File::create(dir.join("dockerd.log"))
            .map_err(|e| io("creating its log", e))?;
        let bridge_flag = format!("--bridge={}", bridge.as_deref().unwrap_or("none"));
        let child = std::process::Command::new("dockerd")
            .arg("--config-file")
            .arg(&empty)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.join("sock").display()))
            .args([
                bridge_flag.as_str(),
                "--iptables=false",
                "--ip-masq=false",
                "--storage-driver=vfs",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting dockerd (needs dockerd on PATH and root): {e}"))?;
        let e = Engine { dir, child, bridge };
        let t0 = std::time::Instant::now();
        while !e.docker(&["version"]).status.success() {
            if t0.elapsed() > std::time::Duration::from_secs(30) {
                return Err(format!(
                    "the extra dockerd did not answer within 30 s; its log: {}",
                    std::fs::read_to_string(e.dir.join("dockerd.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(e)
    }

    /// Its socket.
    pub fn sock(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// `unix://<socket>`, for `--docker` and `docker -H`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.sock().display())
    }

    /// Runs the docker CLI against it (a CLI that cannot run is a failed output).
    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("docker")
            .arg("-H")
            .arg(self.url())
            .args(args)
            .output()
            .unwrap_or_else(|e| std::process::Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                stdout: Vec::new(),
                stderr: format!("running the docker CLI: {e}").into_bytes(),
            })
    }

    /// The id of `image` in this engine, if it has it.
    pub fn image_id(&self, image: &str) -> Option<String> {
        let out = self.docker(&["image", "inspect", "--format", "{{.Id}}", image]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Options for a driver of node `node` on this engine.
    pub fn options(&self, node: &str) -> crate::DockerOptions {
        let mut opts = crate::DockerOptions::new(node);
        opts.socket = Some(self.sock());
        opts
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        // SAFETY: a plain signal to the child we started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // dockerd leaves its network namespace mounted under the exec root.
        let root = self.dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for target in mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|t| t.starts_with(&root))
        {
            if let Ok(c) = std::ffi::CString::new(target) {
                // SAFETY: unmounting a path under our own temporary directory.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(b) = &self.bridge {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", b])
                .status();
        }
    }
}
