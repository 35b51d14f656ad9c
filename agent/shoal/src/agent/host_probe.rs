//! Real host readings (CPU count, memory, disk free) for node-owned state.
//!
//! Reading them (sysinfo: `/proc/meminfo`, `statfs` of every mount) is slow enough
//! that it never runs on the agent loop: [`run`] is a task of its own that reads
//! every interval on a blocking thread and sends each reading to the loop, which
//! decides whether it is worth gossiping ([`Resources::differs`]).

use std::path::{Path, PathBuf};

use sysinfo::{Disks, System};

pub use shoal_api::Resources;

/// Reads host resources; keeps sysinfo's handles between readings.
pub struct HostProbe {
    sys: System,
    disks: Disks,
    data_dir: PathBuf,
}

impl HostProbe {
    /// A probe for the disk that holds `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        HostProbe {
            sys: System::new(),
            disks: Disks::new_with_refreshed_list(),
            data_dir: data_dir
                .canonicalize()
                .unwrap_or_else(|_| data_dir.to_path_buf()),
        }
    }

    /// Takes a fresh reading.
    pub fn read(&mut self) -> Resources {
        self.sys.refresh_memory();
        self.disks.refresh(true);
        // The disk whose mount point is the longest prefix of the data dir.
        let disk_free_bytes = self
            .disks
            .list()
            .iter()
            .filter(|d| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map_or(0, |d| d.available_space());
        Resources {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: self.sys.total_memory(),
            memory_free_bytes: self.sys.available_memory(),
            disk_free_bytes,
        }
    }
}

/// Reads the host every `every` (the first reading at once) and sends it on `tx`,
/// until `stop` is cancelled or the receiver is gone.
pub async fn run(
    mut probe: HostProbe,
    every: std::time::Duration,
    tx: tokio::sync::mpsc::Sender<Resources>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok((p, reading)) = tokio::task::spawn_blocking(move || {
            let r = probe.read();
            (probe, r)
        })
        .await
        else {
            return;
        };
        probe = p;
        if tx.send(reading).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_real_host() {
        let dir = tempfile::tempdir().unwrap();
        let r = HostProbe::new(dir.path()).read();
        assert!(r.cpus >= 1);
        assert!(r.memory_bytes > 0 && r.memory_free_bytes <= r.memory_bytes);
        assert!(r.disk_free_bytes > 0, "the data dir's disk was not found");
    }

    #[test]
    fn small_changes_are_not_worth_gossip() {
        let a = Resources {
            cpus: 2,
            memory_bytes: 1000,
            memory_free_bytes: 500,
            disk_free_bytes: 10_000,
        };
        assert!(!a.differs(&Resources {
            memory_free_bytes: 502,
            ..a
        }));
        assert!(a.differs(&Resources {
            memory_free_bytes: 400,
            ..a
        }));
    }
}
