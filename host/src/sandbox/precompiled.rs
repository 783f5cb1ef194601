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
//! signature (anyone can compute it), so a `.cwasm` is loaded only from
//! the operator's own files, `NodeRuntime.AgentsDirectory` or a file named
//! to `run-agent`, never from an HTTP or OCI source
//! ([`ArtifactTrust`](super::artifact_trust::ArtifactTrust)).
//!
//! The artifact's ELF header names the architecture it was compiled for, so
//! a `.cwasm` made for another machine (`compile --target`) is refused
//! with both targets named, before wasmtime is asked.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Identifies a node-runtime `.cwasm` and its format version.
const MAGIC: &[u8; 16] = b"node-runtime:cw1";
const DIGEST_LEN: usize = 32;
pub(crate) const TRAILER_LEN: usize = DIGEST_LEN + MAGIC.len();

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

/// The SHA-256 a sealed `.cwasm`'s trailer records (what
/// [`signature`](super::signature) signs); `None` for other bytes.
pub fn recorded_digest(bytes: &[u8]) -> Option<&[u8]> {
    is_precompiled(bytes).then(|| &bytes[bytes.len() - TRAILER_LEN..bytes.len() - MAGIC.len()])
}

/// True when a node-runtime trailer appears anywhere in `bytes`: a `.cwasm`
/// with bytes appended after it. Only asked of a file already refused, to
/// say why.
pub fn holds_trailer(bytes: &[u8]) -> bool {
    bytes.windows(MAGIC.len()).any(|window| window == MAGIC)
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

/// ELF machine numbers of the architectures wasmtime compiles for.
const EM_386: u16 = 3;
const EM_ARM: u16 = 40;
const EM_X86_64: u16 = 62;
const EM_S390: u16 = 22;
const EM_AARCH64: u16 = 183;
const EM_RISCV: u16 = 243;
/// wasmtime marks Pulley bytecode as riscv64 with one of these `e_flags`
/// (`wasmtime_environ::obj::EF_WASMTIME_PULLEY32` and `..64`).
const EF_WASMTIME_PULLEY32: u32 = 1 << 2;
const EF_WASMTIME_PULLEY64: u32 = 1 << 3;

/// The architecture a wasmtime artifact was compiled for (`x86_64`,
/// `aarch64`, `pulley64`, ...), read from its ELF header; `None` when the
/// header is not one wasmtime writes.
pub fn artifact_architecture(artifact: &[u8]) -> Option<&'static str> {
    if !artifact.starts_with(b"\x7fELF") {
        return None;
    }
    let big_endian = match artifact.get(5)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let flags_at = match artifact.get(4)? {
        1 => 36,
        2 => 48,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let bytes: [u8; 2] = artifact.get(at..at + 2)?.try_into().ok()?;
        Some(if big_endian {
            u16::from_be_bytes(bytes)
        } else {
            u16::from_le_bytes(bytes)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = artifact.get(at..at + 4)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    };
    let flags = u32_at(flags_at)?;
    Some(match (u16_at(18)?, big_endian) {
        (EM_RISCV, false) if flags & EF_WASMTIME_PULLEY64 != 0 => "pulley64",
        (EM_RISCV, true) if flags & EF_WASMTIME_PULLEY64 != 0 => "pulley64be",
        (EM_RISCV, false) if flags & EF_WASMTIME_PULLEY32 != 0 => "pulley32",
        (EM_RISCV, true) if flags & EF_WASMTIME_PULLEY32 != 0 => "pulley32be",
        (EM_RISCV, _) => "riscv64",
        (EM_X86_64, _) => "x86_64",
        (EM_AARCH64, _) => "aarch64",
        (EM_S390, _) => "s390x",
        (EM_386, _) => "x86",
        (EM_ARM, _) => "arm",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_is_caught_by_the_digest() {
        let mut sealed = seal(b"\x7fELF pretend artifact".to_vec());
        assert!(is_precompiled(&sealed));
        sealed[3] ^= 1;
        assert!(matches!(unseal(&sealed), Err(PrecompiledError::DigestMismatch { .. })));
    }

    /// The first 64 bytes of a little-endian ELF64 file.
    fn elf64_header(machine: u16, flags: u32) -> Vec<u8> {
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[18..20].copy_from_slice(&machine.to_le_bytes());
        header[48..52].copy_from_slice(&flags.to_le_bytes());
        header
    }

    #[test]
    fn pulley_bytecode_is_told_from_riscv64_code_by_wasmtimes_elf_flags() {
        let component = 1 << 1;
        assert_eq!(
            artifact_architecture(&elf64_header(EM_RISCV, component)),
            Some("riscv64")
        );
        let pulley64 = elf64_header(EM_RISCV, component | EF_WASMTIME_PULLEY64);
        assert_eq!(artifact_architecture(&pulley64), Some("pulley64"));
        let pulley32 = elf64_header(EM_RISCV, component | EF_WASMTIME_PULLEY32);
        assert_eq!(artifact_architecture(&pulley32), Some("pulley32"));
        assert_eq!(
            artifact_architecture(&elf64_header(EM_AARCH64, component)),
            Some("aarch64")
        );
        assert_eq!(
            artifact_architecture(&elf64_header(EM_X86_64, component)[..40]),
            None,
            "cut short"
        );
        assert_eq!(artifact_architecture(b"\0asm\x0d\0\x01\0"), None);
    }

    #[test]
    fn a_sealed_non_component_is_refused() {
        let sealed = seal(b"not an artifact".to_vec());
        assert_eq!(unseal(&sealed), Err(PrecompiledError::NotAComponent));
    }
}
