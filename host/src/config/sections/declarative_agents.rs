//! `DeclarativeAgents` (this node): what the operator allows agents that
//! are definitions rather than code (`sandbox::declarative`). Its type and
//! defaults, its binding, and its printed view, so that each of its keys
//! is spelt here only.
//!
//! ```json
//! "DeclarativeAgents": {
//!   "Enabled": true,
//!   "AllowedHosts": ["erp.example.com"],
//!   "Secrets": {
//!     "ERP_TOKEN": { "EnvironmentVariable": "ERP_TOKEN", "Hosts": ["erp.example.com"] }
//!   }
//! }
//! ```

use std::collections::BTreeMap;

use serde::Serialize;
use support::Secret;

use super::sandbox::host_list;
use crate::config::effective::REDACTED;
use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::config::tree::{Kind, Origin, Scalar};

/// `DeclarativeAgents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclarativeAgentsSection {
    /// `Enabled`: run a lease whose agent no source has as the control
    /// plane's definition of that version. Default true.
    pub enabled: bool,
    /// `AllowedHosts`: hosts (`host` or `host:port`) every declarative
    /// agent's output may be posted to, beyond each agent's own grants.
    pub allowed_hosts: Vec<String>,
    /// `Secrets`: name -> value and the hosts it may be sent to.
    pub secrets: BTreeMap<String, DeclarativeSecret>,
}

impl Default for DeclarativeAgentsSection {
    fn default() -> Self {
        DeclarativeAgentsSection {
            enabled: true,
            allowed_hosts: Vec::new(),
            secrets: BTreeMap::new(),
        }
    }
}

/// `DeclarativeAgents.Secrets.<NAME>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclarativeSecret {
    /// `Value`, or the value of the variable `EnvironmentVariable` names.
    pub value: Secret,
    /// `EnvironmentVariable`, when the value came from one.
    pub environment_variable: Option<String>,
    /// `Hosts`: where `${NAME}` may be sent.
    pub hosts: Vec<String>,
}

pub(in crate::config) fn bind(
    reader: &mut Reader<'_>,
    root: &mut Section,
) -> Result<DeclarativeAgentsSection, ConfigError> {
    let defaults = DeclarativeAgentsSection::default();
    let mut s = reader.section(root, "DeclarativeAgents")?;
    let enabled = reader.boolean(&mut s, "Enabled", defaults.enabled)?;
    let allowed_hosts = match s.entries.take("AllowedHosts") {
        None => Vec::new(),
        Some(node) => host_list(reader, s.key("AllowedHosts"), &node)?,
    };
    let mut secrets = BTreeMap::new();
    let mut all = reader.section(&mut s, "Secrets")?;
    for name in all.entries.names() {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(reader.invalid(
                all.key(&name),
                format!("{name:?}"),
                &Origin::Unset,
                "a secret's name is what a spec writes inside ${...}: letters, digits and `_` only, \
                 e.g. ERP_TOKEN"
                    .to_string(),
            ));
        }
        // A secret written as a plain value is the likeliest mistake, and
        // the value is the secret: the error must not quote it.
        if let Some((_, node)) = all.entries.iter().find(|(key, _)| *key == name)
            && !matches!(node.kind, Kind::Section { list: false, .. } | Kind::Value(Scalar::Null))
        {
            return Err(reader.invalid(
                all.key(&name),
                "a value (not shown: it may be the secret)".to_string(),
                &node.origin,
                format!(
                    "expected a section: \"{name}\": {{\"Value\": \"...\" or \"EnvironmentVariable\": \"VAR\", \
                     \"Hosts\": [\"host\"]}}"
                ),
            ));
        }
        let mut one = reader.section(&mut all, &name)?;
        let value = reader.optional_text(&mut one, "Value")?.map(Secret::new);
        let variable_key = one.key("EnvironmentVariable");
        let variable = reader.optional_text(&mut one, "EnvironmentVariable")?;
        let hosts = match one.entries.take("Hosts") {
            None => Vec::new(),
            Some(node) => host_list(reader, one.key("Hosts"), &node)?,
        };
        let value = match (value, &variable) {
            (Some(_), Some(_)) => {
                return Err(reader.invalid(
                    variable_key,
                    "both Value and EnvironmentVariable".to_string(),
                    &Origin::Unset,
                    "give the secret one source: Value, or the EnvironmentVariable that holds it".to_string(),
                ));
            }
            (Some(value), None) => value,
            (None, Some(variable)) => match reader.variable(variable) {
                Some(value) if !value.is_empty() => Secret::new(value.to_string()),
                _ => {
                    return Err(reader.invalid(
                        variable_key,
                        format!("{variable:?}"),
                        &Origin::Unset,
                        format!("the environment variable {variable} is not set; export it with the secret's value"),
                    ));
                }
            },
            (None, None) => {
                return Err(reader.invalid(
                    one.key("Value"),
                    "not set".to_string(),
                    &Origin::Unset,
                    "a secret needs a Value, or an EnvironmentVariable that holds it".to_string(),
                ));
            }
        };
        if hosts.is_empty() {
            return Err(reader.invalid(
                one.key("Hosts"),
                "no hosts".to_string(),
                &Origin::Unset,
                format!(
                    "a secret is sent only to the hosts it is bound to; list them, e.g. \
                     \"Hosts\": [\"erp.example.com\"] (${{{name}}} is refused everywhere else)"
                ),
            ));
        }
        reader.finish(one);
        secrets.insert(
            name,
            DeclarativeSecret {
                value,
                environment_variable: variable,
                hosts,
            },
        );
    }
    reader.finish(all);
    reader.finish(s);
    Ok(DeclarativeAgentsSection {
        enabled,
        allowed_hosts,
        secrets,
    })
}

/// `DeclarativeAgents` as `config check` prints it: secret values never.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    enabled: bool,
    allowed_hosts: &'a [String],
    secrets: BTreeMap<&'a str, SecretView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SecretView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment_variable: Option<&'a str>,
    hosts: &'a [String],
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(section: &'a DeclarativeAgentsSection) -> Self {
        View {
            enabled: section.enabled,
            allowed_hosts: &section.allowed_hosts,
            secrets: section
                .secrets
                .iter()
                .map(|(name, secret)| {
                    let view = SecretView {
                        value: secret.environment_variable.is_none().then_some(REDACTED),
                        environment_variable: secret.environment_variable.as_deref(),
                        hosts: &secret.hosts,
                    };
                    (name.as_str(), view)
                })
                .collect(),
        }
    }
}
