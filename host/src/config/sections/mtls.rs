//! `MTls`: the client certificate for the control-plane connection.

use crate::config::MTlsSection;
use crate::config::error::ConfigError;
use crate::config::reader::{PathKind, Reader, Section};
use crate::config::tree::{self, Origin};

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<MTlsSection, ConfigError> {
    let defaults = MTlsSection::default();
    let mut s = reader.section(root, "MTls")?;
    // Said in the message when it surprises: Enabled set from outside the file.
    let enabled_from_env = s.entries.0.iter().find_map(|(name, node)| match &node.origin {
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
