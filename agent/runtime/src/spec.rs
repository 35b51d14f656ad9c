//! What a driver is asked to run, and what it reports back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::DriverError;

/// What to run for one allocation slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Service name (letters, digits, `_`, `.`, `-`; it becomes part of a container name).
    pub service: String,
    /// Slot number within the service.
    pub slot: u32,
    /// Version of the service spec this workload runs.
    pub version: u64,
    /// Unique per (service, slot, version, node); letters, digits, `_`, `.`, `-`.
    pub alloc_id: String,
    /// Container image or command line.
    pub kind: WorkloadKind,
    /// Environment variables given to the workload (and nothing of the agent's own,
    /// except `PATH` for processes).
    pub env: BTreeMap<String, String>,
    /// Ports the workload listens on.
    pub ports: Vec<PortSpec>,
    /// CPU limit in thousandths of a core (`500` = half a core); enforced by docker only.
    pub cpu_millis: Option<u64>,
    /// Memory limit in bytes; enforced by docker only.
    pub memory_bytes: Option<u64>,
    /// Extra labels; keys starting with `shoal.` are reserved for the driver.
    pub labels: BTreeMap<String, String>,
}

/// How a workload is run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// A container from an image already present on this node.
    Docker {
        /// Image reference, e.g. `web:1.4`.
        image: String,
        /// Run in the host's network namespace (`--network host`): no port mapping;
        /// each port is a host port the driver picks (or the fixed `host_port`),
        /// passed as `PORT_<NAME>` and `PORT` for the workload to listen on.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        host_network: bool,
    },
    /// A program and its arguments, run without a shell.
    Process {
        /// `command[0]` is the program (looked up in `PATH`), the rest its arguments.
        command: Vec<String>,
    },
}

/// One port a workload listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Name the port is reported under (and `PORT_<NAME>` for processes).
    pub name: String,
    /// Port inside the container; processes listen on the host port instead.
    pub container_port: u16,
    /// Port on the host; `None` picks a free one.
    pub host_port: Option<u16>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a port.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The name Docker uses (`tcp`, `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Parses `tcp` or `udp`.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// A workload as the driver reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// The allocation this workload runs.
    pub alloc_id: String,
    /// Service name.
    pub service: String,
    /// Slot number.
    pub slot: u32,
    /// Service spec version.
    pub version: u64,
    /// Container id (docker), pid (process) or a fake id (mem).
    pub handle: String,
    /// Where the workload is in its life.
    pub state: RunState,
    /// `(port name, host port)` for every port bound on the host.
    pub ports: Vec<(String, u16)>,
    /// When it was started, milliseconds since the Unix epoch (0 if never).
    pub started_at_ms: u64,
}

/// Where a workload is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created but not (yet) running.
    Starting,
    /// Running.
    Running,
    /// Ended by itself; the exit code when the driver could learn it.
    Exited {
        /// Exit status, or `None` when unknown (e.g. a process adopted after a restart).
        code: Option<i32>,
    },
    /// Ended abnormally (killed by a signal, out of memory, runtime error).
    Failed {
        /// What happened, for people.
        reason: String,
    },
}

impl RunState {
    /// True while the workload is (or is about to be) running.
    pub fn is_live(&self) -> bool {
        matches!(self, RunState::Starting | RunState::Running)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Starting => f.write_str("starting"),
            RunState::Running => f.write_str("running"),
            RunState::Exited { code: Some(c) } => write!(f, "exited ({c})"),
            RunState::Exited { code: None } => f.write_str("exited"),
            RunState::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Resource use of one workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU use in percent of one core (200.0 = two full cores), averaged since the
    /// previous `usage` call for this workload, or since its start on the first call.
    pub cpu_percent: f64,
    /// Resident memory in bytes.
    pub memory_bytes: u64,
}

/// Reserved label prefix; see [`crate::labels`].
pub(crate) const RESERVED_LABEL_PREFIX: &str = "shoal.";

/// True for names made of ASCII letters, digits, `_`, `.`, `-` that do not start with
/// `.` or `-` (safe as a file name and inside a container name).
pub(crate) fn is_safe_name(s: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks that `alloc_id` can name files and containers.
pub(crate) fn check_alloc_id(alloc_id: &str) -> Result<(), DriverError> {
    if is_safe_name(alloc_id, 128) {
        Ok(())
    } else {
        Err(DriverError::InvalidSpec {
            alloc_id: alloc_id.to_string(),
            reason: "alloc_id must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'".into(),
        })
    }
}

/// The environment variable that carries a port's host port: `PORT_` + the name in
/// upper case, with anything not a letter or digit turned into `_`.
pub fn port_env_name(port_name: &str) -> String {
    let mut s = String::from("PORT_");
    s.extend(port_name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

impl WorkloadSpec {
    /// Checks everything a driver relies on; a bad spec is an error, never a panic.
    pub fn validate(&self) -> Result<(), DriverError> {
        let bad = |reason: String| DriverError::InvalidSpec {
            alloc_id: self.alloc_id.clone(),
            reason,
        };
        check_alloc_id(&self.alloc_id)?;
        if !is_safe_name(&self.service, 63) {
            return Err(bad(format!(
                "service name {:?} must be 1-63 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                self.service
            )));
        }
        match &self.kind {
            WorkloadKind::Docker { image, .. } => {
                if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad(format!(
                        "image reference {image:?} is empty or has blanks"
                    )));
                }
            }
            WorkloadKind::Process { command } => {
                match command.first() {
                    None => return Err(bad("command is empty".into())),
                    Some(p) if p.is_empty() => return Err(bad("program name is empty".into())),
                    Some(_) => {}
                }
                if command.iter().any(|a| a.contains('\0')) {
                    return Err(bad("command contains a NUL byte".into()));
                }
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(bad(format!(
                    "environment variable {k:?} must be non-empty without '=' or NUL"
                )));
            }
        }
        let mut names = BTreeSet::new();
        let mut host_ports = BTreeSet::new();
        for p in &self.ports {
            if !is_safe_name(&p.name, 63) {
                return Err(bad(format!(
                    "port name {:?} must be 1-63 of [A-Za-z0-9_.-]",
                    p.name
                )));
            }
            if !names.insert(p.name.as_str()) {
                return Err(bad(format!("port name {:?} is used twice", p.name)));
            }
            if p.container_port == 0 {
                return Err(bad(format!(
                    "port {:?}: container_port 0 is not a port",
                    p.name
                )));
            }
            match p.host_port {
                Some(0) => {
                    return Err(bad(format!(
                        "port {:?}: host_port 0 is not a port (leave it out for a dynamic one)",
                        p.name
                    )))
                }
                Some(h) if !host_ports.insert((h, p.protocol)) => {
                    return Err(bad(format!(
                        "host port {h}/{} is used twice",
                        p.protocol.as_str()
                    )))
                }
                _ => {}
            }
        }
        if self.cpu_millis == Some(0) {
            return Err(bad(
                "cpu_millis 0 would never run (leave it out for no limit)".into(),
            ));
        }
        if self.memory_bytes == Some(0) {
            return Err(bad(
                "memory_bytes 0 would never run (leave it out for no limit)".into(),
            ));
        }
        for k in self.labels.keys() {
            if k.starts_with(RESERVED_LABEL_PREFIX) {
                return Err(bad(format!("label {k:?}: the prefix 'shoal.' is reserved")));
            }
            if k.is_empty() || k.contains('\0') {
                return Err(bad("label keys must be non-empty without NUL".into()));
            }
        }
        Ok(())
    }
}

/// The last `n` lines of `buf` (a final line without `\n` counts as a line).
pub fn tail_lines(buf: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &buf[buf.len()..];
    }
    // A trailing newline ends the last line; it does not start an empty one.
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &buf[i + 1..];
            }
        }
    }
    buf
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid process spec for tests.
    pub(crate) fn spec(alloc: &str, command: &[&str]) -> WorkloadSpec {
        WorkloadSpec {
            service: "web".into(),
            slot: 0,
            version: 1,
            alloc_id: alloc.into(),
            kind: WorkloadKind::Process {
                command: command.iter().map(|s| s.to_string()).collect(),
            },
            env: BTreeMap::new(),
            ports: vec![],
            cpu_millis: None,
            memory_bytes: None,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn validate_rejects_what_drivers_cannot_use() {
        assert!(spec("a1", &["true"]).validate().is_ok());
        type Mutation = Box<dyn Fn(&mut WorkloadSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("alloc", Box::new(|s| s.alloc_id = "../etc".into())),
            ("alloc", Box::new(|s| s.alloc_id = String::new())),
            ("service", Box::new(|s| s.service = "a b".into())),
            (
                "empty",
                Box::new(|s| s.kind = WorkloadKind::Process { command: vec![] }),
            ),
            (
                "image",
                Box::new(|s| {
                    s.kind = WorkloadKind::Docker {
                        image: " ".into(),
                        host_network: false,
                    }
                }),
            ),
            (
                "env",
                Box::new(|s| {
                    s.env.insert("A=B".into(), "x".into());
                }),
            ),
            (
                "reserved",
                Box::new(|s| {
                    s.labels.insert("shoal.node".into(), "x".into());
                }),
            ),
            (
                "twice",
                Box::new(|s| {
                    let p = PortSpec {
                        name: "http".into(),
                        container_port: 80,
                        host_port: None,
                        protocol: Protocol::Tcp,
                    };
                    s.ports = vec![p.clone(), p];
                }),
            ),
            (
                "host_port 0",
                Box::new(|s| {
                    s.ports = vec![PortSpec {
                        name: "http".into(),
                        container_port: 80,
                        host_port: Some(0),
                        protocol: Protocol::Tcp,
                    }];
                }),
            ),
            ("cpu", Box::new(|s| s.cpu_millis = Some(0))),
        ];
        for (what, mutate) in cases {
            let mut s = spec("a1", &["true"]);
            mutate(&mut s);
            let err = s.validate().expect_err(what);
            assert!(
                matches!(err, DriverError::InvalidSpec { .. }),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn tail_counts_lines_from_the_end() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_lines(b"a\nb\n", 0), b"");
        assert_eq!(tail_lines(b"", 3), b"");
    }

    #[test]
    fn port_env_names_are_shell_safe() {
        assert_eq!(port_env_name("http"), "PORT_HTTP");
        assert_eq!(port_env_name("admin-api.v2"), "PORT_ADMIN_API_V2");
    }
}
