//! TLS (rustls with the `ring` provider; no OpenSSL), optional client certificates (mTLS), and
//! reloading on SIGHUP.
//!
//! The server's rustls configuration sits behind a lock that each new connection reads once,
//! so [`TlsState::reload`] swaps certificate, key and client CA for new connections while open
//! streams carry on. A reload that fails keeps the old material (the caller logs why).

use std::{
    fs::File,
    io::BufReader,
    net::SocketAddr,
    path::Path,
    sync::{Arc, RwLock},
};

pub use crate::config::TlsFiles;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};

/// Installs rustls's `ring` crypto provider for the process, so that a dependency that
/// enables another provider cannot make TLS set-up fail. Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no PEM private key found", path.display()))
}

impl TlsFiles {
    /// Reads the files into a rustls server configuration (ALPN `h2`).
    ///
    /// # Errors
    /// A message naming the file and what is wrong with it.
    pub fn load(&self) -> Result<ServerConfig, String> {
        install_provider();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if self.client_auth_optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| format!("{}: {e}", ca.display()))?,
                )
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| format!("{}: {e}", self.key.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The TLS configuration in force, swapped by a reload.
#[derive(Debug, Clone)]
pub struct TlsState {
    files: TlsFiles,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsState {
    /// Loads `files`.
    ///
    /// # Errors
    /// As [`TlsFiles::load`].
    pub fn new(files: TlsFiles) -> Result<Self, String> {
        let config = Arc::new(files.load()?);
        Ok(Self {
            files,
            config: Arc::new(RwLock::new(config)),
        })
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.config.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Reads the files again and uses them for new connections.
    ///
    /// # Errors
    /// As [`TlsFiles::load`]; the old material stays in force.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = Arc::new(self.files.load()?);
        let mut g = match self.config.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = fresh;
        Ok(())
    }
}

/// The peer of a connection, put in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The subject (RFC 4514: most specific first, `,` between RDNs) of the client
    /// certificate, when one was presented over TLS.
    pub subject: Option<String>,
}

/// The RFC 4514 subject of a DER certificate (`CN=billing,O=Acme`).
pub fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = parsed
        .subject()
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let name = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map_or_else(|_| attr.attr_type().to_id_string(), str::to_string);
                    let value = attr.as_str().unwrap_or_default();
                    format!("{name}={}", escape(value))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Some(rdns.into_iter().rev().collect::<Vec<_>>().join(","))
}

/// RFC 4514 §2.4 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i + 1 == value.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
