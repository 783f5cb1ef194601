//! `MTls`: the client certificate for the control-plane connection. Its
//! type and defaults, its binding, and its printed view, so that each of
//! its keys is spelt here only.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::effective::path;
use crate::config::error::ConfigError;
use crate::config::reader::{PathKind, Reader, Section};
use crate::config::tree::{self, Origin};

/// `MTls`: the client certificate for the control-plane connection.
/// Paths are resolved against the configuration file's directory; when
/// `Enabled`, those set exist; when not, they are never looked at (the
/// reference ships paths that exist only where its certificates are
/// mounted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MTlsSection {
    /// `Enabled`: when true, both the certificate and the key are set.
    pub enabled: bool,
    /// `ClientCertificatePath`: PEM.
    pub client_certificate_path: Option<PathBuf>,
    /// `ClientKeyPath`: PEM.
    pub client_key_path: Option<PathBuf>,
    /// `ServerCaCertificatePath`: PEM; the server's chain must lead to it.
    pub server_ca_certificate_path: Option<PathBuf>,
    /// `ExpectedServerCertificateSubject`: the server certificate's CN must
    /// equal it when set.
    pub expected_server_certificate_subject: Option<String>,
    /// `ValidateCertificateChain`.
    pub validate_certificate_chain: bool,
}

impl Default for MTlsSection {
    fn default() -> Self {
        MTlsSection {
            enabled: false,
            client_certificate_path: None,
            client_key_path: None,
            server_ca_certificate_path: None,
            expected_server_certificate_subject: None,
            validate_certificate_chain: true,
        }
    }
}

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<MTlsSection, ConfigError> {
    let defaults = MTlsSection::default();
    let mut s = reader.section(root, "MTls")?;
    // Said in the message when it surprises: Enabled set from outside the file.
    let enabled_from_env = s.entries.iter().find_map(|(name, node)| match &node.origin {
        Origin::Env(variable) if tree::same_key(name, "Enabled") => {
            Some(format!(" (from environment variable {variable})"))
        }
        _ => None,
    });
    let enabled = reader.boolean(&mut s, "Enabled", defaults.enabled)?;
    // The reference ships `Enabled: false` with paths under
    // /etc/bpa/certs that exist only where its certificates are
    // mounted: a disabled section's files are never looked at.
    let certificate = if enabled {
        PathKind::ExistingFile
    } else {
        PathKind::Unread
    };
    let mtls = MTlsSection {
        enabled,
        client_certificate_path: reader.path(&mut s, "ClientCertificatePath", certificate)?,
        client_key_path: reader.path(&mut s, "ClientKeyPath", certificate)?,
        server_ca_certificate_path: reader.path(&mut s, "ServerCaCertificatePath", certificate)?,
        expected_server_certificate_subject: reader.optional_text(&mut s, "ExpectedServerCertificateSubject")?,
        validate_certificate_chain: reader.boolean(
            &mut s,
            "ValidateCertificateChain",
            defaults.validate_certificate_chain,
        )?,
    };
    if mtls.enabled {
        let required = [
            (
                "ClientCertificatePath",
                mtls.client_certificate_path.is_none(),
                "client certificate",
            ),
            (
                "ClientKeyPath",
                mtls.client_key_path.is_none(),
                "client certificate's private key",
            ),
        ];
        for (name, missing, what) in required {
            if missing {
                return Err(reader.invalid(
                    s.key(name),
                    "not set".to_string(),
                    &Origin::Unset,
                    format!(
                        "MTls.Enabled is true{}, which needs the {what} (a PEM file); \
                         set MTls.{name} to its path, or set MTls.Enabled to false",
                        enabled_from_env.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
    }
    reader.finish(s);
    Ok(mtls)
}

/// `MTls` as `config check` prints it: certificate and key paths are not
/// secrets.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View {
    enabled: bool,
    client_certificate_path: Option<String>,
    client_key_path: Option<String>,
    server_ca_certificate_path: Option<String>,
    expected_server_certificate_subject: Option<String>,
    validate_certificate_chain: bool,
}

impl View {
    pub(in crate::config) fn of(mtls: &MTlsSection) -> Self {
        View {
            enabled: mtls.enabled,
            client_certificate_path: mtls.client_certificate_path.as_deref().map(path),
            client_key_path: mtls.client_key_path.as_deref().map(path),
            server_ca_certificate_path: mtls.server_ca_certificate_path.as_deref().map(path),
            expected_server_certificate_subject: mtls.expected_server_certificate_subject.clone(),
            validate_certificate_chain: mtls.validate_certificate_chain,
        }
    }
}
