//! The operator's secrets for declarative agents, and the `${NAME}`
//! placeholders that reach them.
//!
//! A spec's output connector may write `${NAME}` in its endpoint and
//! header values (`Authorization: Bearer ${ERP_TOKEN}`). A placeholder
//! resolves only from a secret the operator configured on this node
//! ([`BoundSecret`]), and only when the request goes to one of the hosts
//! that secret is bound to: whoever writes a spec can name a secret, but
//! cannot send it anywhere the operator did not say. Nothing else fills a
//! placeholder: not the lease, not the spec, not the environment. A
//! placeholder that cannot be filled fails the run before anything is
//! sent. `$` not followed by `{` is kept as written.

use std::collections::BTreeMap;

use support::Secret;
use thiserror::Error;

use crate::sandbox::HostGrant;

/// A secret and the hosts it may be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundSecret {
    pub value: Secret,
    /// Each `host` or `host:port`; empty: nowhere.
    pub hosts: Vec<HostGrant>,
}

/// Why a value's placeholders could not be filled.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PlaceholderError {
    #[error(
        "{field} names the secret ${{{name}}}, which is not configured on this node: the operator \
         adds it under DeclarativeAgents.Secrets.{name} (run-agent: --secret {name}=ENV_VAR)"
    )]
    Unknown { field: String, name: String },
    #[error(
        "{field} would send the secret ${{{name}}} to {host}, which is not among the hosts that \
         secret is bound to ({bound}): the operator adds it to DeclarativeAgents.Secrets.{name}.Hosts"
    )]
    NotBoundTo {
        field: String,
        name: String,
        host: String,
        bound: String,
    },
    #[error("{field} has `${{` without a closing `}}`: write a placeholder as ${{NAME}}")]
    Unclosed { field: String },
    #[error("{field} has the placeholder ${{{name}}}: a name is letters, digits and `_` only")]
    BadName { field: String, name: String },
}

/// The secrets a run's output may use, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub BTreeMap<String, BoundSecret>);

impl Secrets {
    /// `text` with each `${NAME}` replaced by the secret's value, for a
    /// request to `host` on `port`. `field` names the value in errors.
    /// `None` for `host` checks the names only (the host is not known
    /// yet, as for the endpoint itself).
    pub fn fill(&self, field: &str, text: &str, host: Option<(&str, u16)>) -> Result<String, PlaceholderError> {
        self.fill_with(field, text, host, |value| value.to_string())
    }

    /// [`fill`](Self::fill) for a URL: each value percent-encoded but for
    /// the unreserved characters, so a secret holding `?`, `#`, `/` or a
    /// space stays inside the path segment or query value it was put in.
    pub fn fill_encoded(&self, field: &str, text: &str, host: Option<(&str, u16)>) -> Result<String, PlaceholderError> {
        self.fill_with(field, text, host, support::percent::component)
    }

    fn fill_with(
        &self,
        field: &str,
        text: &str,
        host: Option<(&str, u16)>,
        write: impl Fn(&str) -> String,
    ) -> Result<String, PlaceholderError> {
        let mut filled = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("${") {
            filled.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let Some(end) = after.find('}') else {
                return Err(PlaceholderError::Unclosed { field: field.into() });
            };
            let name = &after[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(PlaceholderError::BadName {
                    field: field.into(),
                    name: name.chars().take(64).collect(),
                });
            }
            let Some(secret) = self.0.get(name) else {
                return Err(PlaceholderError::Unknown {
                    field: field.into(),
                    name: name.into(),
                });
            };
            if let Some((host, port)) = host
                && !secret.hosts.iter().any(|grant| grant.allows(host, port))
            {
                return Err(PlaceholderError::NotBoundTo {
                    field: field.into(),
                    name: name.into(),
                    host: format!("{host}:{port}"),
                    bound: if secret.hosts.is_empty() {
                        "none".to_string()
                    } else {
                        secret
                            .hosts
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                });
            }
            filled.push_str(&write(secret.value.expose()));
            rest = &after[end + 1..];
        }
        filled.push_str(rest);
        Ok(filled)
    }

    /// The values of the secrets `text` names (for scrubbing them out of
    /// anything quoted back); unknown names are skipped.
    pub fn values_in(&self, text: &str) -> Vec<String> {
        let mut values = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("${") {
            let after = &rest[at + 2..];
            let Some(end) = after.find('}') else { break };
            if let Some(secret) = self.0.get(&after[..end]) {
                values.push(secret.value.expose().to_string());
            }
            rest = &after[end + 1..];
        }
        values
    }

    /// Whether `text` holds a placeholder.
    pub fn has_placeholder(text: &str) -> bool {
        text.contains("${")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        let mut map = BTreeMap::new();
        map.insert(
            "ERP_TOKEN".to_string(),
            BoundSecret {
                value: Secret::new("s3cret"),
                hosts: vec![HostGrant::parse("erp.example.com").unwrap()],
            },
        );
        Secrets(map)
    }

    #[test]
    fn a_granted_secret_fills_only_for_its_hosts() {
        let secrets = secrets();
        assert_eq!(
            secrets
                .fill("h", "Bearer ${ERP_TOKEN}", Some(("erp.example.com", 443)))
                .unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(
            secrets
                .fill("h", "cost: $5 ${ERP_TOKEN}$", Some(("erp.example.com", 1)))
                .unwrap(),
            "cost: $5 s3cret$"
        );
        let err = secrets
            .fill("h", "Bearer ${ERP_TOKEN}", Some(("evil.example.com", 443)))
            .unwrap_err();
        assert!(matches!(err, PlaceholderError::NotBoundTo { .. }), "{err}");
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        let secrets = secrets();
        let err = secrets
            .fill("headers.X", "${HOME}", Some(("erp.example.com", 443)))
            .unwrap_err();
        assert!(
            err.to_string().contains("${HOME}") && err.to_string().contains("headers.X"),
            "{err}"
        );
        assert!(matches!(
            secrets.fill("h", "${ERP_TOKEN", None),
            Err(PlaceholderError::Unclosed { .. })
        ));
        assert!(matches!(
            secrets.fill("h", "${A B}", None),
            Err(PlaceholderError::BadName { .. })
        ));
        assert!(matches!(
            secrets.fill("h", "${}", None),
            Err(PlaceholderError::BadName { .. })
        ));
        assert_eq!(secrets.fill("h", "plain $text", None).unwrap(), "plain $text");
        let odd = Secrets(BTreeMap::from([(
            "ODD".to_string(),
            BoundSecret {
                value: Secret::new("a b?c#d/e"),
                hosts: vec![HostGrant::parse("h").unwrap()],
            },
        )]));
        assert_eq!(
            odd.fill_encoded("e", "/x/${ODD}", Some(("h", 80))).unwrap(),
            "/x/a%20b%3Fc%23d%2Fe"
        );
    }
}
