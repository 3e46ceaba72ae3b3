//! Authentication (bearer tokens, mTLS certificate subjects) and per-address permissions,
//! loaded from `--auth-file` (TOML), after NATS's per-subject permissions.
//!
//! ```toml
//! [[principal]]
//! name = "orders-service"
//! token_sha256 = "9f86d0..."          # hex SHA-256 of a bearer token (`switchboard token new`)
//! send = ["orders.>"]
//! receive = ["orders.*", "audit.>"]   # Recv, Subscribe, Ack/Nack/ExtendLease, groups
//! admin = false                       # the Admin service
//! [[principal]]
//! name = "billing"
//! client_cert_subject = "CN=billing"  # the mTLS certificate's subject (RFC 4514), exactly
//! receive = [">"]
//! ```
//!
//! [`AuthLayer`] wraps a service: it authenticates every call before the service sees it
//! (`UNAUTHENTICATED` for missing or unknown credentials) and puts the [`Principal`] in the
//! request's extensions; the services then check the action on the address before any state
//! changes ([`authorize`], `PERMISSION_DENIED` naming the principal, the action and the
//! address). Tokens are compared in constant time on their SHA-256. Health and reflection are
//! not wrapped: load balancers and grpcurl need them. Nothing logs a token.

use std::{
    convert::Infallible,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{body::Body, server::NamedService, Status};

use crate::{error::BrokerError, metrics::Metrics, validate::Pattern};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    principal: Vec<PrincipalEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    name: String,
    token_sha256: Option<String>,
    client_cert_subject: Option<String>,
    #[serde(default)]
    send: Vec<String>,
    #[serde(default)]
    receive: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// What a principal may do on an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send, SendStream, SendBatch.
    Send,
    /// Recv, Subscribe, CreateGroup, DeleteGroup, Ack, Nack, ExtendLease.
    Receive,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Self::Send => "send to",
            Self::Receive => "receive from",
        }
    }
}

/// An authenticated client and its permissions.
#[derive(Debug)]
pub struct Principal {
    /// Its name in the auth file.
    pub name: String,
    token: Option<[u8; 32]>,
    subject: Option<String>,
    send: Vec<Vec<String>>,
    receive: Vec<Vec<String>>,
    /// Whether it may use the Admin service.
    pub admin: bool,
}

/// Whether permission pattern `perm` covers `target` (an address, or a subscription pattern):
/// `>` covers one or more remaining tokens, `*` exactly one token (a literal or `*`), a literal
/// only itself.
fn covers(perm: &[String], target: &[&str]) -> bool {
    match (perm.split_first(), target.split_first()) {
        (None, None) => true,
        (Some((p, _)), Some(_)) if p == ">" => true,
        (Some((p, prest)), Some((t, trest))) => {
            let token_ok = if p == "*" { *t != ">" } else { p == t };
            token_ok && covers(prest, trest)
        }
        _ => false,
    }
}

impl Principal {
    /// Whether it may do `action` on `target` (an address or a subscription pattern).
    ///
    /// # Errors
    /// [`BrokerError::PermissionDenied`] naming the principal, the action and the address.
    pub fn check(&self, action: Action, target: &str) -> Result<(), BrokerError> {
        let perms = match action {
            Action::Send => &self.send,
            Action::Receive => &self.receive,
        };
        let tokens: Vec<&str> = target.split('.').collect();
        if perms.iter().any(|p| covers(p, &tokens)) {
            Ok(())
        } else {
            Err(BrokerError::PermissionDenied {
                principal: self.name.clone(),
                action: action.verb(),
                address: target.chars().take(255).collect(),
            })
        }
    }
}

/// The principals of one auth file.
#[derive(Debug)]
pub struct Auth {
    principals: Vec<Arc<Principal>>,
}

fn patterns(name: &str, field: &str, list: &[String]) -> Result<Vec<Vec<String>>, String> {
    list.iter()
        .map(|p| {
            Pattern::parse(p.as_str())
                .map(|p| p.as_str().split('.').map(str::to_string).collect())
                .map_err(|e| format!("principal {name:?}: {field}: {p:?}: {e}"))
        })
        .collect()
}

impl Auth {
    /// Parses an auth file's text.
    ///
    /// # Errors
    /// A message with the line and column of a TOML error, or naming the principal and the
    /// field that is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: AuthFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut principals = Vec::new();
        for p in file.principal {
            let token = match &p.token_sha256 {
                Some(hex) => {
                    let bytes = decode_hex(hex).ok_or_else(|| {
                        format!(
                            "principal {:?}: token_sha256: expected 64 hex digits (SHA-256)",
                            p.name
                        )
                    })?;
                    Some(bytes)
                }
                None => None,
            };
            if token.is_some() == p.client_cert_subject.is_some() {
                return Err(format!(
                    "principal {:?}: give exactly one of token_sha256 and client_cert_subject",
                    p.name
                ));
            }
            principals.push(Arc::new(Principal {
                send: patterns(&p.name, "send", &p.send)?,
                receive: patterns(&p.name, "receive", &p.receive)?,
                name: p.name,
                token,
                subject: p.client_cert_subject,
                admin: p.admin,
            }));
        }
        Ok(Self { principals })
    }

    /// Reads and parses `path`.
    ///
    /// # Errors
    /// As [`Auth::parse`], prefixed with the path; or why the file cannot be read.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--auth-file {}: {e}", path.display()))
    }

    /// The principal a bearer token or a client certificate subject belongs to. Token hashes
    /// are compared in constant time, against every principal.
    ///
    /// # Errors
    /// `"missing"` when neither is given, `"unknown"` when nothing matches.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        subject: Option<&str>,
    ) -> Result<Arc<Principal>, &'static str> {
        if let Some(token) = token {
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let mut found = None;
            for p in &self.principals {
                if let Some(t) = &p.token {
                    if bool::from(t.ct_eq(&hash)) {
                        found = Some(Arc::clone(p));
                    }
                }
            }
            return found.ok_or("unknown");
        }
        if let Some(subject) = subject {
            return self
                .principals
                .iter()
                .find(|p| p.subject.as_deref() == Some(subject))
                .cloned()
                .ok_or("unknown");
        }
        Err("missing")
    }
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a token, as `token_sha256` stores it.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh random token: 256 bits, URL-safe base64 without padding.
pub fn new_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The auth configuration in force, replaced on SIGHUP. `None`: authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Authority(Arc<RwLock<Option<Arc<Auth>>>>);

impl Authority {
    /// An authority enforcing `auth` (`None`: off).
    pub fn new(auth: Option<Auth>) -> Self {
        Self(Arc::new(RwLock::new(auth.map(Arc::new))))
    }

    /// The configuration now.
    pub fn current(&self) -> Option<Arc<Auth>> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the configuration (a reload).
    pub fn replace(&self, auth: Auth) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = Some(Arc::new(auth));
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.current().is_some()
    }
}

/// Checks `action` on `target` for `caller` (the request's principal); passes when
/// authentication is off. A refusal is counted as `denied`.
///
/// # Errors
/// `PERMISSION_DENIED` naming the principal, the action and the address; `UNAUTHENTICATED`
/// when authentication is on and the request carries no principal.
pub fn authorize(
    authority: &Authority,
    caller: Option<&Arc<Principal>>,
    action: Action,
    target: &str,
    metrics: &Metrics,
) -> Result<(), BrokerError> {
    if !authority.enabled() {
        return Ok(());
    }
    let checked = caller
        .ok_or(BrokerError::Unauthenticated("missing credentials"))?
        .check(action, target);
    if checked.is_err() {
        metrics.auth_failure("denied");
    }
    checked
}

/// Wraps a service with authentication; with `admin_only`, the principal must also have
/// `admin = true`. See the module docs.
#[derive(Debug, Clone)]
pub struct AuthLayer<S> {
    inner: S,
    authority: Authority,
    metrics: Arc<Metrics>,
    admin_only: bool,
}

impl<S> AuthLayer<S> {
    /// Authenticates calls to `inner` against `authority`.
    pub fn new(inner: S, authority: Authority, metrics: Arc<Metrics>, admin_only: bool) -> Self {
        Self {
            inner,
            authority,
            metrics,
            admin_only,
        }
    }
}

impl<S: NamedService> NamedService for AuthLayer<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for AuthLayer<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Some(auth) = self.authority.current() else {
            return Box::pin(self.inner.call(request));
        };
        let token = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let subject = request
            .extensions()
            .get::<super::tls::PeerInfo>()
            .and_then(|p| p.subject.as_deref());
        let denied = match auth.authenticate(token, subject) {
            Ok(principal) if self.admin_only && !principal.admin => {
                self.metrics.auth_failure("denied");
                Some(Status::permission_denied(format!(
                    "principal {:?} may not use the Admin service (admin = false)",
                    principal.name
                )))
            }
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                None
            }
            Err(reason) => {
                self.metrics.auth_failure(reason);
                Some(Status::unauthenticated(match reason {
                    "missing" => "missing credentials: send `authorization: Bearer TOKEN` or a client certificate",
                    _ => "unknown credentials",
                }))
            }
        };
        match denied {
            Some(status) => {
                if super::admission::REJECTION_LOGS.allow("request rejected") {
                    tracing::info!(
                        path = request.uri().path(),
                        code = crate::metrics::code_name(status.code()),
                        reason = status.message(),
                        "request rejected"
                    );
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
            None => Box::pin(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(send: &[&str], receive: &[&str]) -> Principal {
        let list = |v: &[&str]| {
            v.iter()
                .map(|p| p.split('.').map(str::to_string).collect())
                .collect()
        };
        Principal {
            name: "p".into(),
            token: None,
            subject: None,
            send: list(send),
            receive: list(receive),
            admin: false,
        }
    }

    #[test]
    fn permission_patterns() {
        let p = principal(&["orders.>"], &["orders.*", "audit.>"]);
        assert!(p.check(Action::Send, "orders.eu").is_ok());
        assert!(p.check(Action::Send, "orders.eu.created").is_ok());
        assert!(
            p.check(Action::Send, "orders").is_err(),
            "`>` needs one more token"
        );
        assert!(p.check(Action::Send, "ordersX.y").is_err());
        assert!(p.check(Action::Receive, "orders.eu").is_ok());
        assert!(
            p.check(Action::Receive, "orders.eu.x").is_err(),
            "`*` is one token"
        );
        assert!(
            p.check(Action::Receive, "orders.*").is_ok(),
            "a pattern inside the permission"
        );
        assert!(
            p.check(Action::Receive, "orders.>").is_err(),
            "wider than the permission"
        );
        assert!(p.check(Action::Receive, "audit.>").is_ok());
        let e = p.check(Action::Send, "billing.x").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.to_string().contains("\"p\"") && e.to_string().contains("send to"));
    }

    #[test]
    fn tokens_and_subjects() {
        let token = new_token();
        assert_eq!(token.len(), 43, "256 bits in URL-safe base64");
        let text = format!(
            "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nsend = [\">\"]\n\n[[principal]]\nname = \"b\"\nclient_cert_subject = \"CN=billing\"\n",
            token_sha256(&token)
        );
        let auth = Auth::parse(&text).unwrap();
        assert_eq!(auth.authenticate(Some(&token), None).unwrap().name, "a");
        assert_eq!(
            auth.authenticate(Some("nope"), None).unwrap_err(),
            "unknown"
        );
        assert_eq!(
            auth.authenticate(None, Some("CN=billing")).unwrap().name,
            "b"
        );
        assert_eq!(auth.authenticate(None, None).unwrap_err(), "missing");
    }

    #[test]
    fn file_errors_name_the_line_or_the_field() {
        let e = Auth::parse("[[principal]]\nname = \"a\"\nsend = [\n").unwrap_err();
        assert!(e.contains("line"), "{e}");
        let e = Auth::parse("[[principal]]\nname = \"a\"\ntoken_sha256 = \"xyz\"\n").unwrap_err();
        assert!(e.contains("token_sha256"), "{e}");
        let e = Auth::parse("[[principal]]\nname = \"a\"\n").unwrap_err();
        assert!(e.contains("exactly one"), "{e}");
        let e = Auth::parse(&format!(
            "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nsend = [\"a.>.b\"]\n",
            "0".repeat(64)
        ))
        .unwrap_err();
        assert!(e.contains("send"), "{e}");
    }
}
