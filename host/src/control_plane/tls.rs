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

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::sync::lock;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use support::file_stamp::FileStamp;
pub use support::tls::{PemError, common_name, not_after, read_certificates, read_private_key};

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

/// The client certificate and key, re-read when their files change.
struct ReloadingIdentity {
    certificate_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Arc<LoadedIdentity>>,
}

struct LoadedIdentity {
    stamp: FileStamps,
    key: Arc<CertifiedKey>,
    subject: String,
    not_after: SystemTime,
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
    fn load(certificate_path: PathBuf, key_path: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let loaded = load_identity(&certificate_path, &key_path, &provider)?;
        tracing::info!(subject = %loaded.subject, path = %certificate_path.display(), "client certificate loaded");
        Ok(ReloadingIdentity {
            certificate_path,
            key_path,
            provider,
            loaded: Mutex::new(Arc::new(loaded)),
        })
    }

    fn current(&self) -> Arc<LoadedIdentity> {
        Arc::clone(&lock(&self.loaded))
    }

    /// Re-reads the files if they changed. A half-written or broken pair
    /// keeps the previous certificate in use, with a warning.
    fn refresh(&self) {
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

fn load_identity(
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

/// The server must satisfy webpki (chain and host name, unless chain
/// validation is off) and, when configured, have the expected CN.
#[derive(Debug)]
struct ControlPlaneVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    expected_subject: Option<String>,
    validate_chain: bool,
}

/// The server certificate's CN is not `ExpectedServerCertificateSubject`.
#[derive(Debug, Error)]
#[error("the control plane's certificate has CN={found:?}, but MTls.ExpectedServerCertificateSubject is {expected:?}")]
pub struct SubjectMismatch {
    pub found: String,
    pub expected: String,
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.validate_chain {
            self.webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        if let Some(expected) = &self.expected_subject {
            let found = common_name(end_entity).unwrap_or_default();
            if &found != expected {
                return Err(rustls::Error::Other(rustls::OtherError(Arc::new(SubjectMismatch {
                    found,
                    expected: expected.clone(),
                }))));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Dials the gRPC channel over TLS: tonic's own TLS cannot take a rustls
/// configuration with a custom verifier and a reloading client
/// certificate, so the channel is given this connector instead.
#[derive(Clone)]
pub struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
}

impl TlsConnector {
    pub fn new(config: ClientConfig) -> TlsConnector {
        TlsConnector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

type Dialled = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = Dialled;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Dialled, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = self.connector.clone();
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} in {uri}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone()).map_err(|_| invalid("an invalid host name"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// An error and its causes on one line, plus what a TLS failure among them
/// means for the operator. `io::Error` hides its inner error from
/// `source()`, so that is looked into explicitly.
pub fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut hint = None;
    let mut current = Some(error);
    // Bounded: a cyclic chain would be a bug elsewhere, not a hang here.
    for _ in 0..16 {
        let Some(err) = current else { break };
        if hint.is_none()
            && let Some(tls) = err.downcast_ref::<rustls::Error>()
        {
            hint = tls_hint(tls);
        }
        let part = err.to_string();
        if !parts.last().is_some_and(|last| last.contains(&part)) {
            parts.push(part);
        }
        current = match err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    let text = parts.join(": ");
    // Some layers (h2) print a TLS alert without exposing it as a source.
    if hint.is_none() {
        hint = [
            AlertDescription::CertificateRequired,
            AlertDescription::UnknownCA,
            AlertDescription::AccessDenied,
            AlertDescription::CertificateExpired,
            AlertDescription::BadCertificate,
        ]
        .into_iter()
        .find(|alert| text.contains(&format!("received fatal alert: {alert:?}")))
        .and_then(|alert| tls_hint(&rustls::Error::AlertReceived(alert)));
    }
    match hint {
        Some(hint) => format!("{hint} ({text})"),
        None => text,
    }
}

fn tls_hint(error: &rustls::Error) -> Option<String> {
    use rustls::Error as E;
    let hint = match error {
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "TLS: the control plane requires a client certificate and none was sent: set MTls.Enabled to true, with MTls.ClientCertificatePath and MTls.ClientKeyPath".to_string()
        }
        E::AlertReceived(AlertDescription::UnknownCA) => {
            "TLS: the control plane refused this node's client certificate, issued by a CA it does not trust: use a certificate from the control plane's client CA (MTls.ClientCertificatePath)".to_string()
        }
        E::AlertReceived(AlertDescription::AccessDenied) => {
            "TLS: the control plane refused this node's client certificate: its subject is not allowed there (MTls.ClientCertificatePath)".to_string()
        }
        E::AlertReceived(AlertDescription::CertificateExpired) => {
            "TLS: the control plane refused this node's client certificate as expired: renew MTls.ClientCertificatePath".to_string()
        }
        E::AlertReceived(AlertDescription::BadCertificate | AlertDescription::CertificateUnknown | AlertDescription::UnsupportedCertificate) => {
            "TLS: the control plane refused this node's client certificate (MTls.ClientCertificatePath)".to_string()
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "TLS: the control plane's certificate is not issued by a trusted CA: MTls.ServerCaCertificatePath (or, with MTls disabled, the system roots) must hold the CA that issued it".to_string()
        }
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "TLS: the control plane's certificate has expired: it must be renewed on the control plane".to_string()
        }
        E::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => {
            "TLS: the control plane's certificate does not name the host of NodeRuntime.ControlPlaneUrl: use a host name the certificate names".to_string()
        }
        E::InvalidCertificate(other) => format!("TLS: the control plane's certificate was refused ({other})"),
        E::Other(other) => format!("TLS: {other}"),
        _ => return None,
    };
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_warned_within_seven_days_and_after() {
        let now = SystemTime::now();
        let path = Path::new("node-cert.pem");
        assert!(expiry_message("n", path, now + Duration::from_secs(8 * 86_400), now).is_none());
        let soon = expiry_message("n", path, now + Duration::from_secs(3 * 86_400 + 60), now).unwrap();
        assert!(soon.contains("expires in 3 days"), "{soon}");
        assert!(soon.contains("MTls.ClientCertificatePath node-cert.pem"), "{soon}");
        let past = expiry_message("n", path, now - Duration::from_secs(60), now).unwrap();
        assert!(past.contains("has expired"), "{past}");
    }

    #[test]
    fn a_tls_failure_inside_an_io_error_is_explained() {
        let io = io::Error::other(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        let text = describe(&io);
        assert!(text.contains("not issued by a trusted CA"), "{text}");
        assert!(text.contains("UnknownIssuer"), "{text}");
        // An alert only printed by a lower layer is still recognised.
        let printed = io::Error::other("connection error: received fatal alert: UnknownCA");
        assert!(
            describe(&printed).contains("CA it does not trust"),
            "{}",
            describe(&printed)
        );
    }

    #[test]
    fn mtls_over_http_is_refused() {
        let options = TlsOptions {
            enabled: true,
            ..TlsOptions::default()
        };
        match ControlPlaneTls::configure("http://localhost:5109", &options) {
            Err(TlsError::NotHttps { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// The contents of the DER element at the start of `der`, and the rest.
    fn der_element(der: &[u8]) -> (&[u8], &[u8]) {
        let (length, header) = match der[1] {
            short if short < 0x80 => (short as usize, 2),
            long => {
                let bytes = (long & 0x7f) as usize;
                let length = der[2..2 + bytes].iter().fold(0, |n, b| (n << 8) | *b as usize);
                (length, 2 + bytes)
            }
        };
        (&der[header..header + length], &der[header + length..])
    }

    fn pem(label: &str, der: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut text = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
            for i in 0..4 {
                text.push(if i <= chunk.len() {
                    ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char
                } else {
                    '='
                });
            }
        }
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    }

    #[test]
    fn pkcs8_and_sec1_keys_load_and_a_foreign_key_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "node-a");
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let provider = provider();

        let pkcs8_path = dir.path().join("pkcs8.pem");
        std::fs::write(&pkcs8_path, key.serialize_pem()).unwrap();
        let loaded = load_identity(&cert_path, &pkcs8_path, &provider).unwrap();
        assert_eq!(loaded.subject, "node-a");

        // PrivateKeyInfo { version, algorithm, privateKey: ECPrivateKey (SEC1) }
        let (info, _) = der_element(key.serialized_der());
        let (_, rest) = der_element(info);
        let (_, rest) = der_element(rest);
        let (sec1, _) = der_element(rest);
        let sec1_path = dir.path().join("sec1.pem");
        std::fs::write(&sec1_path, pem("EC PRIVATE KEY", sec1)).unwrap();
        assert!(
            std::fs::read_to_string(&sec1_path)
                .unwrap()
                .starts_with("-----BEGIN EC PRIVATE KEY-----")
        );
        load_identity(&cert_path, &sec1_path, &provider).unwrap();

        let other_path = dir.path().join("other.pem");
        std::fs::write(&other_path, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        match load_identity(&cert_path, &other_path, &provider) {
            Err(TlsError::KeyMismatch { .. }) => {}
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a foreign key was accepted"),
        }
    }
}
