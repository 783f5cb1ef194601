//! TLS for every link to the control plane: one rustls `ClientConfig`,
//! built here from the `MTls` settings, serves both the REST client
//! (registration, heartbeat) and the gRPC lease channel.
//!
//! What it verifies: the server's chain against `ServerCaCertificatePath`
//! alone when set (otherwise the system roots), the host name of
//! `ControlPlaneUrl`, and, when `ExpectedServerCertificateSubject` is set,
//! the server certificate's CN. What it presents: the client certificate
//! and key, re-read whenever either file's modification time or size
//! changes, so a rotated certificate is used from the next connection on.
//! Session resumption is off for the same reason: every reconnect is a full
//! handshake with the current certificate. Errors name the `MTls` key and
//! never quote the private key's file.
//!
//! Here: the options, the errors and the configuration. `identity`: the
//! reloading client certificate; `verifier`: what is accepted from the
//! server; `connector`: the gRPC channel's TLS dialler; `diagnosis`: what a
//! failed connection means for the operator.

mod connector;
mod diagnosis;
mod identity;
mod verifier;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use connector::TlsConnector;
pub use diagnosis::describe;
use identity::ReloadingIdentity;
use support::tls::{PemError, read_certificates};
use verifier::ControlPlaneVerifier;
pub use verifier::SubjectMismatch;

/// A client certificate expiring sooner than this is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

const CERTIFICATE_KEY: &str = "MTls.ClientCertificatePath";
const KEY_KEY: &str = "MTls.ClientKeyPath";
const CA_KEY: &str = "MTls.ServerCaCertificatePath";

/// The `MTls` settings, as the control-plane client uses them.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// `Enabled`: present a client certificate and apply the other keys.
    pub enabled: bool,
    pub client_certificate_path: Option<PathBuf>,
    pub client_key_path: Option<PathBuf>,
    pub server_ca_certificate_path: Option<PathBuf>,
    pub expected_server_certificate_subject: Option<String>,
    pub validate_certificate_chain: bool,
}

impl Default for TlsOptions {
    /// No client certificate; ordinary verification against the system roots.
    fn default() -> Self {
        TlsOptions {
            enabled: false,
            client_certificate_path: None,
            client_key_path: None,
            server_ca_certificate_path: None,
            expected_server_certificate_subject: None,
            validate_certificate_chain: true,
        }
    }
}

#[derive(Debug, Error)]
pub enum TlsError {
    /// A file that cannot be read or is not PEM: the error names its key.
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{KEY_KEY} {}: the key cannot be used ({reason}); use the key that belongs to {CERTIFICATE_KEY}", path.display())]
    UnusableKey { path: PathBuf, reason: String },
    #[error("{CERTIFICATE_KEY} {cert} and {KEY_KEY} {key} do not belong together ({reason}); set both to the files of one certificate", cert = certificate.display(), key = key.display())]
    KeyMismatch {
        certificate: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{CA_KEY} {}: not a usable CA certificate ({reason}); point it at the PEM certificate of the CA that issued the control plane's certificate", path.display())]
    UnusableCa { path: PathBuf, reason: String },
    #[error("MTls.Enabled is true, which needs {key}; set it, or set MTls.Enabled to false")]
    Missing { key: &'static str },
    #[error(
        "MTls.Enabled is true but NodeRuntime.ControlPlaneUrl {url} is not https://, so no certificate would be sent; use the control plane's https:// URL"
    )]
    NotHttps { url: String },
    #[error(
        "no trusted root certificates found on this system for the https:// ControlPlaneUrl ({reason}); install the CA certificates package, set SSL_CERT_FILE, or enable MTls with ServerCaCertificatePath"
    )]
    NoSystemRoots { reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(String),
}

/// TLS for the control-plane links: nothing for an `http://` URL, else one
/// client configuration shared by REST and gRPC.
#[derive(Clone)]
pub struct ControlPlaneTls {
    config: Option<Arc<ClientConfig>>,
    identity: Option<Arc<ReloadingIdentity>>,
}

impl fmt::Debug for ControlPlaneTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneTls")
            .field("https", &self.config.is_some())
            .field(
                "client_certificate",
                &self.identity.as_ref().map(|id| &id.certificate_path),
            )
            .finish()
    }
}

impl ControlPlaneTls {
    /// Reads every file `options` names (a bad one is an error naming its
    /// key) and builds the configuration for `url`.
    pub fn configure(url: &str, options: &TlsOptions) -> Result<ControlPlaneTls, TlsError> {
        let https = url
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
        if !https {
            if options.enabled {
                return Err(TlsError::NotHttps { url: url.to_string() });
            }
            return Ok(ControlPlaneTls {
                config: None,
                identity: None,
            });
        }
        support::tls::install_crypto_provider();
        let provider = provider();
        let identity = if options.enabled {
            let certificate = options
                .client_certificate_path
                .clone()
                .ok_or(TlsError::Missing { key: CERTIFICATE_KEY })?;
            let key = options
                .client_key_path
                .clone()
                .ok_or(TlsError::Missing { key: KEY_KEY })?;
            Some(Arc::new(ReloadingIdentity::load(
                certificate,
                key,
                Arc::clone(&provider),
            )?))
        } else {
            if options.server_ca_certificate_path.is_some() || options.expected_server_certificate_subject.is_some() {
                tracing::warn!(
                    "MTls.ServerCaCertificatePath and ExpectedServerCertificateSubject apply only \
                     when MTls.Enabled is true; verifying the control plane against the system roots"
                );
            }
            None
        };
        let roots = match (&options.server_ca_certificate_path, options.enabled) {
            (Some(path), true) => ca_roots(path)?,
            _ => system_roots()?,
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|err| TlsError::Rustls(err.to_string()))?;
        let expected_subject = options
            .expected_server_certificate_subject
            .as_deref()
            .filter(|_| options.enabled)
            .map(|subject| {
                // Accept the .NET spelling `CN=control-plane` as well as the bare CN.
                let bare = subject.trim();
                match bare.get(..3) {
                    Some(prefix) if prefix.eq_ignore_ascii_case("cn=") => bare[3..].to_string(),
                    _ => bare.to_string(),
                }
            });
        let validate_chain = options.validate_certificate_chain || !options.enabled;
        if !validate_chain {
            tracing::warn!(
                "MTls.ValidateCertificateChain is false: the control plane's certificate is accepted \
                 from any issuer and for any host name (only ExpectedServerCertificateSubject, if set, \
                 is checked); do not run this way in production"
            );
        }
        let verifier = Arc::new(ControlPlaneVerifier {
            webpki,
            expected_subject,
            validate_chain,
        });
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Rustls(err.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &identity {
            Some(identity) => builder.with_client_cert_resolver(Arc::clone(identity) as Arc<dyn ResolvesClientCert>),
            None => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        Ok(ControlPlaneTls {
            config: Some(Arc::new(config)),
            identity,
        })
    }

    /// No TLS: for `http://` control planes.
    pub fn plaintext() -> ControlPlaneTls {
        ControlPlaneTls {
            config: None,
            identity: None,
        }
    }

    /// The client configuration offering `alpn` (`h2` for gRPC,
    /// `http/1.1` for REST), or None for an `http://` control plane.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Option<ClientConfig> {
        self.config.as_ref().map(|config| {
            let mut config = ClientConfig::clone(config);
            config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
            config
        })
    }

    /// The CN of the client certificate presented now, if any.
    pub fn client_subject(&self) -> Option<String> {
        self.identity
            .as_ref()
            .map(|identity| identity.current().subject.clone())
    }

    /// A warning when the client certificate expires within
    /// [`EXPIRY_WARNING`] of `now` (or has expired).
    pub fn expiry_warning(&self, now: SystemTime) -> Option<String> {
        let identity = self.identity.as_ref()?;
        identity.refresh();
        let loaded = identity.current();
        expiry_message(&loaded.subject, &identity.certificate_path, loaded.not_after, now)
    }

    /// Logs [`Self::expiry_warning`] now and once a day until `stop`.
    pub async fn warn_before_expiry(self, stop: CancellationToken) {
        if self.identity.is_none() {
            return;
        }
        loop {
            if let Some(warning) = self.expiry_warning(SystemTime::now()) {
                tracing::warn!("{warning}");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
            }
        }
    }
}

fn expiry_message(subject: &str, path: &Path, not_after: SystemTime, now: SystemTime) -> Option<String> {
    match not_after.duration_since(now) {
        Ok(left) if left >= EXPIRY_WARNING => None,
        Ok(left) => Some(format!(
            "the client certificate CN={subject} ({CERTIFICATE_KEY} {}) expires in {} days ({} hours); \
             replace the certificate and key files (the node picks them up without a restart)",
            path.display(),
            left.as_secs() / 86_400,
            left.as_secs() / 3600
        )),
        Err(_) => Some(format!(
            "the client certificate CN={subject} ({CERTIFICATE_KEY} {}) has expired; the control plane \
             will refuse it: replace the certificate and key files",
            path.display()
        )),
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let reason = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(TlsError::NoSystemRoots { reason });
    }
    Ok(roots)
}

fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certificates = read_certificates(CA_KEY, path)?;
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|err| TlsError::UnusableCa {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    }
    Ok(roots)
}
