//! Workload log files on disk: reads with bounded memory, and rotation at a size cap.
//!
//! A process workload writes its stdout and stderr straight into one file (the
//! file is its file descriptor, so it keeps writing while the agent restarts).
//! Reads never load the whole file: a tail is read backwards from the end in
//! growing chunks, a read from an offset stops after [`LogQuery::limit`] bytes and
//! says whether more follows.
//!
//! Rotation is copy-then-truncate (logrotate's `copytruncate`), because the writer
//! holds the file open and cannot be told to reopen it: once the file passes
//! [`LogPolicy::max_bytes`], `<log>.1 … <log>.(n-2)` shift by one, the file is
//! copied to `<log>.1` and truncated to zero; the workload opened it with
//! `O_APPEND`, so it goes on writing at the new end. Lines written between the copy
//! and the truncation (a few microseconds) are lost. Offsets handed to readers are
//! *logical*: bytes ever written to the current file since the agent started
//! watching it, so a follower's offset stays meaningful across rotations.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Most bytes one log read returns; ask again from `next_offset` for more.
pub const MAX_LOG_CHUNK: usize = 1 << 20;

/// When a workload's log is rotated and how many files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPolicy {
    /// Size at which the current file is rotated.
    pub max_bytes: u64,
    /// Files kept, the current one included (at least 1: then the file is only
    /// truncated).
    pub max_files: u32,
}

impl Default for LogPolicy {
    /// 10 MiB per file, 3 files (like Docker's `json-file` settings shoal uses).
    fn default() -> Self {
        LogPolicy {
            max_bytes: 10 << 20,
            max_files: 3,
        }
    }
}

/// Which part of a workload's log to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogQuery {
    /// Only the last `tail` lines (ignored when `offset` is given).
    pub tail: Option<usize>,
    /// From this logical offset (a `next_offset` of an earlier read).
    pub offset: Option<u64>,
    /// Most bytes to return (capped at [`MAX_LOG_CHUNK`]).
    pub limit: usize,
}

impl LogQuery {
    /// The log from its start (up to the limit).
    pub fn all() -> LogQuery {
        LogQuery {
            tail: None,
            offset: None,
            limit: MAX_LOG_CHUNK,
        }
    }

    /// The last `n` lines.
    pub fn tail(n: usize) -> LogQuery {
        LogQuery {
            tail: Some(n),
            ..LogQuery::all()
        }
    }

    /// What follows `offset`.
    pub fn from(offset: u64) -> LogQuery {
        LogQuery {
            offset: Some(offset),
            ..LogQuery::all()
        }
    }

    fn limit(&self) -> usize {
        self.limit.clamp(1, MAX_LOG_CHUNK)
    }
}

/// A piece of a workload's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    /// The bytes, stdout and stderr interleaved.
    pub bytes: Vec<u8>,
    /// Logical offset right after `bytes`: pass it as [`LogQuery::offset`] to continue.
    pub next_offset: u64,
    /// More bytes follow (the read stopped at its limit).
    pub more: bool,
}

/// Reads from the log at `path`, whose first byte is at logical offset `base`.
pub(crate) fn read(path: &Path, base: u64, q: LogQuery) -> io::Result<LogChunk> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(LogChunk {
                next_offset: base,
                ..LogChunk::default()
            })
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let limit = q.limit();
    match (q.offset, q.tail) {
        (None, Some(n)) => {
            let bytes = tail(&mut f, len, n, limit)?;
            Ok(LogChunk {
                bytes,
                next_offset: base + len,
                more: false,
            })
        }
        (offset, _) => {
            // An offset from before a rotation (or from an earlier agent, whose
            // offsets count from another base) starts at what is still there.
            let start = match offset {
                Some(o) if o >= base && o - base <= len => o - base,
                _ => 0,
            };
            f.seek(SeekFrom::Start(start))?;
            let want = (len - start).min(limit as u64);
            let mut bytes = Vec::with_capacity(want as usize);
            (&mut f).take(want).read_to_end(&mut bytes)?;
            if start + (bytes.len() as u64) < len {
                // Pages end on line boundaries (unless one line is longer than a page).
                if let Some(last) = bytes.iter().rposition(|b| *b == b'\n') {
                    bytes.truncate(last + 1);
                }
            }
            let end = start + bytes.len() as u64;
            Ok(LogChunk {
                bytes,
                next_offset: base + end,
                more: end < len,
            })
        }
    }
}

/// The last `n` lines of the first `len` bytes of `f`, reading at most about
/// `limit` bytes from the end (a longer tail is cut to whole lines within it).
fn tail(f: &mut File, len: u64, n: usize, limit: usize) -> io::Result<Vec<u8>> {
    if n == 0 || len == 0 {
        return Ok(Vec::new());
    }
    let mut chunk: u64 = 64 << 10;
    loop {
        let span = chunk.min(len).min(limit as u64);
        let start = len - span;
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity(span as usize);
        (&mut *f).take(span).read_to_end(&mut buf)?;
        let newlines = buf.iter().filter(|b| **b == b'\n').count();
        // One more newline than lines wanted guarantees the first line is whole.
        if start == 0 || newlines > n {
            return Ok(crate::spec::tail_lines(&buf, n).to_vec());
        }
        if span >= limit as u64 {
            // The tail is longer than a read may be: drop the partial first line.
            let cut = buf.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
            return Ok(buf.split_off(cut));
        }
        chunk = chunk.saturating_mul(4);
    }
}

/// Path of rotated file `i` (1 = newest) of the log at `path`.
pub(crate) fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// Rotates the log at `path` if it has reached the policy's size; returns the
/// number of bytes moved out of the current file (0 if nothing was done).
pub(crate) fn rotate_if_needed(path: &Path, policy: LogPolicy) -> io::Result<u64> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if len < policy.max_bytes.max(1) {
        return Ok(0);
    }
    let keep = policy.max_files.max(1) - 1;
    if keep > 0 {
        // Shift older copies up; the oldest falls off.
        let _ = fs::remove_file(rotated(path, keep));
        for i in (1..keep).rev() {
            match fs::rename(rotated(path, i), rotated(path, i + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let mut src = File::open(path)?;
        let mut dst = File::create(rotated(path, 1))?;
        io::copy(&mut (&mut src).take(len), &mut dst)?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(len)
}

/// Removes the rotated copies of the log at `path` (the current file is left).
pub(crate) fn remove_rotated(path: &Path, policy: LogPolicy) {
    for i in 1..policy.max_files.max(2) {
        let _ = fs::remove_file(rotated(path, i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn log_with(lines: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.log");
        let mut f = File::create(&path).expect("create");
        for i in 0..lines {
            writeln!(f, "line {i}").expect("write");
        }
        (dir, path)
    }

    #[test]
    fn tails_and_pages_with_bounded_reads() {
        let (_d, path) = log_with(100_000);
        let len = fs::metadata(&path).unwrap().len();
        let t = read(&path, 0, LogQuery::tail(2)).unwrap();
        assert_eq!(t.bytes, b"line 99998\nline 99999\n");
        assert_eq!(t.next_offset, len);
        // Pages of 1000 bytes add up to the whole file.
        let mut offset = 0;
        let mut all = Vec::new();
        loop {
            let c = read(
                &path,
                0,
                LogQuery {
                    limit: 1000,
                    ..LogQuery::from(offset)
                },
            )
            .unwrap();
            assert!(c.bytes.len() <= 1000);
            all.extend_from_slice(&c.bytes);
            offset = c.next_offset;
            if !c.more {
                break;
            }
        }
        assert_eq!(all, fs::read(&path).unwrap());
        // A tail longer than the limit is cut to whole lines within it.
        let big = read(
            &path,
            0,
            LogQuery {
                limit: 100,
                ..LogQuery::tail(50_000)
            },
        )
        .unwrap();
        assert!(big.bytes.len() <= 100 && big.bytes.starts_with(b"line "));
        assert!(big.bytes.ends_with(b"line 99999\n"));
        // Missing file: empty, not an error.
        let none = read(&path.with_extension("x"), 5, LogQuery::all()).unwrap();
        assert_eq!((none.bytes.len(), none.next_offset), (0, 5));
    }

    #[test]
    fn rotation_keeps_the_cap_and_offsets_stay_logical() {
        let (_d, path) = log_with(2000);
        let policy = LogPolicy {
            max_bytes: 1000,
            max_files: 3,
        };
        let len = fs::metadata(&path).unwrap().len();
        assert_eq!(rotate_if_needed(&path, policy).unwrap(), len);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(fs::metadata(rotated(&path, 1)).unwrap().len(), len);
        // Small again: nothing to do.
        assert_eq!(rotate_if_needed(&path, policy).unwrap(), 0);
        for round in 0..4u64 {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&vec![b'x'; 1500]).unwrap();
            assert_eq!(
                rotate_if_needed(&path, policy).unwrap(),
                1500,
                "round {round}"
            );
        }
        assert!(rotated(&path, 2).exists());
        assert!(
            !rotated(&path, 3).exists(),
            "only max_files - 1 copies kept"
        );
        // A follower's offset from before the rotation restarts at what is left.
        let base = 5000;
        let c = read(&path, base, LogQuery::from(10)).unwrap();
        assert_eq!((c.bytes.len(), c.next_offset), (0, base));
        remove_rotated(&path, policy);
        assert!(!rotated(&path, 1).exists());
    }
}
