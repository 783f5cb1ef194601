//! What a failed connection to the control plane means for the operator:
//! the error's causes on one line, and what a TLS failure among them says
//! to check.

use std::error::Error as StdError;
use std::io;

use rustls::{AlertDescription, CertificateError};

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
