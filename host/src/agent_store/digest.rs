//! Content digests that pin an agent artifact.
//!
//! A run may name the exact bytes it expects with lease metadata
//! `agent.digest = sha256:<64 hex>` (the OCI spelling). The store checks the
//! artifact it found against it before compiling, so a swapped file, a
//! republished version or a tampered download never runs under that lease.

use std::fmt;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The lease metadata key that pins a run's artifact.
pub const DIGEST_METADATA_KEY: &str = "agent.digest";

/// A SHA-256 content digest, printed `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgentDigest([u8; 32]);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "lease metadata {DIGEST_METADATA_KEY} is {0:?}: expected sha256: followed by 64 hex digits, \
     e.g. sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
)]
pub struct InvalidDigest(pub String);

impl AgentDigest {
    pub fn of(bytes: &[u8]) -> Self {
        AgentDigest(Sha256::digest(bytes).into())
    }

    /// A digest known from elsewhere (a record of an earlier hash).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        AgentDigest(bytes)
    }

    /// The SHA-256 itself.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses `sha256:<64 hex>`; the hex may be upper or lower case.
    pub fn parse(text: &str) -> Result<Self, InvalidDigest> {
        let invalid = || InvalidDigest(text.to_string());
        let hex_part = text.trim().strip_prefix("sha256:").ok_or_else(invalid)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| invalid())?;
        Ok(AgentDigest(bytes))
    }
}

impl fmt::Display for AgentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for AgentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_through_their_text_form() {
        let digest = AgentDigest::of(b"test");
        let text = digest.to_string();
        assert_eq!(
            text,
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(AgentDigest::parse(&text).unwrap(), digest);
        assert_eq!(
            AgentDigest::parse(&text.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            digest
        );
    }

    #[test]
    fn anything_but_sha256_and_64_hex_digits_is_refused() {
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "sha256:xyz",
        ] {
            assert!(AgentDigest::parse(bad).is_err(), "{bad:?}");
        }
    }
}
