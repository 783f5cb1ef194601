//! Signed `.cwasm` files: precompiled code a network source may deliver.
//!
//! A `.cwasm` is native code (or Pulley bytecode the interpreter trusts as
//! much), so from an HTTP or OCI source the node takes one only when it
//! carries an Ed25519 signature by a key the operator configured
//! (`AgentStore.TrustedSigningKeys`). `node-runtime compile --sign KEY`
//! appends the signature to the sealed `.cwasm` of
//! [`precompiled`](super::precompiled):
//!
//! ```text
//! [ sealed .cwasm: artifact | SHA-256 | "node-runtime:cw1" ][ public key, 32 ][ signature, 64 ][ MAGIC, 16 ]
//! ```
//!
//! The signature is over [`CONTEXT`] and the artifact's SHA-256 as the
//! sealed trailer records it; [`verify`] checks the signature first, then
//! that the artifact hashes to that digest, so altered bytes, an altered
//! digest and an altered signature are each refused, all before wasmtime
//! is given anything to map. The public key in the trailer only names the
//! signer: it must be one of the configured keys, compared byte for byte.
//!
//! Keys are files in the formats openssl writes: the private key PKCS#8
//! PEM (`openssl genpkey -algorithm ed25519`), the public key
//! SubjectPublicKeyInfo PEM (`openssl pkey -pubout`); `node-runtime keygen`
//! writes the same pair.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Marks a signed `.cwasm` and its format version.
const MAGIC: &[u8; 16] = b"node-runtime:sg1";
const PUBLIC_KEY_LEN: usize = 32;
const SIGNATURE_LEN: usize = 64;
const TRAILER_LEN: usize = PUBLIC_KEY_LEN + SIGNATURE_LEN + MAGIC.len();
/// What a signature is over, before the digest: a signature made for
/// anything else with the same key never passes for one of these.
const CONTEXT: &[u8] = b"node-runtime signed .cwasm v1\0";
/// The DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) before its 32
/// key bytes: the algorithm 1.3.101.112, then a bit string.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The DER of an Ed25519 PKCS#8 v1 private key before its 32-byte seed:
/// version 0, the algorithm, then the seed as an octet string in an octet
/// string.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The same for v2 (with the public key after the seed), as ring writes it.
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// A short, stable name for messages: `ed25519:` and the first 8 bytes
    /// of the key's SHA-256, in hex.
    pub fn id(&self) -> String {
        format!("ed25519:{}", hex::encode(&Sha256::digest(self.0)[..8]))
    }

    /// From a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`): one
    /// block, nothing else, and not a weak key.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let blocks = pem.windows(11).filter(|window| *window == b"-----BEGIN ").count();
        if blocks > 1 {
            return Err(format!(
                "the file holds {blocks} PEM blocks (a private key among them, or several keys): give \
                 one public key per file"
            ));
        }
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|err| format!("not a PEM public key (-----BEGIN PUBLIC KEY-----): {err}"))?;
        let raw = der
            .as_ref()
            .strip_prefix(&SPKI_PREFIX[..])
            .and_then(|raw| <[u8; PUBLIC_KEY_LEN]>::try_from(raw).ok())
            .ok_or("a public key, but not an Ed25519 one")?;
        let key = PublicKey(raw);
        if key.is_weak() {
            return Err("an Ed25519 key of small order, for which anyone can forge a signature".into());
        }
        Ok(key)
    }

    /// Whether signatures can be forged for this key without its private
    /// half: a point of small order (the identity among them) makes the
    /// forgery R = identity, S = 0 verify for a message whose hash is a
    /// multiple of its order. Tried on 64 messages, such a key is caught
    /// but for a chance of (7/8)^64.
    fn is_weak(&self) -> bool {
        let mut forged = [0u8; SIGNATURE_LEN];
        forged[0] = 1; // R: the identity point's encoding; S: 0.
        (0u8..64).any(|n| UnparsedPublicKey::new(&ED25519, self.0).verify(&[n], &forged).is_ok())
    }

    /// As a SubjectPublicKeyInfo PEM, as `openssl pkey -pubout` writes it.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem("PUBLIC KEY", &der)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// A key file that cannot be used. `setting` names where the path came
/// from (`AgentStore.TrustedSigningKeys`, `--sign`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{setting} {}: {problem}; {fix}", path.display())]
pub struct KeyFileError {
    pub setting: String,
    pub path: PathBuf,
    pub problem: String,
    pub fix: &'static str,
}

/// The largest key file read: a PEM key is a few hundred bytes.
const KEY_FILE_BYTES: u64 = 64 << 10;

fn read_key_file(setting: &str, path: &Path, fix: &'static str) -> Result<Vec<u8>, KeyFileError> {
    use std::io::Read;
    let fail = |problem: String| KeyFileError {
        setting: setting.to_string(),
        path: path.to_path_buf(),
        problem,
        fix,
    };
    // A FIFO or device would block start-up, or read forever: a key is a
    // regular file.
    let metadata = std::fs::metadata(path).map_err(|err| fail(format!("cannot read it: {err}")))?;
    if !metadata.is_file() {
        return Err(fail("not a regular file".to_string()));
    }
    let file = std::fs::File::open(path).map_err(|err| fail(format!("cannot read it: {err}")))?;
    let mut bytes = Vec::new();
    file.take(KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| fail(format!("cannot read it: {err}")))?;
    if bytes.len() as u64 > KEY_FILE_BYTES {
        return Err(fail(format!("larger than a key file ({KEY_FILE_BYTES} bytes)")));
    }
    Ok(bytes)
}

const PUBLIC_KEY_FIX: &str = "give the public key as PEM, as `openssl pkey -in key.pem -pubout` or \
     `node-runtime keygen` writes it";
const PRIVATE_KEY_FIX: &str = "give an Ed25519 private key as PKCS#8 PEM, as `openssl genpkey -algorithm \
     ed25519` or `node-runtime keygen` writes it";

/// A public key the operator trusts to sign `.cwasm` files, and the file
/// it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub path: PathBuf,
    pub key: PublicKey,
}

impl TrustedKey {
    /// Reads a SubjectPublicKeyInfo PEM file; `setting` names where its
    /// path came from, for the error.
    pub fn read(setting: &str, path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_key_file(setting, path, PUBLIC_KEY_FIX)?;
        let key = PublicKey::from_pem(&bytes).map_err(|problem| KeyFileError {
            setting: setting.to_string(),
            path: path.to_path_buf(),
            problem,
            fix: PUBLIC_KEY_FIX,
        })?;
        Ok(TrustedKey {
            path: path.to_path_buf(),
            key,
        })
    }
}

/// The keys whose signatures make a network `.cwasm` acceptable. Empty
/// (the default): no `.cwasm` from the network at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(Arc<[PublicKey]>);

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut keys: Vec<PublicKey> = keys.into_iter().collect();
        keys.dedup();
        TrustedKeys(keys.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn contains(&self, key: &PublicKey) -> bool {
        self.0.contains(key)
    }

    /// The keys' ids, for messages.
    pub fn ids(&self) -> String {
        self.0.iter().map(PublicKey::id).collect::<Vec<_>>().join(", ")
    }
}

/// An Ed25519 private key, for `compile --sign`.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// Reads a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`).
    pub fn read(setting: &str, path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_key_file(setting, path, PRIVATE_KEY_FIX)?;
        let fail = |problem: String| KeyFileError {
            setting: setting.to_string(),
            path: path.to_path_buf(),
            problem,
            fix: PRIVATE_KEY_FIX,
        };
        let der = PrivatePkcs8KeyDer::from_pem_slice(&bytes).map_err(|err| {
            fail(format!(
                "not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----): {err}"
            ))
        })?;
        // openssl writes PKCS#8 v1 (no public key inside); ring's own
        // keys are v2. Both are checked for consistency where they can be.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|err| fail(format!("not an Ed25519 private key: {err}")))?;
        Ok(SigningKey(pair))
    }

    pub fn public_key(&self) -> PublicKey {
        let raw = self.0.public_key().as_ref();
        PublicKey(raw.try_into().expect("an Ed25519 public key is 32 bytes"))
    }

    /// A new key pair: the private key as PKCS#8 PEM, and its public key.
    /// Written as PKCS#8 v1 (RFC 8410), the form openssl writes and reads:
    /// openssl 3.0 refuses ring's own v2 encoding.
    pub fn generate() -> Result<(String, PublicKey), String> {
        let random = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&random).map_err(|err| format!("cannot generate a key: {err}"))?;
        let seed = pkcs8
            .as_ref()
            .strip_prefix(&PKCS8_V2_PREFIX[..])
            .and_then(|rest| rest.get(..32))
            .ok_or("ring encoded the key in an unexpected form")?;
        let v1 = [&PKCS8_V1_PREFIX[..], seed].concat();
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&v1).map_err(|err| format!("generated key unusable: {err}"))?;
        let key = SigningKey(pair).public_key();
        Ok((pem("PRIVATE KEY", &v1), key))
    }
}

/// Why a signed `.cwasm` is refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SignatureError {
    #[error(
        "it is signed by key {key}, which this node does not trust (AgentStore.TrustedSigningKeys: \
         {trusted}); sign it with a trusted key, or add the public half of {key} to that list"
    )]
    UntrustedKey { key: PublicKey, trusted: String },
    #[error(
        "its signature by key {key} does not verify: the signature or the recorded digest was \
         altered, or it was signed wrongly; sign the .cwasm again with `node-runtime compile --sign`"
    )]
    BadSignature { key: PublicKey },
    #[error(
        "its content does not match the SHA-256 signed by key {key} (expected {expected}, found \
         {found}): it was altered after signing, or damaged in transit; publish the signed .cwasm again"
    )]
    Altered {
        key: PublicKey,
        expected: String,
        found: String,
    },
    #[error("it ends in a signature, but the signed part is not a .cwasm of `node-runtime compile`")]
    Malformed,
}

/// True when `bytes` end with a signature trailer.
pub fn is_signed(bytes: &[u8]) -> bool {
    bytes.len() >= TRAILER_LEN && bytes.ends_with(MAGIC)
}

/// The sealed `.cwasm` inside `bytes`: without the signature trailer when
/// there is one, else all of it.
pub fn strip(bytes: &[u8]) -> &[u8] {
    if is_signed(bytes) {
        &bytes[..bytes.len() - TRAILER_LEN]
    } else {
        bytes
    }
}

/// The message a signature is over: [`CONTEXT`] and the artifact's digest.
fn message(digest: &[u8]) -> Vec<u8> {
    [CONTEXT, digest].concat()
}

/// Signs a sealed `.cwasm` (the output of
/// [`precompiled::seal`](super::precompiled::seal)).
pub fn sign(mut sealed: Vec<u8>, key: &SigningKey) -> Vec<u8> {
    debug_assert!(super::precompiled::is_precompiled(&sealed));
    let digest = super::precompiled::recorded_digest(&sealed).expect("a sealed .cwasm");
    let signature = key.0.sign(&message(digest));
    sealed.extend_from_slice(&key.public_key().0);
    sealed.extend_from_slice(signature.as_ref());
    sealed.extend_from_slice(MAGIC);
    sealed
}

/// Verifies a signed `.cwasm` ([`is_signed`]) against `trusted`: the key
/// is one of them, the signature holds, and the artifact is the one
/// signed. Reads and hashes; maps nothing.
pub fn verify(bytes: &[u8], trusted: &TrustedKeys) -> Result<PublicKey, SignatureError> {
    if !is_signed(bytes) {
        return Err(SignatureError::Malformed);
    }
    let (sealed, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let key = PublicKey(trailer[..PUBLIC_KEY_LEN].try_into().expect("32 bytes"));
    let signature = &trailer[PUBLIC_KEY_LEN..PUBLIC_KEY_LEN + SIGNATURE_LEN];
    if !trusted.contains(&key) {
        return Err(SignatureError::UntrustedKey {
            key,
            trusted: trusted.ids(),
        });
    }
    let recorded = super::precompiled::recorded_digest(sealed).ok_or(SignatureError::Malformed)?;
    UnparsedPublicKey::new(&ED25519, key.0)
        .verify(&message(recorded), signature)
        .map_err(|_| SignatureError::BadSignature { key })?;
    let artifact = &sealed[..sealed.len() - super::precompiled::TRAILER_LEN];
    let found = Sha256::digest(artifact);
    if found.as_slice() != recorded {
        return Err(SignatureError::Altered {
            key,
            expected: hex::encode(recorded),
            found: hex::encode(found),
        });
    }
    Ok(key)
}

/// `bytes` as a PEM block with `label`, 64 columns of base64.
fn pem(label: &str, bytes: &[u8]) -> String {
    let encoded = base64(bytes);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// Standard base64 with padding (RFC 4648), for the PEM files written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let group = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let bits = u32::from_be_bytes([0, group[0], group[1], group[2]]);
        for position in 0..4 {
            if position <= chunk.len() {
                out.push(ALPHABET[(bits >> (18 - 6 * position) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::precompiled;
    use super::*;

    fn key() -> SigningKey {
        let (pem, public) = SigningKey::generate().unwrap();
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(der.secret_pkcs8_der().starts_with(&PKCS8_V1_PREFIX), "written as v1");
        let key = SigningKey(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).unwrap());
        assert_eq!(key.public_key(), public);
        key
    }

    fn signed(key: &SigningKey) -> Vec<u8> {
        sign(precompiled::seal(b"\x7fELF pretend artifact".to_vec()), key)
    }

    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn weak_keys_and_files_of_several_blocks_are_refused() {
        let mut identity = [0u8; PUBLIC_KEY_LEN];
        identity[0] = 1;
        let err = PublicKey::from_pem(PublicKey(identity).to_pem().as_bytes()).unwrap_err();
        assert!(err.contains("small order"), "{err}");
        let (_, good) = SigningKey::generate().unwrap();
        assert!(!good.is_weak());
        let two = format!("{}{}", good.to_pem(), good.to_pem());
        let err = PublicKey::from_pem(two.as_bytes()).unwrap_err();
        assert!(err.contains("2 PEM blocks"), "{err}");
    }

    #[test]
    fn a_public_key_survives_its_pem() {
        let key = key().public_key();
        assert_eq!(PublicKey::from_pem(key.to_pem().as_bytes()), Ok(key));
        assert!(PublicKey::from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
    }

    #[test]
    fn a_signature_by_a_trusted_key_verifies_and_strips_to_the_sealed_cwasm() {
        let key = key();
        let bytes = signed(&key);
        assert!(is_signed(&bytes));
        assert_eq!(
            verify(&bytes, &TrustedKeys::new([key.public_key()])),
            Ok(key.public_key())
        );
        assert!(precompiled::is_precompiled(strip(&bytes)));
        assert_eq!(
            precompiled::unseal(strip(&bytes)),
            Err(precompiled::PrecompiledError::NotAComponent)
        );
    }

    #[test]
    fn another_key_a_flipped_signature_digest_or_artifact_byte_is_refused() {
        let (key, other) = (key(), key());
        let trusted = TrustedKeys::new([key.public_key()]);
        let bytes = signed(&key);

        let by_other = signed(&other);
        assert!(matches!(
            verify(&by_other, &trusted),
            Err(SignatureError::UntrustedKey { .. })
        ));

        // The trusted key's name on another key's signature.
        let mut forged = by_other.clone();
        let at = forged.len() - TRAILER_LEN;
        forged[at..at + PUBLIC_KEY_LEN].copy_from_slice(&key.public_key().0);
        assert!(matches!(
            verify(&forged, &trusted),
            Err(SignatureError::BadSignature { .. })
        ));

        let mut flipped_signature = bytes.clone();
        let at = flipped_signature.len() - MAGIC.len() - 1;
        flipped_signature[at] ^= 1;
        assert!(matches!(
            verify(&flipped_signature, &trusted),
            Err(SignatureError::BadSignature { .. })
        ));

        let mut flipped_digest = bytes.clone();
        let at = flipped_digest.len() - TRAILER_LEN - precompiled::TRAILER_LEN;
        flipped_digest[at] ^= 1;
        assert!(matches!(
            verify(&flipped_digest, &trusted),
            Err(SignatureError::BadSignature { .. })
        ));

        let mut flipped_artifact = bytes.clone();
        flipped_artifact[6] ^= 1;
        assert!(matches!(
            verify(&flipped_artifact, &trusted),
            Err(SignatureError::Altered { .. })
        ));

        assert!(matches!(
            verify(&bytes, &TrustedKeys::default()),
            Err(SignatureError::UntrustedKey { .. })
        ));
    }
}
