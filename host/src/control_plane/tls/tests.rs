//! The control-plane TLS pieces, each alone: expiry warnings, failure
//! diagnosis, the reloading identity and the subject check.

use std::io;

use rustls::CertificateError;

use super::identity::load_identity;
use super::*;

#[test]
fn expiry_is_warned_within_seven_days_and_after() {
    let now = SystemTime::now();
    let path = Path::new("node-cert.pem");
    assert!(expiry_message("n", path, now + Duration::from_secs(8 * 86_400), now).is_none());
    let soon = expiry_message("n", path, now + Duration::from_secs(3 * 86_400 + 60), now).unwrap();
    assert!(soon.contains("expires in 3 days"), "{soon}");
    assert!(soon.contains("MTls.ClientCertificatePath node-cert.pem"), "{soon}");
    let past = expiry_message("n", path, now - Duration::from_secs(60), now).unwrap();
    assert!(past.contains("has expired"), "{past}");
}

#[test]
fn a_tls_failure_inside_an_io_error_is_explained() {
    let io = io::Error::other(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
    let text = describe(&io);
    assert!(text.contains("not issued by a trusted CA"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    // An alert only printed by a lower layer is still recognised.
    let printed = io::Error::other("connection error: received fatal alert: UnknownCA");
    assert!(
        describe(&printed).contains("CA it does not trust"),
        "{}",
        describe(&printed)
    );
}

#[test]
fn mtls_over_http_is_refused() {
    let options = TlsOptions {
        enabled: true,
        ..TlsOptions::default()
    };
    match ControlPlaneTls::configure("http://localhost:5109", &options) {
        Err(TlsError::NotHttps { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// The contents of the DER element at the start of `der`, and the rest.
fn der_element(der: &[u8]) -> (&[u8], &[u8]) {
    let (length, header) = match der[1] {
        short if short < 0x80 => (short as usize, 2),
        long => {
            let bytes = (long & 0x7f) as usize;
            let length = der[2..2 + bytes].iter().fold(0, |n, b| (n << 8) | *b as usize);
            (length, 2 + bytes)
        }
    };
    (&der[header..header + length], &der[header + length..])
}

fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            text.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    let lines: Vec<&str> = text
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).unwrap())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn pkcs8_and_sec1_keys_load_and_a_foreign_key_is_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "node-a");
    let cert = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    let provider = provider();

    let pkcs8_path = dir.path().join("pkcs8.pem");
    std::fs::write(&pkcs8_path, key.serialize_pem()).unwrap();
    let loaded = load_identity(&cert_path, &pkcs8_path, &provider).unwrap();
    assert_eq!(loaded.subject, "node-a");

    // PrivateKeyInfo { version, algorithm, privateKey: ECPrivateKey (SEC1) }
    let (info, _) = der_element(key.serialized_der());
    let (_, rest) = der_element(info);
    let (_, rest) = der_element(rest);
    let (sec1, _) = der_element(rest);
    let sec1_path = dir.path().join("sec1.pem");
    std::fs::write(&sec1_path, pem("EC PRIVATE KEY", sec1)).unwrap();
    assert!(
        std::fs::read_to_string(&sec1_path)
            .unwrap()
            .starts_with("-----BEGIN EC PRIVATE KEY-----")
    );
    load_identity(&cert_path, &sec1_path, &provider).unwrap();

    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    match load_identity(&cert_path, &other_path, &provider) {
        Err(TlsError::KeyMismatch { .. }) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a foreign key was accepted"),
    }
}
