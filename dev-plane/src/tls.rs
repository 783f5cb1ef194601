//! TLS for the dev control plane: HTTPS and gRPC over TLS on its one
//! port, optionally requiring client certificates from a given CA and,
//! within those, only certain subjects (CNs).
//!
//! Handshakes run off the accept loop, each bounded in time, so a slow or
//! refused client never holds up the others; every refusal is logged with
//! the peer and the cause, and the CN of every accepted client certificate
//! is recorded, so tests (and developers) can see who connected with what.
//! Each connection is handed on with that CN ([`Peer`]), for the handlers
//! that bind node ids to it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::sync::lock;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use super::access::Peer;
use super::wait_for_shutdown;
use support::tls::common_name;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted client subjects remembered, the newest.
const SUBJECTS_KEPT: usize = 10_000;

/// The plane's certificate and what it asks of clients.
#[derive(Clone)]
pub struct PlaneTls {
    /// The server certificate first, then any intermediates.
    pub certificate_chain: Vec<CertificateDer<'static>>,
    pub private_key: Arc<PrivateKeyDer<'static>>,
    /// When set, every client must present a certificate issued by one of
    /// these CAs.
    pub client_ca: Option<Vec<CertificateDer<'static>>>,
    /// When not empty (and `client_ca` is set), only client certificates
    /// whose CN is one of these.
    pub allowed_subjects: Vec<String>,
    /// With `client_ca`: a request naming a node id (registration,
    /// heartbeat, Pull, Ack, Complete, Fail) must come with a certificate
    /// whose CN is that id. The reference does not check this; `dev
    /// --tls-dir` does.
    pub bind_node_ids: bool,
}

impl fmt::Debug for PlaneTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlaneTls")
            .field("server_subject", &self.certificate_chain.first().and_then(common_name))
            .field("client_certificates_required", &self.client_ca.is_some())
            .field("allowed_subjects", &self.allowed_subjects)
            .field("bind_node_ids", &self.bind_node_ids)
            .finish_non_exhaustive()
    }
}

impl PlaneTls {
    pub(super) fn server_config(&self) -> Result<ServerConfig, String> {
        support::tls::install_crypto_provider();
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?;
        let builder = match &self.client_ca {
            Some(cas) => {
                let mut roots = RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone()).map_err(|err| format!("the client CA: {err}"))?;
                }
                let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|err| format!("the client CA: {err}"))?;
                builder.with_client_cert_verifier(Arc::new(AllowedSubjects {
                    webpki,
                    allowed: self.allowed_subjects.clone(),
                }))
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(self.certificate_chain.clone(), self.private_key.clone_key())
            .map_err(|err| format!("the server certificate and key: {err}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A CA-issued client certificate whose CN must also be allowed.
#[derive(Debug)]
struct AllowedSubjects {
    webpki: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedSubjects {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.webpki.verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(verified);
        }
        let subject = common_name(end_entity).unwrap_or_default();
        if self.allowed.contains(&subject) {
            Ok(verified)
        } else {
            tracing::warn!(%subject, allowed = ?self.allowed, "client certificate refused: its subject is not allowed");
            // Sent to the client as an access_denied alert.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
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

/// The CNs of accepted client certificates, oldest first.
#[derive(Debug, Default)]
pub(super) struct ClientSubjects(Mutex<Vec<String>>);

impl ClientSubjects {
    fn record(&self, subject: String) {
        let mut subjects = lock(&self.0);
        if subjects.len() == SUBJECTS_KEPT {
            subjects.remove(0);
        }
        subjects.push(subject);
    }

    pub(super) fn all(&self) -> Vec<String> {
        lock(&self.0).clone()
    }
}

/// Hands `axum::serve` connections whose TLS handshake succeeded.
pub(super) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` until shutdown, handshaking each connection in
    /// its own task. The accept loop owns the socket: the port is free once
    /// the returned task has ended.
    pub(super) fn start(
        listener: TcpListener,
        config: ServerConfig,
        subjects: Arc<ClientSubjects>,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<(TlsListener, JoinHandle<()>)> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (ready_tx, ready) = mpsc::channel(64);
        let accept_loop = tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = wait_for_shutdown(&mut shutdown) => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            // Out of file descriptors and the like: pause, not spin.
                            tracing::warn!(%err, "dev control plane cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, ready_tx, subjects) = (acceptor.clone(), ready_tx.clone(), Arc::clone(&subjects));
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let subject = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(common_name);
                            if let Some(subject) = &subject {
                                tracing::debug!(%peer, %subject, "TLS client accepted");
                                subjects.record(subject.clone());
                            }
                            let _ = ready_tx.send((stream, Peer { addr: peer, subject })).await;
                        }
                        Ok(Err(err)) => {
                            tracing::warn!(%peer, cause = %refusal_cause(&err), "dev control plane refused a TLS connection");
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "dev control plane dropped a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                        }
                    }
                });
            }
        });
        Ok((TlsListener { ready, local }, accept_loop))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop ended (shutdown): serve's graceful shutdown
            // finishes the rest.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            subject: None,
        })
    }
}

/// Why a client's handshake failed, from the plane's side.
fn refusal_cause(err: &std::io::Error) -> String {
    use rustls::Error as E;
    let Some(tls) = err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return err.to_string();
    };
    let cause = match tls {
        E::NoCertificatesPresented => "the client sent no certificate, and client certificates are required",
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the client certificate is not issued by the plane's client CA"
        }
        E::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "the client certificate's subject is not allowed"
        }
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "the client certificate has expired"
        }
        E::AlertReceived(_) => "the client refused the plane's certificate",
        _ => "TLS handshake failed",
    };
    format!("{cause} ({tls})")
}
