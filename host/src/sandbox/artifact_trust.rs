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
//! which the node validates and compiles itself, or a `.cwasm` signed by
//! a key the operator configured (`AgentStore.TrustedSigningKeys`,
//! [`signature`](super::signature)), verified before it is kept and again
//! before it is mapped. Anything else from the network is refused
//! ([`NetworkArtifactRefused`]) before it is kept in the download cache,
//! and again before it is compiled or loaded ([`classify`]): a download
//! cache filled by an older node, or under other keys, may hold one.

use std::fmt;

use thiserror::Error;

use super::agent::InvalidAgent;
use super::signature::{self, PublicKey, SignatureError, TrustedKeys};

/// Where an artifact's bytes came from, which decides what they may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactTrust {
    /// The operator's own file: `NodeRuntime.AgentsDirectory`, or a file
    /// named to `run-agent`. A component, or a `.cwasm` of native code as
    /// trusted as the file.
    Operator,
    /// Bytes from a network source, named by `origin` (a URL or an OCI
    /// reference): a WebAssembly component, compiled here, or a `.cwasm`
    /// signed by a trusted key.
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
        || signature::is_signed(bytes)
        || wasmtime::Engine::detect_precompiled(bytes).is_some()
    {
        Err(NotAComponent::Precompiled)
    } else if bytes.starts_with(b"\0asm\x01\x00\x00\x00") {
        Err(NotAComponent::CoreModule)
    } else {
        Err(NotAComponent::Other)
    }
}

/// Bytes from a network source this node does not take.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{origin}: {refusal}")]
pub struct NetworkArtifactRefused {
    /// The URL or OCI reference the bytes came from.
    pub origin: String,
    pub refusal: Refusal,
}

/// Why bytes from a network source are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a component, and not a `.cwasm` signed for a node with trusted
    /// keys. `keys` says whether this node trusts any.
    NotAComponent { found: NotAComponent, keys: bool },
    /// A `.cwasm` without a signature, on a node that trusts signing keys.
    Unsigned,
    /// A signed `.cwasm` whose signature does not make it acceptable.
    Signature(SignatureError),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAComponent { found, keys: false } => write!(
                f,
                "the artifact is {found}, not a WebAssembly component; HTTP and OCI sources may \
                 deliver only components, compiled here, and precompiled code is accepted only \
                 from NodeRuntime.AgentsDirectory, or from these sources when signed by a key in \
                 AgentStore.TrustedSigningKeys (none is set): publish the agent's .wasm at this \
                 source instead"
            ),
            Refusal::NotAComponent { found, keys: true } => write!(
                f,
                "the artifact is {found}, neither a WebAssembly component nor a .cwasm signed with \
                 `node-runtime compile --sign`; publish the agent's .wasm, or its signed .cwasm, \
                 at this source instead"
            ),
            Refusal::Unsigned => write!(
                f,
                "the artifact is a .cwasm without a signature; precompiled code from HTTP and OCI \
                 sources must be signed by a key in AgentStore.TrustedSigningKeys: sign it with \
                 `node-runtime compile --sign KEY`, or publish the agent's .wasm instead"
            ),
            Refusal::Signature(error) => write!(f, "the signed .cwasm is refused before it is loaded: {error}"),
        }
    }
}

/// What a network source may deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkArtifact {
    /// A WebAssembly component, to be compiled here.
    Component,
    /// A `.cwasm` whose signature by this trusted key verified.
    Signed(PublicKey),
}

/// Whether bytes from `origin`, a network source, may be taken: a
/// component, or a `.cwasm` signed by one of `keys` (verified here, which
/// hashes it). Anything else is refused, saying why.
pub fn check_network_artifact(
    origin: &str,
    bytes: &[u8],
    keys: &TrustedKeys,
) -> Result<NetworkArtifact, NetworkArtifactRefused> {
    let refused = |refusal| NetworkArtifactRefused {
        origin: origin.to_string(),
        refusal,
    };
    if !keys.is_empty() {
        if signature::is_signed(bytes) {
            return signature::verify(bytes, keys)
                .map(NetworkArtifact::Signed)
                .map_err(|error| refused(Refusal::Signature(error)));
        }
        if super::precompiled::is_precompiled(bytes) {
            return Err(refused(Refusal::Unsigned));
        }
    }
    check_component(bytes)
        .map(|()| NetworkArtifact::Component)
        .map_err(|found| {
            refused(Refusal::NotAComponent {
                found,
                keys: !keys.is_empty(),
            })
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
    /// A `.cwasm` from the network whose signature by a trusted key
    /// verified: loaded too.
    SignedPrecompiled,
}

impl ArtifactKind {
    pub(crate) fn is_precompiled(self) -> bool {
        matches!(self, ArtifactKind::Precompiled | ArtifactKind::SignedPrecompiled)
    }
}

/// What `bytes` of this trust are taken for: a `.cwasm` from the
/// operator, signed or not; from a network source a `.cwasm` only when
/// its signature by one of `keys` verifies, else only bytes that start as
/// a component, which are then compiled, never loaded as native code
/// (whatever their end looks like). Reads the header and the trailer, and
/// for a signed `.cwasm` from the network hashes it.
pub(crate) fn classify(bytes: &[u8], trust: &ArtifactTrust, keys: &TrustedKeys) -> Result<ArtifactKind, InvalidAgent> {
    match trust {
        ArtifactTrust::Operator if super::precompiled::is_precompiled(bytes) || signature::is_signed(bytes) => {
            Ok(ArtifactKind::Precompiled)
        }
        ArtifactTrust::Operator => Ok(ArtifactKind::Wasm),
        ArtifactTrust::Network { origin } => match check_network_artifact(origin, bytes, keys) {
            Ok(NetworkArtifact::Component) => Ok(ArtifactKind::Wasm),
            Ok(NetworkArtifact::Signed(_)) => Ok(ArtifactKind::SignedPrecompiled),
            Err(refused) => Err(InvalidAgent(refused.to_string())),
        },
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
            classify(&cwasm, &ArtifactTrust::Operator, &TrustedKeys::default()),
            Ok(ArtifactKind::Precompiled)
        );
        let refused = classify(&cwasm, &network(), &TrustedKeys::default())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("https://agents.test/echo/1.0.0.wasm"), "{refused}");
        assert!(refused.contains("not a WebAssembly component"), "{refused}");
        let none = TrustedKeys::default();
        assert!(
            classify(b"\0asm\x01\0\0\0", &network(), &none).is_err(),
            "a core module"
        );
        assert!(classify(b"", &network(), &none).is_err());
    }

    #[test]
    fn a_network_cwasm_is_taken_only_signed_by_a_trusted_key() {
        let (pem, trusted) = signature::SigningKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, pem).unwrap();
        let key = signature::SigningKey::read("--sign", &path).unwrap();
        let sealed = precompiled::seal(b"\x7fELF\x02\x01\x01\0 native code".to_vec());
        let signed = signature::sign(sealed.clone(), &key);

        // No keys (the default): no .cwasm from the network, signed or not.
        let none = TrustedKeys::default();
        let refused = classify(&signed, &network(), &none).unwrap_err().to_string();
        assert!(refused.contains("not a WebAssembly component"), "{refused}");
        assert!(
            refused.contains("AgentStore.TrustedSigningKeys (none is set)"),
            "{refused}"
        );

        let keys = TrustedKeys::new([trusted]);
        assert_eq!(
            classify(&signed, &network(), &keys),
            Ok(ArtifactKind::SignedPrecompiled)
        );
        let refused = classify(&sealed, &network(), &keys).unwrap_err().to_string();
        assert!(refused.contains("without a signature"), "{refused}");
        assert!(refused.contains("compile --sign"), "{refused}");
        // The operator's files need no signature, and may carry one.
        assert_eq!(
            classify(&signed, &ArtifactTrust::Operator, &none),
            Ok(ArtifactKind::Precompiled)
        );
    }

    #[test]
    fn network_bytes_with_a_cwasm_trailer_are_compiled_never_loaded() {
        let mut disguised = COMPONENT_HEADER.to_vec();
        disguised.extend_from_slice(&precompiled::seal(b"\x7fELF".to_vec()));
        assert_eq!(check_component(&disguised), Ok(()));
        assert_eq!(
            classify(&disguised, &network(), &TrustedKeys::default()),
            Ok(ArtifactKind::Wasm)
        );
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
        let refused = check_network_artifact(
            "https://agents.test/echo/1.0.0.wasm",
            b"\x7fELF",
            &TrustedKeys::default(),
        )
        .unwrap_err();
        let message = refused.to_string();
        assert!(
            message.starts_with("https://agents.test/echo/1.0.0.wasm: "),
            "{message}"
        );
        assert!(message.contains("not a WebAssembly component"), "{message}");
        assert!(message.contains("NodeRuntime.AgentsDirectory"), "{message}");
    }
}
