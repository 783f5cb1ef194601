//! The HTTP capability's setting: the hosts an agent may reach.
//!
//! The operator grants outbound HTTP per agent id as a list of `host` or
//! `host:port` entries (`SandboxConfig.allowed_hosts`, `grants`, or
//! `run-agent --allow-http`), each parsed into a [`HostGrant`]; a run's
//! metadata `http.allow` ([`HTTP_ALLOW_METADATA_KEY`]) can narrow them,
//! never widen them (`egress.rs`).

use std::fmt;

use thiserror::Error;

/// The run metadata key that narrows the node's grants for one run: a
/// comma-separated list of `host` or `host:port`.
pub const HTTP_ALLOW_METADATA_KEY: &str = "http.allow";

/// One allow-list entry: a host, and optionally the one port allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGrant {
    /// Lowercase; an IPv6 address keeps its brackets (`[::1]`).
    pub host: String,
    /// `None`: any port of the host.
    pub port: Option<u16>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("`{0}` is not a host or host:port allow-list entry")]
pub struct InvalidHostGrant(pub String);

impl HostGrant {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub fn parse(entry: &str) -> Result<HostGrant, InvalidHostGrant> {
        let invalid = || InvalidHostGrant(entry.to_string());
        let entry_trimmed = entry.trim();
        if entry_trimmed.is_empty()
            || entry_trimmed.contains(['/', '@', '?', '#', ' ', '*'])
            || entry_trimmed.contains("://")
        {
            return Err(invalid());
        }
        let (host, port) = if let Some(rest) = entry_trimmed.strip_prefix('[') {
            let (address, after) = rest.split_once(']').ok_or_else(invalid)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(invalid)?),
            };
            (format!("[{address}]"), port)
        } else {
            match entry_trimmed.split_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (entry_trimmed.to_string(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(invalid());
        }
        let port = match port {
            None => None,
            Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(invalid)?),
        };
        Ok(HostGrant {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    pub(crate) fn allows(&self, host: &str, port: u16) -> bool {
        self.host.eq_ignore_ascii_case(host) && self.port.is_none_or(|p| p == port)
    }

    /// What both grants allow: the same host, on the narrower port.
    pub(super) fn intersect(&self, other: &HostGrant) -> Option<HostGrant> {
        if self.host != other.host {
            return None;
        }
        let port = match (self.port, other.port) {
            (Some(a), Some(b)) if a != b => return None,
            (Some(p), _) | (_, Some(p)) => Some(p),
            (None, None) => None,
        };
        Some(HostGrant {
            host: self.host.clone(),
            port,
        })
    }
}

impl fmt::Display for HostGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_hosts_ports_and_ipv6() {
        assert_eq!(
            HostGrant::parse("API.example.com").unwrap(),
            HostGrant {
                host: "api.example.com".into(),
                port: None
            }
        );
        assert_eq!(HostGrant::parse("127.0.0.1:8080").unwrap().port, Some(8080));
        assert_eq!(
            HostGrant::parse("[::1]:9").unwrap(),
            HostGrant {
                host: "[::1]".into(),
                port: Some(9)
            }
        );
        for bad in [
            "",
            "https://x.com",
            "x.com:http",
            "x.com:0",
            "x.com:70000",
            "a/b",
            ":80",
            "*.x.com",
        ] {
            assert!(HostGrant::parse(bad).is_err(), "{bad}");
        }
    }
}
