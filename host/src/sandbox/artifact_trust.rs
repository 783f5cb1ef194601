//! Which source may deliver which artifact.
//!
//! A `.cwasm` is native code: wasmtime maps it and jumps into it without
//! validation, and its trailer (a SHA-256 anyone can compute) detects
//! damage, not malice. Whoever can hand the node a `.cwasm` runs code in
//! the process that holds the LLM key, the mTLS key and the outbox. So
//! the bytes carry their trust ([`ArtifactTrust`]) from the agent store to
//! the sandbox: the operator's own files may be a component or a `.cwasm`;
//! bytes from a network source (HTTP, OCI), whoever controls the server,
//! the registry or the path to them, must be a WebAssembly component,
//! which the node validates and compiles itself. Anything else from the
//! network is refused ([`NetworkArtifactRefused`]) before it is kept in
//! the download cache, and again before it is compiled ([`classify`]): a
//! download cache filled by an older node may hold one.

use thiserror::Error;

use super::agent::InvalidAgent;

/// Where an artifact's bytes came from, which decides what they may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactTrust {
    /// The operator's own file: `NodeRuntime.AgentsDirectory`, or a file
    /// named to `run-agent`. A component, or a `.cwasm` of native code as
    /// trusted as the file.
    Operator,
    /// Bytes from a network source, named by `origin` (a URL or an OCI
    /// reference): only a WebAssembly component, compiled here.
    Network { origin: String },
}

/// The first eight bytes of every WebAssembly component: the magic
/// `\0asm`, version 0x0d, layer 1 (a component; a core module is layer 0,
/// version 1).
pub const COMPONENT_HEADER: [u8; 8] = *b"\0asm\x0d\x00\x01\x00";

/// What bytes that are not a WebAssembly component are, as far as their
/// first bytes tell.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum NotAComponent {
    #[error("native code precompiled by wasmtime (a .cwasm of `node-runtime compile`, or another wasmtime artifact)")]
    Precompiled,
    #[error("a core WebAssembly module")]
    CoreModule,
    #[error("other bytes (they do not start with the component header `\\0asm` 0d 00 01 00)")]
    Other,
}

/// Whether `bytes` start as a WebAssembly component. Only the header is
/// read: the rest is validated by compiling.
pub fn check_component(bytes: &[u8]) -> Result<(), NotAComponent> {
    if bytes.starts_with(&COMPONENT_HEADER) {
        return Ok(());
    }
    // Named for a clearer refusal; the rule is the header above.
    if bytes.starts_with(b"\x7fELF")
        || super::precompiled::is_precompiled(bytes)
        || wasmtime::Engine::detect_precompiled(bytes).is_some()
    {
        Err(NotAComponent::Precompiled)
    } else if bytes.starts_with(b"\0asm\x01\x00\x00\x00") {
        Err(NotAComponent::CoreModule)
    } else {
        Err(NotAComponent::Other)
    }
}

/// Bytes from a network source that are not a component.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "{origin}: the artifact is {found}, not a WebAssembly component; HTTP and OCI sources may \
     deliver only components, compiled here, and precompiled code is accepted only from \
     NodeRuntime.AgentsDirectory: publish the agent's .wasm at this source instead"
)]
pub struct NetworkArtifactRefused {
    /// The URL or OCI reference the bytes came from.
    pub origin: String,
    pub found: NotAComponent,
}

/// [`check_component`] for bytes from `origin`, a network source.
pub fn check_network_artifact(origin: &str, bytes: &[u8]) -> Result<(), NetworkArtifactRefused> {
    check_component(bytes).map_err(|found| NetworkArtifactRefused {
        origin: origin.to_string(),
        found,
    })
}

/// What an artifact is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArtifactKind {
    /// WebAssembly, validated and compiled here (or refused, if it is not
    /// a component).
    Wasm,
    /// A `.cwasm` of `node-runtime compile`: native code, loaded.
    Precompiled,
}

/// What `bytes` of this trust are taken for: a `.cwasm` only from the
/// operator; from a network source only bytes that start as a component,
/// which are then compiled, never loaded as native code (whatever their
/// end looks like). Cheap: reads the header and the trailer.
pub(crate) fn classify(bytes: &[u8], trust: &ArtifactTrust) -> Result<ArtifactKind, InvalidAgent> {
    match trust {
        ArtifactTrust::Operator if super::precompiled::is_precompiled(bytes) => Ok(ArtifactKind::Precompiled),
        ArtifactTrust::Operator => Ok(ArtifactKind::Wasm),
        ArtifactTrust::Network { origin } => {
            check_network_artifact(origin, bytes).map_err(|refused| InvalidAgent(refused.to_string()))?;
            Ok(ArtifactKind::Wasm)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::precompiled;
    use super::*;

    fn network() -> ArtifactTrust {
        ArtifactTrust::Network {
            origin: "https://agents.test/echo/1.0.0.wasm".into(),
        }
    }

    #[test]
    fn a_cwasm_is_native_code_only_from_the_operator() {
        let cwasm = precompiled::seal(b"\x7fELF\x02\x01\x01\0 native code".to_vec());
        assert_eq!(
            classify(&cwasm, &ArtifactTrust::Operator),
            Ok(ArtifactKind::Precompiled)
        );
        let refused = classify(&cwasm, &network()).unwrap_err().to_string();
        assert!(refused.contains("https://agents.test/echo/1.0.0.wasm"), "{refused}");
        assert!(refused.contains("not a WebAssembly component"), "{refused}");
        assert!(classify(b"\0asm\x01\0\0\0", &network()).is_err(), "a core module");
        assert!(classify(b"", &network()).is_err());
    }

    #[test]
    fn network_bytes_with_a_cwasm_trailer_are_compiled_never_loaded() {
        let mut disguised = COMPONENT_HEADER.to_vec();
        disguised.extend_from_slice(&precompiled::seal(b"\x7fELF".to_vec()));
        assert_eq!(check_component(&disguised), Ok(()));
        assert_eq!(classify(&disguised, &network()), Ok(ArtifactKind::Wasm));
    }

    #[test]
    fn only_the_component_header_passes() {
        assert_eq!(check_component(b"\0asm\x0d\x00\x01\x00 and the rest"), Ok(()));
        assert_eq!(check_component(&COMPONENT_HEADER), Ok(()));
        assert_eq!(
            check_component(b"\0asm\x01\x00\x00\x00\x01"),
            Err(NotAComponent::CoreModule)
        );
        // Another component version or layer is not this header.
        assert_eq!(check_component(b"\0asm\x0c\x00\x01\x00"), Err(NotAComponent::Other));
        assert_eq!(check_component(b"\0asm\x0d\x00\x02\x00"), Err(NotAComponent::Other));
        assert_eq!(
            check_component(b"\0asm\x0d\x00\x01"),
            Err(NotAComponent::Other),
            "cut short"
        );
        assert_eq!(check_component(b""), Err(NotAComponent::Other));
        assert_eq!(check_component(b"<html>"), Err(NotAComponent::Other));
    }

    #[test]
    fn precompiled_code_is_named_with_or_without_our_trailer() {
        let elf = b"\x7fELF\x02\x01\x01\0 native code".to_vec();
        assert_eq!(check_component(&elf), Err(NotAComponent::Precompiled));
        let sealed = precompiled::seal(elf);
        assert_eq!(check_component(&sealed), Err(NotAComponent::Precompiled));
    }

    #[test]
    fn a_refusal_names_the_origin_and_where_native_code_may_come_from() {
        let refused = check_network_artifact("https://agents.test/echo/1.0.0.wasm", b"\x7fELF").unwrap_err();
        let message = refused.to_string();
        assert!(
            message.starts_with("https://agents.test/echo/1.0.0.wasm: "),
            "{message}"
        );
        assert!(message.contains("not a WebAssembly component"), "{message}");
        assert!(message.contains("NodeRuntime.AgentsDirectory"), "{message}");
    }
}
