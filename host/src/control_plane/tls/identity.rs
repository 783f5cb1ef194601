//! The client certificate and key, re-read when their files change: a
//! rotated certificate is used from the next handshake on, and a broken
//! pair keeps the previous one in use, with a warning.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use support::file_stamp::FileStamp;
use support::sync::lock;
use support::tls::{common_name, not_after, read_certificates, read_private_key};

use super::{CERTIFICATE_KEY, KEY_KEY, TlsError};

/// The client certificate and key, re-read when their files change.
pub(super) struct ReloadingIdentity {
    pub(super) certificate_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Arc<LoadedIdentity>>,
}

pub(super) struct LoadedIdentity {
    stamp: FileStamps,
    key: Arc<CertifiedKey>,
    pub(super) subject: String,
    pub(super) not_after: SystemTime,
}

/// What tells a changed file: the stamps of both files (a missing file has
/// none).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamps(Vec<Option<FileStamp>>);

impl FileStamps {
    fn of(paths: &[&Path]) -> FileStamps {
        FileStamps(
            paths
                .iter()
                .map(|path| std::fs::metadata(path).ok().map(|meta| FileStamp::of(path, &meta)))
                .collect(),
        )
    }
}

impl fmt::Debug for ReloadingIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingIdentity")
            .field("certificate_path", &self.certificate_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingIdentity {
    pub(super) fn load(
        certificate_path: PathBuf,
        key_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let loaded = load_identity(&certificate_path, &key_path, &provider)?;
        tracing::info!(subject = %loaded.subject, path = %certificate_path.display(), "client certificate loaded");
        Ok(ReloadingIdentity {
            certificate_path,
            key_path,
            provider,
            loaded: Mutex::new(Arc::new(loaded)),
        })
    }

    pub(super) fn current(&self) -> Arc<LoadedIdentity> {
        Arc::clone(&lock(&self.loaded))
    }

    /// Re-reads the files if they changed. A half-written or broken pair
    /// keeps the previous certificate in use, with a warning.
    pub(super) fn refresh(&self) {
        let stamp = FileStamps::of(&[&self.certificate_path, &self.key_path]);
        let mut loaded = lock(&self.loaded);
        if loaded.stamp == stamp {
            return;
        }
        match load_identity(&self.certificate_path, &self.key_path, &self.provider) {
            Ok(fresh) => {
                tracing::info!(subject = %fresh.subject, previous = %loaded.subject, path = %self.certificate_path.display(), "client certificate files changed; using the new certificate");
                *loaded = Arc::new(fresh);
            }
            Err(err) => {
                tracing::warn!(error = %err, subject = %loaded.subject, "client certificate files changed but cannot be used; keeping the previous certificate");
                // Do not retry on every handshake until the files change again.
                let previous = Arc::clone(&loaded);
                *loaded = Arc::new(LoadedIdentity {
                    stamp,
                    key: Arc::clone(&previous.key),
                    subject: previous.subject.clone(),
                    not_after: previous.not_after,
                });
            }
        }
    }
}

impl ResolvesClientCert for ReloadingIdentity {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(Arc::clone(&self.current().key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

pub(super) fn load_identity(
    certificate_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<LoadedIdentity, TlsError> {
    // The stamp is taken first: a change during the read is seen next time.
    let stamp = FileStamps::of(&[certificate_path, key_path]);
    let chain = read_certificates(CERTIFICATE_KEY, certificate_path)?;
    let key = read_private_key(KEY_KEY, key_path)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| TlsError::UnusableKey {
            path: key_path.to_path_buf(),
            reason: err.to_string(),
        })?;
    let subject = common_name(&chain[0]).unwrap_or_else(|| "?".to_string());
    let not_after = not_after(&chain[0]).unwrap_or(UNIX_EPOCH);
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|err| TlsError::KeyMismatch {
        certificate: certificate_path.to_path_buf(),
        key: key_path.to_path_buf(),
        reason: err.to_string(),
    })?;
    Ok(LoadedIdentity {
        stamp,
        key: Arc::new(certified),
        subject,
        not_after,
    })
}
