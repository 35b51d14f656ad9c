//! The few facts about processes the process driver reads from Linux's `/proc`.

use std::fs;
use std::io;

/// Fields of `/proc/<pid>/stat` the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    /// One-letter state; `Z` is a zombie (exited, not yet reaped).
    pub state: u8,
    pub ppid: i32,
    pub pgrp: i32,
    /// utime + stime + cutime + cstime, in clock ticks. Including the children's times
    /// keeps the group's total from dropping when a member reaps a child.
    pub cpu_ticks: u64,
    /// Start time in clock ticks after boot: with the pid, identifies a process across
    /// pid reuse.
    pub start_ticks: u64,
}

impl ProcStat {
    /// True unless the process has exited (zombie or dead).
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses the content of `/proc/<pid>/stat`.
pub(crate) fn parse_stat(s: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may itself contain spaces and
    // parentheses, so fields are counted from the last ')'.
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let pid = s[..open].trim().parse().ok()?;
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let field = |i: usize| rest.get(i).and_then(|f| f.parse::<u64>().ok());
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let state = *rest.first()?.as_bytes().first()?;
    Some(ProcStat {
        pid,
        state,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        cpu_ticks: field(11)? + field(12)? + field(13)? + field(14)?,
        start_ticks: field(19)?,
    })
}

/// Reads `/proc/<pid>/stat`; `None` if there is no such process.
pub(crate) fn read_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

/// Resident set size of one process in bytes.
pub(crate) fn rss_bytes(pid: i32, page_size: u64) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident * page_size)
}

/// Every process: the stat of each pid in `/proc`. Processes come and go during
/// the scan; a vanished one is simply not listed.
pub(crate) fn all_processes() -> io::Result<impl Iterator<Item = ProcStat>> {
    Ok(fs::read_dir("/proc")?.flatten().filter_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
        read_stat(pid)
    }))
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub(crate) fn group_members(pgid: i32) -> io::Result<Vec<ProcStat>> {
    Ok(all_processes()?
        .filter(|st| st.pgrp == pgid && st.is_alive())
        .collect())
}

/// This boot's id; pids and start times are only comparable within one boot.
pub(crate) fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Seconds since boot.
pub(crate) fn uptime_secs() -> Option<f64> {
    fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of `/proc/<pid>/stat` times.
pub(crate) fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// Memory page size in bytes, the unit of `/proc/<pid>/statm`.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (we ird) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 123456 1000 50 18446744073709551615";
        let st = parse_stat(line).expect("parses");
        assert_eq!(st.pid, 4242);
        assert_eq!(st.state, b'S');
        assert_eq!(st.ppid, 1);
        assert_eq!(st.pgrp, 4242);
        assert_eq!(st.cpu_ticks, 13);
        assert_eq!(st.start_ticks, 123456);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 1").is_none());
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let st = read_stat(me).expect("own stat");
        assert_eq!(st.pid, me);
        assert!(st.is_alive());
        assert!(rss_bytes(me, page_size()).unwrap_or(0) > 0);
    }
}
