//! The lab: namespaces, bridges, veths and agent processes (see the crate docs).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::delay::Delayer;

/// QUIC port every lab agent listens on (on its own address).
pub const AGENT_PORT: u16 = 7001;
/// Where each agent's HTTP API listens inside its namespace.
pub const AGENT_API: &str = "127.0.0.1:7101";
/// Prefix of every namespace a lab creates.
const NS_PREFIX: &str = "shl";
/// Labs created by this process, for unique names.
static LABS: AtomicU32 = AtomicU32::new(0);

/// How a lab is built.
#[derive(Debug, Clone, Default)]
pub struct LabConfig {
    /// Number of agents.
    pub agents: usize,
    /// The `shoal` binary to run.
    pub shoal: PathBuf,
    /// Flags added to every `shoal agent` command line.
    pub agent_args: Vec<String>,
    /// Give every agent a data dir of its own tmpfs of this many bytes, so a test
    /// can fill an agent's disk ([`Lab::fill_disk`]).
    pub data_tmpfs: Option<u64>,
}

/// A workload process of a lab agent, found on the host (see [`Lab::workloads`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Its pid.
    pub pid: i32,
    /// `SHOAL_SERVICE` of the process.
    pub service: String,
    /// `SHOAL_SLOT` of the process.
    pub slot: u32,
    /// Index of the agent whose namespace it runs in (`None`: outside the lab).
    pub agent: Option<usize>,
}

/// One agent of the lab.
#[derive(Debug)]
pub struct LabAgent {
    /// Node name (`n1`, `n2`, …).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its QUIC address (inside the lab network).
    pub addr: SocketAddr,
    /// Its data dir.
    pub data: PathBuf,
    /// Its log file (stderr of every start, appended).
    pub log: PathBuf,
    /// Extra flags for this agent only.
    pub extra: Vec<String>,
    child: Option<Child>,
}

/// An isolated network of agents (see the crate docs).
pub struct Lab {
    cfg: LabConfig,
    tag: String,
    hub: String,
    dir: tempfile::TempDir,
    ca: PathBuf,
    /// The agents, index 0 first.
    pub agents: Vec<LabAgent>,
    /// Bridges created in the hub (br0 always exists).
    bridges: usize,
    /// Delay threads, by agent index ([`Lab::set_delay`]).
    delayers: HashMap<usize, Delayer>,
}

/// Busy loops competing with an agent for its core ([`Lab::starve`]); killed on drop.
pub struct Starver {
    hogs: Vec<Child>,
}

impl Drop for Starver {
    fn drop(&mut self) {
        for h in &mut self.hogs {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// Name of the file [`Lab::fill_disk`] writes.
const FILLER: &str = "chaos-filler";

/// Runs `cmd`, failing with its stderr.
fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Deletes namespaces of labs whose creating process is gone, killing what still
/// runs in them.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        // shl-<pid>x<n>-<suffix>
        let Some(rest) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.strip_prefix('-'))
        else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            // Agents and workloads of a lab whose runner was killed still run there.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
                for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(p) = p.parse::<i32>() {
                        // SAFETY: plain syscall on a process inside a stale lab namespace.
                        unsafe {
                            libc::kill(p, libc::SIGKILL);
                        }
                    }
                }
            }
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Lab {
    /// Builds the network (no agent is started yet); needs root.
    pub fn new(cfg: LabConfig) -> anyhow::Result<Lab> {
        if cfg.agents == 0 || cfg.agents > 200 {
            bail!("a lab has 1 to 200 agents, not {}", cfg.agents);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("network namespaces need root (run the tests as root)");
        }
        remove_stale_namespaces();
        let tag = format!(
            "{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("shoal-lab-")
            .tempdir()
            .context("creating the lab dir")?;
        let ca = dir.path().join("ca");
        let out = Command::new(&cfg.shoal)
            .args(["ca", "init", "--out"])
            .arg(&ca)
            .output()
            .context("running shoal ca init")?;
        if !out.status.success() {
            bail!("shoal ca init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let hub = format!("{NS_PREFIX}-{tag}-h");
        let mut lab = Lab {
            tag,
            hub,
            ca,
            agents: Vec::new(),
            bridges: 1,
            delayers: HashMap::new(),
            dir,
            cfg,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let hub = self.hub.clone();
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..self.cfg.agents {
            let ns = format!("{NS_PREFIX}-{}-{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            let addr = Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250 + 1) as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/16"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &port, "up"])?;
            let name = format!("n{}", i + 1);
            let data = self.dir.path().join(&name);
            self.agents.push(LabAgent {
                data: data.clone(),
                log: self.dir.path().join(format!("{name}.log")),
                addr: SocketAddr::from((addr, AGENT_PORT)),
                name,
                ns,
                extra: Vec::new(),
                child: None,
            });
            // Mounted once the agent is listed, so a drop after a failure unmounts it.
            if let Some(bytes) = self.cfg.data_tmpfs {
                std::fs::create_dir_all(&data).context("creating a data dir")?;
                run_ok(
                    Command::new("mount")
                        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                        .arg(&data),
                    "mount a tmpfs data dir",
                )?;
            }
        }
        Ok(())
    }

    /// The lab's temp dir (data dirs, logs, CA).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A name unique to this lab (workloads can carry it to be found later).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The `shoal` binary the lab runs.
    pub fn shoal(&self) -> &Path {
        &self.cfg.shoal
    }

    /// Makes agent `i` drop `percent` of the packets it receives (0 stops dropping),
    /// with iptables' `statistic` match inside its namespace.
    pub fn set_loss(&self, i: usize, percent: u32) -> anyhow::Result<()> {
        let ns = &self.agents[i].ns;
        let ipt = |args: &[&str]| {
            run_ok(
                Command::new("ip")
                    .args(["netns", "exec", ns, "iptables", "-w"])
                    .args(args),
                "iptables (random loss)",
            )
        };
        ipt(&["-F", "INPUT"])?;
        if percent > 0 {
            let p = format!("{:.2}", f64::from(percent.min(100)) / 100.0);
            ipt(&[
                "-A",
                "INPUT",
                "-i",
                "eth0",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Holds every packet agent `i` receives for `delay` ± `jitter` before it
    /// reaches the agent (so packets also arrive out of order when `jitter` > 0);
    /// `delay` zero stops delaying and releases what is held. The kernel queues
    /// the packets (iptables `NFQUEUE` in the namespace's `mangle` table) to a
    /// harness thread ([`Delayer`]); `seed` draws each packet's delay.
    pub fn set_delay(
        &mut self,
        i: usize,
        delay: Duration,
        jitter: Duration,
        seed: u64,
    ) -> anyhow::Result<()> {
        let ns = self.agents[i].ns.clone();
        let ipt = |args: &[&str]| {
            run_ok(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "iptables", "-w", "-t", "mangle"])
                    .args(args),
                "iptables (delay)",
            )
        };
        // The rule goes first, so nothing is queued to a delayer that is leaving.
        ipt(&["-F", "PREROUTING"])?;
        self.delayers.remove(&i);
        if delay.is_zero() {
            return Ok(());
        }
        let d = Delayer::start(&ns, 0, delay, jitter.min(delay), seed)?;
        self.delayers.insert(i, d);
        ipt(&[
            "-A",
            "PREROUTING",
            "-i",
            "eth0",
            "-j",
            "NFQUEUE",
            "--queue-num",
            "0",
            "--queue-bypass",
        ])
    }

    /// Runs `f` on a thread inside agent `i`'s network namespace and returns what
    /// it returns: sockets it opens stay in that namespace wherever they are used.
    pub fn in_namespace<T: Send>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send,
    ) -> anyhow::Result<T> {
        let ns = &self.agents[i].ns;
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::delay::enter_netns(ns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))?
        })
    }

    /// Packets agent `i`'s current delay has held so far (0 when none is set).
    pub fn delayed_packets(&self, i: usize) -> u64 {
        self.delayers.get(&i).map_or(0, Delayer::packets)
    }

    /// Starves agent `i` of CPU: pins every thread of it to CPU 0 and starts
    /// `loops` busy loops pinned there too, until the returned guard is dropped
    /// (the agent then stays pinned; it is only ever restarted unpinned).
    pub fn starve(&self, i: usize, loops: usize) -> anyhow::Result<Starver> {
        let pid = self.agents[i]
            .child
            .as_ref()
            .map(|c| c.id())
            .with_context(|| format!("agent {} is not running", self.agents[i].name))?;
        run_ok(
            Command::new("taskset").args(["-a", "-p", "-c", "0", &pid.to_string()]),
            "taskset (pinning the agent)",
        )?;
        let mut hogs = Vec::new();
        for _ in 0..loops {
            let hog = Command::new("taskset")
                .args(["-c", "0", "sh", "-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a busy loop (taskset, util-linux)")?;
            hogs.push(hog);
        }
        Ok(Starver { hogs })
    }

    /// Fills agent `i`'s data dir (a tmpfs, see [`LabConfig::data_tmpfs`]) until
    /// writes fail for lack of space.
    pub fn fill_disk(&self, i: usize) -> anyhow::Result<()> {
        if self.cfg.data_tmpfs.is_none() {
            bail!("fill_disk needs a lab with data_tmpfs");
        }
        let mut f =
            File::create(self.agents[i].data.join(FILLER)).context("creating the filler")?;
        let chunk = vec![0xa5u8; 1 << 20];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).context("filling the data dir"),
            }
        }
        // Whatever is left below a whole chunk goes too.
        for _ in 0..4096 {
            if f.write_all(&chunk[..256]).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Removes what [`Lab::fill_disk`] wrote.
    pub fn free_disk(&self, i: usize) -> anyhow::Result<()> {
        match std::fs::remove_file(self.agents[i].data.join(FILLER)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).context("removing the filler")
            }
            _ => Ok(()),
        }
    }

    /// Every process on the host whose environment carries `SHOAL_LAB=<tag>` (the
    /// lab's workloads, when their spec sets it), with the agent whose namespace
    /// it runs in.
    pub fn workloads(&self) -> Vec<Workload> {
        let marker = format!("SHOAL_LAB={}", self.tag);
        let ns_inodes: Vec<Option<u64>> = self
            .agents
            .iter()
            .map(|a| {
                std::fs::metadata(format!("/run/netns/{}", a.ns))
                    .ok()
                    .map(|m| m.ino())
            })
            .collect();
        let Ok(proc) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in proc.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            if !vars.contains(&marker.as_bytes()) {
                continue;
            }
            let var = |name: &str| {
                vars.iter().find_map(|v| {
                    std::str::from_utf8(v)
                        .ok()?
                        .strip_prefix(name)?
                        .strip_prefix('=')
                        .map(str::to_string)
                })
            };
            let (Some(service), Some(slot)) = (var("SHOAL_SERVICE"), var("SHOAL_SLOT")) else {
                continue;
            };
            let Ok(slot) = slot.parse() else {
                continue;
            };
            let net = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .ok()
                .map(|m| m.ino());
            let agent = net.and_then(|n| ns_inodes.iter().position(|i| *i == Some(n)));
            found.push(Workload {
                pid,
                service,
                slot,
                agent,
            });
        }
        found
    }

    /// Starts (or restarts) agent `i`, joining through agent 0 (agent 0 joins nobody).
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let seed = self.agents[0].addr;
        let a = &self.agents[i];
        if a.child.is_some() {
            bail!("agent {} is already running", a.name);
        }
        let log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .context("opening the agent log")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &a.ns])
            .arg(&self.cfg.shoal)
            .args(["agent", "--name", &a.name])
            .args(["--listen", &a.addr.to_string()])
            .args(["--api", AGENT_API])
            .arg("--data-dir")
            .arg(&a.data)
            .arg("--ca-dir")
            .arg(&self.ca)
            .args(["--docker", "off"])
            .args(&self.cfg.agent_args)
            .args(&a.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if i != 0 {
            cmd.args(["--join", &seed.to_string()]);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("starting an agent")?;
        self.agents[i].child = Some(child);
        Ok(())
    }

    /// Starts every agent.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.agents.len() {
            self.start(i)?;
        }
        Ok(())
    }

    /// Sends `signal` to agent `i` (and its process group). After SIGKILL the agent
    /// is reaped and may be started again.
    pub fn signal(&mut self, i: usize, signal: i32) {
        let a = &mut self.agents[i];
        let Some(child) = a.child.as_mut() else {
            return;
        };
        let pid = child.id() as i32;
        // SAFETY: plain syscall on a process group we created.
        unsafe {
            libc::kill(-pid, signal);
        }
        if signal == libc::SIGKILL || signal == libc::SIGTERM {
            let _ = child.wait();
            a.child = None;
        }
    }

    /// Whether agent `i`'s process has exited; its exit code if so.
    pub fn exited(&mut self, i: usize) -> Option<Option<i32>> {
        let child = self.agents[i].child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => {
                self.agents[i].child = None;
                Some(st.code())
            }
            _ => None,
        }
    }

    /// Runs `shoal ARGS --api <agent i's API>` inside agent `i`'s namespace.
    pub fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.agents[i].ns])
            .arg(&self.cfg.shoal)
            .args(args)
            .args(["--api", &format!("http://{AGENT_API}")])
            .env_remove("SHOAL_API")
            .output()
            .context("running shoal in a lab namespace")
    }

    /// Like [`Lab::cli`], but kills the command after `limit` (an agent that is
    /// stopped or cut off must not hang the caller).
    pub fn cli_within(&self, i: usize, args: &[&str], limit: Duration) -> anyhow::Result<Output> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.agents[i].ns])
            .arg(&self.cfg.shoal)
            .args(args)
            .args(["--api", &format!("http://{AGENT_API}")])
            .env_remove("SHOAL_API")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running shoal in a lab namespace")?;
        let start = Instant::now();
        while child.try_wait().context("waiting for shoal")?.is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!("shoal {} got no answer within {limit:?}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().context("reading shoal's output")
    }

    /// Runs `program ARGS` inside agent `i`'s namespace (a client such as `dig` or
    /// `curl` on that machine).
    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.agents[i].ns, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in a lab namespace"))
    }

    /// Like [`Lab::cli`] with `-o json`, parsed; `None` if the command failed.
    pub fn cli_json(&self, i: usize, args: &[&str]) -> Option<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(i, &all).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Agent `i`'s Prometheus metrics page (empty if it does not answer).
    pub fn metrics(&self, i: usize) -> String {
        self.exec(i, "curl", &["-s", &format!("http://{AGENT_API}/metrics")])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// How agent `i` sees every member: (name, status).
    pub fn view(&self, i: usize) -> Option<Vec<(String, String)>> {
        let v = self.cli_json(i, &["nodes"])?;
        Some(
            v.as_array()?
                .iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("").to_string(),
                        n["status"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect(),
        )
    }

    /// Cuts the network into `groups` of agent indices: agents in different groups
    /// cannot reach each other; agents not listed share one more group.
    pub fn partition(&mut self, groups: &[Vec<usize>]) -> anyhow::Result<()> {
        let mut bridge_of = vec![groups.len(); self.agents.len()];
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                if i >= self.agents.len() {
                    bail!("no agent {i} in a lab of {}", self.agents.len());
                }
                bridge_of[i] = g;
            }
        }
        while self.bridges <= groups.len() {
            let br = format!("br{}", self.bridges);
            ip(&["-n", &self.hub, "link", "add", &br, "type", "bridge"])?;
            ip(&["-n", &self.hub, "link", "set", &br, "up"])?;
            self.bridges += 1;
        }
        for (i, b) in bridge_of.iter().enumerate() {
            self.attach(i, *b)?;
        }
        Ok(())
    }

    /// Puts every agent back on one network.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for i in 0..self.agents.len() {
            self.attach(i, 0)?;
        }
        Ok(())
    }

    /// Plugs agent `i`'s port into bridge `b` of the hub.
    fn attach(&self, i: usize, b: usize) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{i}"),
            "master",
            &format!("br{b}"),
        ])
    }

    /// Agent `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.agents[i].log).unwrap_or_default()
    }

    /// Polls `f` every 200 ms until it returns `Some`, for at most `limit`.
    pub fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Lab) -> Option<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if start.elapsed() > limit {
                bail!("timed out after {limit:?} waiting for: {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Kills the process groups of the process workloads recorded under `data`.
fn kill_workloads(data: &Path) {
    let Ok(dir) = std::fs::read_dir(data.join("workloads/allocs")) else {
        return;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let pid = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["pid"].as_i64())
            .unwrap_or(0) as i32;
        if pid > 1 {
            // SAFETY: plain syscall; the group is the workload's own.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.delayers.clear();
        for i in 0..self.agents.len() {
            self.signal(i, libc::SIGKILL);
        }
        for a in &self.agents {
            kill_workloads(&a.data);
        }
        for w in self.workloads() {
            // SAFETY: plain syscall on a process that carries this lab's tag.
            unsafe {
                libc::kill(w.pid, libc::SIGKILL);
            }
        }
        if self.cfg.data_tmpfs.is_some() {
            for a in &self.agents {
                let _ = Command::new("umount").arg("-l").arg(&a.data).output();
            }
        }
        for a in &self.agents {
            let _ = ip(&["netns", "del", &a.ns]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }
}
