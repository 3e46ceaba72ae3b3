//! Test certificates: a CA and what it signs, made with rcgen, as PEM files.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::{path::PathBuf, time::Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use switchboard::config::TlsFiles;

/// A CA and certificates it signed, as PEM files in a directory of their own.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-sec-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir };
        pki.issue("ca", "client", &["billing"]);
        pki
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// (Re)creates `<ca>.pem`, `server.pem`/`server.key` for localhost and 127.0.0.1, and one
    /// client certificate `<client>-<cn>.pem`/`.key` per common name.
    pub fn issue(&self, ca_name: &str, client: &str, cns: &[&str]) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{ca_name} test CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        sp.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let sk = KeyPair::generate().unwrap();
        let server = sp.signed_by(&sk, &ca, &ca_key).unwrap();
        std::fs::write(self.path(&format!("{ca_name}.pem")), ca.pem()).unwrap();
        std::fs::write(self.path("server.pem"), server.pem()).unwrap();
        std::fs::write(self.path("server.key"), sk.serialize_pem()).unwrap();
        for cn in cns {
            let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
            cp.distinguished_name.push(DnType::CommonName, *cn);
            let ck = KeyPair::generate().unwrap();
            let c = cp.signed_by(&ck, &ca, &ca_key).unwrap();
            std::fs::write(self.path(&format!("{client}-{cn}.pem")), c.pem()).unwrap();
            std::fs::write(self.path(&format!("{client}-{cn}.key")), ck.serialize_pem()).unwrap();
        }
    }

    /// A client certificate for `cn`, signed by a fresh CA `<ca_name>` written beside the
    /// others, valid only in 2001: long expired.
    pub fn issue_expired(&self, ca_name: &str, cn: &str) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name.push(DnType::CommonName, cn);
        cp.not_before = rcgen::date_time_ymd(2001, 1, 1);
        cp.not_after = rcgen::date_time_ymd(2001, 12, 31);
        let ck = KeyPair::generate().unwrap();
        let c = cp.signed_by(&ck, &ca, &ca_key).unwrap();
        std::fs::write(self.path(&format!("{ca_name}.pem")), ca.pem()).unwrap();
        std::fs::write(self.path(&format!("expired-{cn}.pem")), c.pem()).unwrap();
        std::fs::write(self.path(&format!("expired-{cn}.key")), ck.serialize_pem()).unwrap();
    }

    pub fn tls(&self, client_ca: bool, optional: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: client_ca.then(|| self.path("ca.pem")),
            client_auth_optional: optional,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
