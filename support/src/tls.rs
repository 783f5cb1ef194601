//! TLS pieces every TLS user in the node shares: the process's one rustls
//! crypto provider, PEM certificates and keys read with errors that name
//! the setting they came from, and certificate fields (CN, expiry).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// rustls needs one process-wide crypto provider; the node uses ring (the
/// provider wasmtime's HTTP client already brings). Safe to call often.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is as
        // good for us.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A PEM file that cannot be used; `key` names the setting that points at
/// it (`MTls.ClientCertificatePath`, "the server certificate").
#[derive(Debug, Error)]
pub enum PemError {
    #[error("{key} {}: cannot read it: {source}; point {key} at a readable PEM file", path.display())]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key} {}: not a PEM certificate ({detail}); point {key} at a PEM file holding -----BEGIN CERTIFICATE-----", path.display())]
    NotPemCertificate {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    // The key file's contents are never quoted, not even a parse error's excerpt.
    #[error("{key} {}: not a PEM private key; point {key} at a PKCS#1 (BEGIN RSA PRIVATE KEY), PKCS#8 (BEGIN PRIVATE KEY) or SEC1 (BEGIN EC PRIVATE KEY) PEM file", path.display())]
    NotPemKey { key: &'static str, path: PathBuf },
}

/// Every certificate in a PEM file; none is an error naming `key`.
pub fn read_certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let bytes = std::fs::read(path).map_err(|source| PemError::Unreadable {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let not_pem = |detail: String| PemError::NotPemCertificate {
        key,
        path: path.to_path_buf(),
        detail,
    };
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| not_pem(err.to_string()))?;
    if certificates.is_empty() {
        return Err(not_pem("no CERTIFICATE section".to_string()));
    }
    Ok(certificates)
}

/// The private key in a PEM file (PKCS#1, PKCS#8 or SEC1).
pub fn read_private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let bytes = std::fs::read(path).map_err(|source| PemError::Unreadable {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| PemError::NotPemKey {
        key,
        path: path.to_path_buf(),
    })
}

/// The subject's common name, or the whole subject when it has no CN.
pub fn common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let subject = parsed.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Some(cn.unwrap_or_else(|| subject.to_string()))
}

/// The end of the certificate's validity.
pub fn not_after(certificate: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let seconds = parsed.validity().not_after.timestamp();
    Some(if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        UNIX_EPOCH
    })
}
