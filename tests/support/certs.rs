//! Certificates made on the spot for the TLS tests (rcgen): a CA, server
//! certificates for `127.0.0.1`/`localhost` (good, expired, another CN)
//! and client certificates, written as PEM files where a node's
//! configuration can point at them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use node_runtime::dev_plane::PlaneTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key (PKCS#8), as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }

    fn leaf(&self, cn: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose, expired: bool) -> Leaf {
        self.leaf_until(cn, names, usage, expired, None)
    }

    fn leaf_until(
        &self,
        cn: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
        days_left: Option<u64>,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        if let Some(days) = days_left {
            let (year, month, day) = civil_date_in(days);
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self, cn: &str) -> Leaf {
        self.leaf(cn, loopback_names(), ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A server certificate for `names` only (not loopback).
    pub fn server_for(&self, cn: &str, names: &[&str]) -> Leaf {
        let names = names.iter().map(|name| name.to_string()).collect();
        self.leaf(cn, names, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// The same, but valid only during 2020.
    pub fn expired_server(&self, cn: &str) -> Leaf {
        self.leaf(cn, loopback_names(), ExtendedKeyUsagePurpose::ServerAuth, true)
    }

    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    /// A client certificate valid until midnight (UTC) `days` days from now.
    pub fn client_expiring_in(&self, cn: &str, days: u64) -> Leaf {
        self.leaf_until(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, false, Some(days))
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }
}

/// The UTC calendar date `days` days from today (proleptic Gregorian).
fn civil_date_in(days: u64) -> (i32, u8, u8) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    // Howard Hinnant's days-to-civil algorithm.
    let z = (now.as_secs() / 86_400 + days) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

fn loopback_names() -> Vec<String> {
    vec!["127.0.0.1".to_string(), "localhost".to_string()]
}

impl Leaf {
    /// Writes `<stem>-cert.pem` and `<stem>-key.pem`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}-cert.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    /// The key's base64 body, as it would appear if it leaked.
    pub fn key_body(&self) -> String {
        self.key_pem.lines().filter(|line| !line.starts_with("-----")).collect()
    }
}

/// A plane serving `server` and requiring client certificates from
/// `client_ca`, limited to `allowed_subjects` when not empty.
pub fn plane_tls(server: &Leaf, client_ca: &TestCa, allowed_subjects: &[&str]) -> PlaneTls {
    PlaneTls {
        certificate_chain: vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()],
        private_key: Arc::new(PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap()),
        client_ca: Some(vec![client_ca.der()]),
        allowed_subjects: allowed_subjects.iter().map(|s| s.to_string()).collect(),
        // Like the reference: any certificate from the CA may use any node id.
        bind_node_ids: false,
    }
}
