//! Cluster CA and node certificates (rcgen), and the node identity loaded from them.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::RootCertStore;

use crate::NetError;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node.key";

/// Both CA and node certificates: rotation is out of scope for now, so a node
/// certificate that expires before its CA would only add an outage date.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerates clocks of peers that are a little behind the issuer's.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);
const MAX_NAME_LEN: usize = 63;

/// The one crypto provider of this crate; never the process default, which the binary
/// or another library might set differently.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks a node name: it ends up in certificates, logs and state keys.
pub(crate) fn validate_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidName(name.to_string()))
    }
}

/// Creates a cluster CA in `dir`: writes `ca.pem` (self-signed CA cert) and `ca.key`
/// (PKCS#8 PEM, file mode 0600), creating `dir` if missing; refuses to overwrite either file.
pub fn init_ca(dir: &Path) -> Result<(), NetError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    refuse_existing(&[&cert_path, &key_path])?;
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "shoal cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params);
    let cert = params.self_signed(&key).map_err(cert_err)?;

    // Key first: a crash in between leaves a key without a certificate, which
    // init_ca then refuses to overwrite instead of silently replacing a CA.
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)
}

/// Issues a node certificate for `name` signed by the CA in `ca_dir`; writes
/// `<out_dir>/node.pem`, `<out_dir>/node.key` (0600) and a copy of `ca.pem`.
///
/// Refuses to overwrite an existing `node.pem` / `node.key`, or a `ca.pem` in `out_dir`
/// that differs from the CA's (that directory belongs to another cluster).
pub fn issue(ca_dir: &Path, name: &str, out_dir: &Path) -> Result<(), NetError> {
    validate_name(name)?;
    let issued = issue_in_memory(ca_dir, name)?;
    let cert_path = out_dir.join(NODE_CERT);
    let key_path = out_dir.join(NODE_KEY);
    let ca_copy = out_dir.join(CA_CERT);
    refuse_existing(&[&cert_path, &key_path])?;
    // out_dir may be ca_dir itself: compare contents rather than copying a file onto itself.
    let copy_ca = match fs::read(&ca_copy) {
        Ok(existing) if existing == issued.ca_pem.as_bytes() => false,
        Ok(_) => return Err(NetError::AlreadyExists(ca_copy)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(io_err(&ca_copy, e)),
    };
    fs::create_dir_all(out_dir).map_err(|e| io_err(out_dir, e))?;
    write_new(&key_path, issued.key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, issued.cert_pem.as_bytes(), false)?;
    if copy_ca {
        write_new(&ca_copy, issued.ca_pem.as_bytes(), false)?;
    }
    Ok(())
}

struct Issued {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
}

fn issue_in_memory(ca_dir: &Path, name: &str) -> Result<Issued, NetError> {
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(|e| io_err(&ca_cert_path, e))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(|e| io_err(&ca_key_path, e))?;
    let ca_der = read_certs(&ca_cert_path, ca_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| NetError::Pem {
            path: ca_cert_path.clone(),
            what: "certificate",
        })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| NetError::Cert(format!("{}: {e}", ca_key_path.display())))?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)
        .map_err(|e| NetError::Cert(format!("{}: {e}", ca_cert_path.display())))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    // Built by hand, not with CertificateParams::new: that turns an IP-looking name
    // into an IP SAN, and the name must come back out as a DNS SAN.
    let dns = name.try_into().map_err(cert_err)?;
    params.subject_alt_names = vec![SanType::DnsName(dns)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node is TLS server (accepting) and TLS client (dialling) on one endpoint.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    Ok(Issued {
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        key,
        ca_der,
        ca_pem,
    })
}

/// A node's TLS identity: its name (taken from its certificate), cert chain, key and the cluster CA.
pub struct Identity {
    /// The node name, read from the certificate (first DNS SAN, else CN).
    pub name: String,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) ca: CertificateDer<'static>,
}

impl Identity {
    /// Loads cert + key PEM files and the CA cert PEM; the name is read from the
    /// certificate; errors if the cert is not signed by that CA or does not match the key.
    pub fn load(cert_pem: &Path, key_pem: &Path, ca_pem: &Path) -> Result<Identity, NetError> {
        let chain = read_certs(cert_pem, &read(cert_pem)?)?;
        let ca = read_certs(ca_pem, &read(ca_pem)?)?
            .into_iter()
            .next()
            .ok_or_else(|| NetError::Pem {
                path: ca_pem.to_path_buf(),
                what: "certificate",
            })?;
        let key_bytes = read(key_pem)?;
        let key = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| NetError::Pem {
                path: key_pem.to_path_buf(),
                what: "private key",
            })?;
        Identity::new(chain, key, ca)
    }

    /// Issues a fresh certificate for `name` in memory from `ca_dir/ca.pem` +
    /// `ca_dir/ca.key` (nothing written to disk).
    pub fn self_issued(ca_dir: &Path, name: &str) -> Result<Identity, NetError> {
        validate_name(name)?;
        let issued = issue_in_memory(ca_dir, name)?;
        let key = PrivatePkcs8KeyDer::from(issued.key.serialize_der()).into();
        Identity::new(vec![issued.cert_der], key, issued.ca_der)
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<Identity, NetError> {
        let leaf = chain
            .first()
            .ok_or(NetError::Cert("empty certificate chain".into()))?;
        verify_chain(leaf, &chain[1..], &ca)?;
        let provider = provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(|e| NetError::Cert(format!("certificate and key do not match: {e}")))?;
        let name = name_from_cert(leaf)?;
        validate_name(&name)?;
        Ok(Identity {
            name,
            chain,
            key,
            ca,
        })
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Checks that `leaf` chains to `ca` and is currently valid for TLS use.
fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    ca: &CertificateDer<'static>,
) -> Result<(), NetError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| NetError::Cert(format!("CA certificate: {e}")))?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| NetError::Cert(e.to_string()))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )
    .map_err(|e| NetError::Cert(format!("not issued by this cluster CA: {e}")))
}

/// Reads the node name from a DER certificate: first DNS SAN, else the CN.
pub(crate) fn name_from_cert(der: &[u8]) -> Result<String, NetError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| NetError::Cert(format!("unparsable certificate: {e}")))?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = general {
                return Ok((*dns).to_string());
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.ok_or(NetError::NoName)
}

fn read_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| NetError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(NetError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn set_validity(params: &mut CertificateParams) {
    // rcgen exposes `time::OffsetDateTime` without re-exporting `time`; derive "now"
    // from the epoch so this crate needs no extra dependency.
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + VALIDITY;
}

fn refuse_existing(paths: &[&PathBuf]) -> Result<(), NetError> {
    for path in paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(NetError::AlreadyExists((*path).clone()));
        }
    }
    Ok(())
}

/// Writes a file that must not exist yet (create_new also closes the race with
/// another process writing the same path between our check and this write).
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), NetError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            NetError::AlreadyExists(path.to_path_buf())
        } else {
            io_err(path, e)
        }
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(path, e))
}

fn read(path: &Path) -> Result<Vec<u8>, NetError> {
    fs::read(path).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, source: io::Error) -> NetError {
    NetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(e: rcgen::Error) -> NetError {
    NetError::Cert(e.to_string())
}
