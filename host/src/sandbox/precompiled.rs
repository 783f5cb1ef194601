//! The `.cwasm` file format: a component compiled ahead of time.
//!
//! A `.cwasm` is native code, loaded without validation, so the node must
//! never load one that was damaged or produced under another engine
//! configuration. The file is wasmtime's serialized component followed by a
//! trailer:
//!
//! ```text
//! [ wasmtime artifact (ELF) ][ SHA-256 of the artifact, 32 bytes ][ MAGIC, 16 bytes ]
//! ```
//!
//! The digest catches truncation and corruption (a flipped byte, a partial
//! copy); wasmtime itself then refuses an artifact from another wasmtime
//! version or configuration (fuel, epochs, target). The digest is not a
//! signature: a `.cwasm` is as trusted as the place it came from.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Identifies a node-runtime `.cwasm` and its format version.
const MAGIC: &[u8; 16] = b"node-runtime:cw1";
const DIGEST_LEN: usize = 32;
const TRAILER_LEN: usize = DIGEST_LEN + MAGIC.len();

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrecompiledError {
    #[error(
        "the file is a wasmtime precompiled artifact without node-runtime's integrity trailer; \
         precompile the .wasm with `node-runtime compile`"
    )]
    ForeignArtifact,
    #[error(
        "the .cwasm is damaged: its content does not match the SHA-256 recorded when it was \
         compiled (expected {expected}, found {found}); compile it again from the .wasm"
    )]
    DigestMismatch { expected: String, found: String },
    #[error("the .cwasm holds no component (its payload is not a wasmtime component artifact)")]
    NotAComponent,
}

/// True when `bytes` end with a node-runtime `.cwasm` trailer.
pub fn is_precompiled(bytes: &[u8]) -> bool {
    bytes.len() >= TRAILER_LEN && bytes.ends_with(MAGIC)
}

/// Appends the trailer to wasmtime's serialized component.
pub fn seal(mut artifact: Vec<u8>) -> Vec<u8> {
    let digest = Sha256::digest(&artifact);
    artifact.extend_from_slice(&digest);
    artifact.extend_from_slice(MAGIC);
    artifact
}

/// Checks the trailer and returns the artifact it protects. The caller has
/// checked [`is_precompiled`]; wasmtime artifacts without our trailer are
/// recognised and refused with a hint.
pub fn unseal(bytes: &[u8]) -> Result<&[u8], PrecompiledError> {
    if !is_precompiled(bytes) {
        return Err(PrecompiledError::ForeignArtifact);
    }
    let (artifact, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let expected = &trailer[..DIGEST_LEN];
    let found = Sha256::digest(artifact);
    if found.as_slice() != expected {
        return Err(PrecompiledError::DigestMismatch {
            expected: hex::encode(expected),
            found: hex::encode(found),
        });
    }
    match wasmtime::Engine::detect_precompiled(artifact) {
        Some(wasmtime::Precompiled::Component) => Ok(artifact),
        _ => Err(PrecompiledError::NotAComponent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_is_caught_by_the_digest() {
        let mut sealed = seal(b"\x7fELF pretend artifact".to_vec());
        assert!(is_precompiled(&sealed));
        sealed[3] ^= 1;
        assert!(matches!(
            unseal(&sealed),
            Err(PrecompiledError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn a_sealed_non_component_is_refused() {
        let sealed = seal(b"not an artifact".to_vec());
        assert_eq!(unseal(&sealed), Err(PrecompiledError::NotAComponent));
    }
}
