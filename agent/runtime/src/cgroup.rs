//! Containment of process workloads in cgroups (v1 hierarchies, as on hosts with a
//! legacy or hybrid cgroup layout), where the host allows it.
//!
//! Each workload gets a cgroup named after the driver's state directory and its
//! alloc id in the `pids` and `memory` hierarchies. The child joins
//! them between fork and exec, so every descendant is inside, including one that
//! calls `setsid` to leave the workload's process group: stopping the workload kills
//! whatever is in its cgroup. `memory` becomes the memory limit. The `cpu`
//! reservation is not enforced: a hard quota throttled replicas below what their
//! scaler measures, and `cpu.shares` starved them under load. Without a writable
//! v1 hierarchy (a cgroup v2-only host, no root) workloads are contained by their
//! process group alone, as before.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The v1 hierarchies used, and the directory under each for this driver.
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    /// `(controller, <mount>/<scope>)`.
    roots: Vec<(&'static str, PathBuf)>,
}

/// One workload's cgroups, with the `cgroup.procs` paths its child writes itself
/// into (prepared before fork: nothing is allocated in the child).
pub(crate) struct Joined {
    procs: Vec<CString>,
}

impl Joined {
    /// In the child, after fork, before exec: moves the calling process into every
    /// cgroup. Only async-signal-safe calls.
    pub fn join_self(&self) -> std::io::Result<()> {
        for p in &self.procs {
            // SAFETY: open/write/close on a NUL-terminated path prepared before fork.
            unsafe {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

fn mounts() -> Vec<(PathBuf, Vec<String>)> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[2] == "cgroup").then(|| {
                (
                    PathBuf::from(f[1]),
                    f[3].split(',').map(str::to_string).collect(),
                )
            })
        })
        .collect()
}

impl Cgroups {
    /// Finds writable v1 hierarchies; `scope` names this driver's directory in each
    /// (so agents sharing a host keep apart). `None` when there is none to use.
    pub fn detect(scope: &str) -> Option<Cgroups> {
        let mut roots = Vec::new();
        for controller in ["pids", "memory"] {
            let Some((mount, _)) = mounts()
                .into_iter()
                .find(|(_, opts)| opts.iter().any(|o| o == controller))
            else {
                continue;
            };
            // Under the agent's own cgroup, so workloads stay inside whatever
            // limits and accounting the agent itself is under.
            let own = own_path(controller).unwrap_or_default();
            let root = mount.join(own.trim_start_matches('/')).join(scope);
            if std::fs::create_dir_all(&root).is_ok() && root.join("cgroup.procs").exists() {
                roots.push((controller, root));
            }
        }
        // Without `pids` (or another hierarchy every process is in) the workload's
        // members cannot be listed: not worth the complexity of a partial setup.
        if !roots.iter().any(|(c, _)| *c == "pids") {
            return None;
        }
        // Empty cgroups of workloads that ended while no driver watched (killed
        // with their agent's host, say) go; live ones stay for adoption.
        for (_, root) in &roots {
            if let Ok(dir) = std::fs::read_dir(root) {
                for e in dir.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
        }
        Some(Cgroups { roots })
    }

    fn dirs(&self, alloc_id: &str) -> Vec<(&'static str, PathBuf)> {
        self.roots
            .iter()
            .map(|(c, root)| (*c, root.join(alloc_id)))
            .collect()
    }

    /// Creates the workload's cgroups with its limits and returns what its child
    /// needs to join them.
    pub fn prepare(&self, alloc_id: &str, memory_bytes: Option<u64>) -> std::io::Result<Joined> {
        let mut procs = Vec::new();
        for (controller, dir) in self.dirs(alloc_id) {
            // create_dir_all: this driver's directory may have gone with its last workload.
            std::fs::create_dir_all(&dir)?;
            if controller == "memory" {
                let limit = memory_bytes.map_or("-1".to_string(), |b| b.to_string());
                std::fs::write(dir.join("memory.limit_in_bytes"), limit)?;
            }
            let p = dir.join("cgroup.procs");
            procs.push(
                CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            );
        }
        Ok(Joined { procs })
    }

    /// Every live process in the workload's cgroup (zombies waiting to be reaped do
    /// not count; empty when it has none).
    pub fn members(&self, alloc_id: &str) -> Vec<i32> {
        let Some((_, dir)) = self.dirs(alloc_id).into_iter().find(|(c, _)| *c == "pids") else {
            return Vec::new();
        };
        read_pids(&dir.join("cgroup.procs"))
            .into_iter()
            .filter(|pid| crate::procfs::read_stat(*pid).is_some_and(|st| st.state != b'Z'))
            .collect()
    }

    /// Sends `sig` to every process in the workload's cgroup.
    pub fn signal(&self, alloc_id: &str, sig: libc::c_int) {
        for pid in self.members(alloc_id) {
            // SAFETY: a plain kill(2) of a pid the kernel lists in our cgroup.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Removes the workload's cgroups (they must be empty), and this driver's
    /// directory when no other workload has one (it is made again when needed).
    pub fn remove(&self, alloc_id: &str) {
        for (_, dir) in self.dirs(alloc_id) {
            let _ = std::fs::remove_dir(&dir);
        }
        for (_, root) in &self.roots {
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// The calling process's cgroup path in the v1 hierarchy of `controller`.
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
