//! Harness for black-box tests: real `shoal` agent processes on loopback,
//! driven and observed only through the CLI, the HTTP API and signals.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A free UDP port on 127.0.0.1 (the OS picks it; it is released before use).
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A port on 127.0.0.1 free for both UDP and TCP (for an agent's DNS).
pub fn free_dns() -> SocketAddr {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// A base port for `shoal demo --nodes n` whose ports are all free: QUIC base+i, API
/// base+100+i and DNS base+200+i. It lies below the ephemeral range (32768 and up),
/// so no port the OS hands another test lands in it while the demo starts.
pub fn free_demo_base(nodes: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const SLOTS: u16 = 40;
    let first = (std::process::id() as u16).wrapping_add(NEXT.fetch_add(7, Ordering::Relaxed));
    for k in 0..SLOTS {
        let base = 20_000 + (first.wrapping_add(k) % SLOTS) * 300;
        let free = (0..nodes).all(|i| {
            UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
                && UdpSocket::bind(("127.0.0.1", base + 200 + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + 200 + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free port range for a demo between 20000 and 32000");
}

/// Runs `shoal ARGS` to completion.
pub fn shoal(args: &[&str]) -> Output {
    Command::new(SHOAL)
        .args(args)
        .env_remove("SHOAL_API")
        .output()
        .expect("running shoal")
}

/// Stdout of a successful `shoal ARGS`; panics with stderr otherwise.
pub fn shoal_ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `limit` naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One agent process.
pub struct Agent {
    /// Node name.
    pub name: String,
    /// QUIC address.
    pub quic: SocketAddr,
    /// API address.
    pub api: SocketAddr,
    /// DNS address (UDP and TCP).
    pub dns: SocketAddr,
    /// Data directory.
    pub data: PathBuf,
    /// Extra flags given at every start.
    pub extra: Vec<String>,
    /// Seeds.
    pub join: Vec<SocketAddr>,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// `http://<api>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A set of agents sharing one CA, in a temporary directory.
pub struct Cluster {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// Node names are `<prefix><i>`.
    pub prefix: String,
    /// Whether agents may use Docker Engine (`--docker auto`); off by default, so
    /// clusters of parallel tests never see each other's containers.
    pub docker: bool,
    /// The CA directory (ca.pem, ca.key).
    pub ca: PathBuf,
    /// The agents, index 0 is the first seed.
    pub agents: Vec<Agent>,
}

impl Cluster {
    /// A CA and `n` agent definitions (not started).
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        shoal_ok(&["ca", "init", "--out", ca.to_str().unwrap()]);
        let mut c = Cluster {
            dir,
            prefix: "n".into(),
            docker: false,
            ca,
            agents: Vec::new(),
        };
        for _ in 0..n {
            c.add_agent(Vec::new());
        }
        c
    }

    /// Like [`Cluster::new`] with node names `<prefix><i>` and Docker enabled or not.
    pub fn with(n: usize, prefix: &str, docker: bool) -> Self {
        let mut c = Cluster::new(0);
        c.prefix = prefix.to_string();
        c.docker = docker;
        for _ in 0..n {
            c.add_agent(Vec::new());
        }
        c
    }

    /// Defines one more agent joining agent 0; returns its index.
    pub fn add_agent(&mut self, extra: Vec<String>) -> usize {
        let i = self.agents.len();
        let name = format!("{}{}", self.prefix, i + 1);
        let join = self
            .agents
            .first()
            .map(|a| vec![a.quic])
            .unwrap_or_default();
        self.agents.push(Agent {
            data: self.dir.path().join(&name),
            log: self.dir.path().join(format!("{name}.log")),
            name,
            quic: free_udp(),
            api: free_tcp(),
            dns: free_dns(),
            extra,
            join,
            child: None,
        });
        i
    }

    /// Starts `n` agents and waits until every one sees all `n` alive.
    pub fn start(n: usize) -> Self {
        let mut c = Cluster::new(n);
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_all_alive(Duration::from_secs(20));
        c
    }

    /// Starts (or restarts) agent `i` with its data dir.
    pub fn spawn(&mut self, i: usize) {
        let a = &self.agents[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .unwrap();
        let mut cmd = Command::new(SHOAL);
        cmd.args(["agent", "--name", &a.name])
            .args(["--listen", &a.quic.to_string()])
            .args(["--api", &a.api.to_string()])
            .args(["--dns", &a.dns.to_string()])
            .arg("--data-dir")
            .arg(&a.data)
            .arg("--ca-dir")
            .arg(&self.ca)
            .args(&a.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for j in &a.join {
            cmd.args(["--join", &j.to_string()]);
        }
        // An agent given its own engine (`--docker unix://…` in its extra flags)
        // keeps it; the others follow the cluster's setting.
        if !a.extra.iter().any(|x| x == "--docker") {
            cmd.args(["--docker", if self.docker { "auto" } else { "off" }]);
        }
        let child = cmd.spawn().expect("starting shoal agent");
        self.agents[i].child = Some(child);
        let url = self.agents[i].url();
        wait_for(
            &format!("agent {} API up", self.agents[i].name),
            Duration::from_secs(15),
            || {
                self.check_running(i);
                shoal(&["nodes", "--api", &url])
                    .status
                    .success()
                    .then_some(())
            },
        );
    }

    /// Starts agent `i` without waiting for its API (it may be meant to fail).
    pub fn spawn_detached(&mut self, i: usize) {
        let a = &self.agents[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .unwrap();
        let mut cmd = Command::new(SHOAL);
        cmd.args(["agent", "--name", &a.name])
            .args(["--listen", &a.quic.to_string()])
            .args(["--api", &a.api.to_string()])
            .args(["--dns", &a.dns.to_string()])
            .arg("--data-dir")
            .arg(&a.data)
            .arg("--ca-dir")
            .arg(&self.ca)
            .args(["--docker", if self.docker { "auto" } else { "off" }])
            .args(&a.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for j in &a.join {
            cmd.args(["--join", &j.to_string()]);
        }
        self.agents[i].child = Some(cmd.spawn().expect("starting shoal agent"));
    }

    /// Waits up to `limit` for agent `i` to exit; its exit code (None: killed by a
    /// signal). Panics if it is still running then.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<i32> {
        let name = self.agents[i].name.clone();
        let mut child = self.agents[i].child.take().expect("agent not running");
        let st = wait_for(&format!("agent {name} to exit"), limit, || {
            child.try_wait().unwrap()
        });
        st.code()
    }

    fn check_running(&mut self, i: usize) {
        if let Some(c) = self.agents[i].child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "agent {} exited with {st}; log:\n{}",
                    self.agents[i].name,
                    self.agents[i].log()
                );
            }
        }
    }

    /// SIGKILL: no goodbye.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for the process to exit; returns its exit status success.
    pub fn terminate(&mut self, i: usize) -> bool {
        let Some(mut c) = self.agents[i].child.take() else {
            return false;
        };
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        let st = wait_for("agent exit after SIGTERM", Duration::from_secs(15), || {
            c.try_wait().unwrap()
        });
        st.success()
    }

    /// `shoal nodes -o json` against agent `i`.
    pub fn nodes(&self, i: usize) -> Vec<Value> {
        let out = shoal(&["nodes", "-o", "json", "--api", &self.agents[i].url()]);
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Status of `name` as agent `i` sees it.
    pub fn status_of(&self, i: usize, name: &str) -> Option<String> {
        self.nodes(i)
            .into_iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["status"].as_str().map(str::to_string))
    }

    /// Waits until every running agent sees every running agent alive.
    pub fn wait_all_alive(&mut self, limit: Duration) {
        let running: Vec<usize> = (0..self.agents.len())
            .filter(|&i| self.agents[i].child.is_some())
            .collect();
        let names: Vec<String> = running
            .iter()
            .map(|&i| self.agents[i].name.clone())
            .collect();
        for &i in &running {
            let who = self.agents[i].name.clone();
            wait_for(&format!("{who} sees {names:?} alive"), limit, || {
                self.check_running(i);
                let nodes = self.nodes(i);
                names
                    .iter()
                    .all(|n| {
                        nodes
                            .iter()
                            .any(|v| v["name"] == *n && v["status"] == "alive")
                    })
                    .then_some(())
            });
        }
    }

    /// `shoal kv get KEY` on agent `i`: the value, or None if it failed.
    pub fn kv_get(&self, i: usize, key: &str) -> Option<String> {
        let out = shoal(&["kv", "get", key, "--api", &self.agents[i].url()]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// A metric's value on agent `i` (first line starting with `series`).
    pub fn metric(&self, i: usize, series: &str) -> Option<f64> {
        let text = http_get(self.agents[i].api, "/metrics")?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// `shoal ps <service> -o json` against agent `i` (empty if it fails).
    pub fn ps(&self, i: usize, service: &str) -> Vec<Value> {
        let out = shoal(&["ps", service, "-o", "json", "--api", &self.agents[i].url()]);
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// `shoal services -o json` against agent `i`.
    pub fn services(&self, i: usize) -> Vec<Value> {
        let out = shoal(&["services", "-o", "json", "--api", &self.agents[i].url()]);
        assert!(
            out.status.success(),
            "shoal services failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `shoal deploy <file> --wait --timeout 60` of `text` through agent `i`.
    pub fn deploy_wait(&self, i: usize, file: &str, text: &str) -> Output {
        let path = self.write_spec(file, text);
        shoal(&[
            "deploy",
            &path,
            "--wait",
            "--timeout",
            "60",
            "--api",
            &self.agents[i].url(),
        ])
    }

    /// Writes `text` as `<dir>/<file>` and returns its path.
    pub fn write_spec(&self, file: &str, text: &str) -> String {
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// The data directory root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Workloads outlive their agent by design (they are adopted on restart):
        // kill what the process drivers recorded, so no test leaves processes behind.
        for pid in workload_pids(self.dir.path()) {
            // SAFETY: kill(2) on a process group we started; no memory is touched.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Process groups recorded by every agent's process driver under `dir`.
pub fn workload_pids(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(nodes) = std::fs::read_dir(dir) else {
        return out;
    };
    for node in nodes.flatten() {
        let allocs = node.path().join("workloads/allocs");
        let Ok(files) = std::fs::read_dir(allocs) else {
            continue;
        };
        for f in files.flatten() {
            let Ok(text) = std::fs::read(f.path()) else {
                continue;
            };
            if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                if let Some(pid) = v["pid"].as_i64().filter(|p| *p > 1) {
                    out.push(pid as i32);
                }
            }
        }
    }
    out
}

/// Whether process `pid` exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A minimal HTTP/1.1 GET over a TcpStream (no client library needed in tests).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")).then(|| body.to_string())
}

/// One raw HTTP/1.1 request with exactly the given headers (a `Host` among them if
/// wanted): the status code and body. For replaying what a browser or a hostile
/// page would send.
pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}
