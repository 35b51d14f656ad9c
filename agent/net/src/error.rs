use std::path::PathBuf;

/// Everything that can go wrong in certificate handling or endpoint setup.
///
/// Runtime failures of individual sends and connections are not errors of the API:
/// they are counted in [`crate::NetStats`] and logged, because the caller (gossip,
/// replication) treats the network as lossy anyway.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Reading or writing a file failed; nothing after the failing step was done.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file held no (or no valid) item of the expected kind.
    #[error("{}: no valid PEM {what} found", path.display())]
    Pem {
        /// The file that was read.
        path: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
    },
    /// A certificate could not be generated, parsed or verified.
    #[error("certificate: {0}")]
    Cert(String),
    /// The TLS or QUIC configuration could not be built from the identity.
    #[error("tls: {0}")]
    Tls(String),
    /// A [`crate::NetConfig`] value is out of range.
    #[error("config: {0}")]
    Config(String),
    /// The UDP socket could not be bound or no tokio runtime was running.
    #[error("bind: {0}")]
    Bind(String),
    /// A file that would have been overwritten exists; nothing was written.
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    AlreadyExists(PathBuf),
    /// The certificate carries neither a DNS subject alternative name nor a common name.
    #[error("certificate has no name (neither a DNS subject alternative name nor a common name)")]
    NoName,
    /// A node name is empty, longer than 63 characters or uses characters outside `[a-zA-Z0-9-_.]`.
    #[error(
        "invalid node name {0:?}: expected 1 to 63 characters of a-z, A-Z, 0-9, '-', '_', '.'"
    )]
    InvalidName(String),
}
