//! What the node accepts from the control plane: webpki's chain and host
//! name checks (unless `ValidateCertificateChain` is off) and, when
//! `ExpectedServerCertificateSubject` is set, the certificate's CN.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use support::tls::common_name;
use thiserror::Error;

/// The server must satisfy webpki (chain and host name, unless chain
/// validation is off) and, when configured, have the expected CN.
#[derive(Debug)]
pub(super) struct ControlPlaneVerifier {
    pub(super) webpki: Arc<WebPkiServerVerifier>,
    pub(super) expected_subject: Option<String>,
    pub(super) validate_chain: bool,
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
