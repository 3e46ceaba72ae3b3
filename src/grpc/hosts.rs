//! Which `Host` and `Origin` a listener answers to: protection against DNS rebinding.
//!
//! A page on `http://evil.example:9090` whose name the attacker re-points at `127.0.0.1` is, to
//! the browser, the same origin as the broker's listener on loopback: it may read `/metrics`,
//! list addresses and delete them through the console's gRPC-Web API, with no CORS check, on
//! any machine whose browser can reach the listener. What gives it away is the name: its
//! requests carry `Host: evil.example:9090` and, on a POST, `Origin: http://evil.example:9090`.
//!
//! [`HostGuard`] refuses such requests before any service sees them:
//!
//! - **The HTTP listener** (`--http-listen`: console, `/metrics`, gRPC-Web) checks `Host` (and
//!   the request URI's authority, if any): a foreign one gets `421 Misdirected Request`; and
//!   `Origin` when present: a foreign one (or `null`) gets `403 Forbidden`. A request without
//!   `Host` (HTTP/1.0) is not from a browser and passes.
//! - **The gRPC port** checks `Origin` only, when present. Native gRPC clients dial the broker
//!   under any name (a service name, a load balancer's) and send no `Origin`, so `Host` cannot
//!   be checked there; browsers send `Origin` on every POST, and gRPC-Web accepts nothing but
//!   POST (tonic-web answers other methods with 405), so every browser call that could act is
//!   checked. An origin listed in `--cors-origin` is allowed too.
//!
//! Allowed by default ([`AllowedHosts`]): `localhost` and every loopback IP (`127.0.0.0/8`,
//! `[::1]`), with any port, and the listener's own bound IP; when it is bound to an unspecified
//! address (`0.0.0.0`, `[::]`), any IP literal (a rebinding attack needs a DNS name: an IP
//! literal cannot be re-pointed). Other names must be listed in `--http-allowed-hosts`; `*`
//! turns the check off.
//!
//! Refusals are counted in `switchboard_http_requests_refused_total{reason}` (`host`,
//! `origin`) and logged within the rejection log budget.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::{self, TryFutureExt};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};

use super::admission::REJECTION_LOGS;
use crate::metrics::Metrics;

/// The flag and variable named in refusals and errors.
const FLAG: &str = "--http-allowed-hosts (SWITCHBOARD_HTTP_ALLOWED_HOSTS)";
/// The longest DNS name (RFC 1035), in bytes.
const MAX_NAME_BYTES: usize = 253;

/// The host names and IPs allowed besides the defaults (see the module docs), from
/// `--http-allowed-hosts`. The default allows the defaults only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    any: bool,
    /// Lowercase, without a trailing dot.
    names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl AllowedHosts {
    /// Parses `--http-allowed-hosts` entries: `*` (any host), a DNS name
    /// (`console.example.com`, matched case-insensitively) or an IP (`10.0.0.5`, `fd00::1` or
    /// `[fd00::1]`), each without a scheme or a port (any port is allowed). Empty entries are
    /// skipped.
    ///
    /// # Errors
    /// A message naming the flag, the entry and what is wrong with it.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut allowed = Self::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            let bad = |why: &str| format!("--http-allowed-hosts {entry:?}: {why}");
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                allowed.any = true;
                continue;
            }
            if entry.contains("://") || entry.contains(['/', '?', '#', '@']) {
                return Err(bad(
                    "give a host name or an IP only, without a scheme, a path or a user",
                ));
            }
            let bracketed = entry
                .strip_prefix('[')
                .map(|rest| {
                    rest.strip_suffix(']').ok_or_else(|| {
                        bad("a bracketed IPv6 address must end with ']', without a port")
                    })
                })
                .transpose()?;
            if let Some(ip) = bracketed {
                let ip: IpAddr = ip.parse().map_err(|_| bad("is not an IPv6 address"))?;
                allowed.ips.push(ip.to_canonical());
                continue;
            }
            if let Ok(ip) = entry.parse::<IpAddr>() {
                allowed.ips.push(ip.to_canonical());
                continue;
            }
            if entry.contains(':') {
                return Err(bad(
                    "give the host without a port (every port of an allowed host is allowed)",
                ));
            }
            let name = normalize(entry);
            if name.is_empty()
                || name.len() > MAX_NAME_BYTES
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(bad(&format!(
                    "is not a host name (letters, digits, '-', '_', '.'; at most {MAX_NAME_BYTES} bytes)"
                )));
            }
            allowed.names.push(name);
        }
        Ok(allowed)
    }

    /// Whether every host is allowed (`*`).
    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// Whether `host` (a name or an IP, IPv6 without brackets, no port) is allowed on a
    /// listener bound to `own`.
    pub fn allows(&self, host: &str, own: Option<IpAddr>) -> bool {
        if self.any {
            return true;
        }
        let host = normalize(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            return ip.is_loopback()
                || own.is_some_and(|own| own.is_unspecified() || own.to_canonical() == ip)
                || self.ips.contains(&ip);
        }
        host == "localhost" || self.names.contains(&host)
    }
}

/// Lowercase, without one trailing dot (`Localhost.` is `localhost`).
fn normalize(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`), IPv6 without its brackets;
/// `None` when it is malformed (empty, a user part, a path, a bad port).
fn host_of(authority: &str) -> Option<&str> {
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b"@/?#\\".contains(&b))
    {
        return None;
    }
    let port_ok = |p: &str| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(port) if port_ok(port) => host,
            None if after.is_empty() => host,
            _ => return None,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port_ok(port) => host,
            Some(_) => return None,
            None => authority,
        }
    };
    (!host.is_empty()).then_some(host)
}

/// Why a request was refused: its status and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 421 for a foreign `Host`, 403 for a foreign `Origin`, 400 for a malformed one.
    pub status: StatusCode,
    /// `host` or `origin`: the metric's reason label.
    pub what: &'static str,
    /// The plain-text reason sent back, naming the value and the flag.
    pub reason: String,
}

impl Refusal {
    fn response<B>(&self) -> Response<Either<B, Full<Bytes>>> {
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "{}\n",
            self.reason
        )))));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[derive(Debug)]
struct Policy {
    allowed: AllowedHosts,
    /// The listener's bound IP.
    own: Option<IpAddr>,
    /// Check `Host` (the HTTP listener) or only `Origin` (the gRPC port).
    check_host: bool,
    /// Origins allowed as well, exactly (`--cors-origin`, the gRPC port only).
    cors_origins: Vec<HeaderValue>,
    /// Named in logs.
    listener: &'static str,
    metrics: Arc<Metrics>,
}

/// A tower layer (and its configuration) that refuses requests with a foreign `Host` or
/// `Origin`; see the module docs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HostGuard(Arc<Policy>);

impl HostGuard {
    /// The HTTP listener's guard (console, `/metrics`, gRPC-Web), bound to `own` (`None`:
    /// unknown, loopback and the listed hosts only): checks `Host` and `Origin`.
    pub fn http_listener(
        allowed: AllowedHosts,
        own: Option<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Arc::new(Policy {
            allowed,
            own: own.map(|a| a.ip()),
            check_host: true,
            cors_origins: Vec::new(),
            listener: "http",
            metrics,
        }))
    }

    /// The gRPC port's guard, bound to `own`: checks `Origin` only (browsers' gRPC-Web calls),
    /// and also allows the `--cors-origin` origins.
    pub fn grpc_port(
        allowed: AllowedHosts,
        own: Option<SocketAddr>,
        cors_origins: Vec<HeaderValue>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Arc::new(Policy {
            allowed,
            own: own.map(|a| a.ip()),
            check_host: false,
            cors_origins,
            listener: "grpc",
            metrics,
        }))
    }

    /// Checks a request's `Host` (the HTTP listener), URI authority and `Origin`.
    ///
    /// # Errors
    /// The [`Refusal`] to answer with.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        let p = &*self.0;
        if p.allowed.any {
            return Ok(());
        }
        if p.check_host {
            let hosts = headers
                .get_all(header::HOST)
                .iter()
                .map(|v| v.to_str().ok())
                .chain(uri.authority().map(|a| Some(a.as_str())));
            for host in hosts {
                let Some(host) = host else {
                    return Err(malformed("Host"));
                };
                match host_of(host) {
                    Some(name) if p.allowed.allows(name, p.own) => {}
                    Some(_) => {
                        return Err(Refusal {
                            status: StatusCode::MISDIRECTED_REQUEST,
                            what: "host",
                            reason: format!(
                            "host {host:?} is not served here (protection against DNS rebinding); \
                                 to serve this listener under that name, add it to {FLAG}"
                        ),
                        })
                    }
                    None => return Err(malformed("Host")),
                }
            }
        }
        for origin in headers.get_all(header::ORIGIN) {
            if p.cors_origins.iter().any(|o| o == origin) {
                continue;
            }
            let Ok(text) = origin.to_str() else {
                return Err(malformed("Origin"));
            };
            let host = if text == "null" {
                None
            } else {
                let authority = text
                    .strip_prefix("http://")
                    .or_else(|| text.strip_prefix("https://"))
                    .ok_or_else(|| malformed("Origin"))?;
                Some(host_of(authority).ok_or_else(|| malformed("Origin"))?)
            };
            if host.is_some_and(|h| p.allowed.allows(h, p.own)) {
                continue;
            }
            let fix = if p.check_host {
                format!("to let pages from there use this listener, add its host to {FLAG}")
            } else {
                format!(
                    "to let pages from there call this port, list the origin in --cors-origin \
                     or its host in {FLAG}"
                )
            };
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                what: "origin",
                reason: format!(
                    "origin {text:?} is not allowed (protection against DNS rebinding); {fix}"
                ),
            });
        }
        Ok(())
    }

    fn refused(&self, refusal: &Refusal) {
        let p = &*self.0;
        p.metrics.http_request_refused(refusal.what);
        if REJECTION_LOGS.allow("request refused: host or origin") {
            tracing::info!(listener = p.listener, status = refusal.status.as_u16(), reason = %refusal.reason, "request refused");
        }
    }
}

fn malformed(header: &str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        what: if header == "Host" { "host" } else { "origin" },
        reason: format!("malformed {header} header"),
    }
}

impl<S> tower_layer::Layer<S> for HostGuard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            guard: self.clone(),
        }
    }
}

/// A service behind a [`HostGuard`].
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    guard: HostGuard,
}

/// The response body of a [`Guarded`] service: the inner service's, or a refusal's text.
pub type GuardedBody<B> = Either<B, Full<Bytes>>;

type Passed<F, B> = future::MapOk<F, fn(Response<B>) -> Response<GuardedBody<B>>>;
type Answer<B, E> = future::Ready<Result<Response<GuardedBody<B>>, E>>;

fn passed<B>(response: Response<B>) -> Response<GuardedBody<B>> {
    response.map(Either::Left)
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for Guarded<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<GuardedBody<ResBody>>;
    type Error = S::Error;
    type Future = future::Either<Passed<S::Future, ResBody>, Answer<ResBody, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.guard.check(request.uri(), request.headers()) {
            Ok(()) => future::Either::Left(
                self.inner
                    .call(request)
                    .map_ok(passed::<ResBody> as fn(_) -> _),
            ),
            Err(refusal) => {
                self.guard.refused(&refusal);
                future::Either::Right(future::ready(Ok(refusal.response())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(entries: &[&str], own: &str, check_host: bool, cors: &[&str]) -> HostGuard {
        let allowed = AllowedHosts::parse(entries).unwrap();
        let own: Option<SocketAddr> = Some(own.parse().unwrap());
        let metrics = Arc::new(Metrics::new());
        if check_host {
            HostGuard::http_listener(allowed, own, metrics)
        } else {
            HostGuard::grpc_port(
                allowed,
                own,
                cors.iter()
                    .map(|c| HeaderValue::from_str(c).unwrap())
                    .collect(),
                metrics,
            )
        }
    }

    fn check(g: &HostGuard, host: Option<&str>, origin: Option<&str>) -> Result<(), StatusCode> {
        let mut headers = HeaderMap::new();
        if let Some(h) = host {
            headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        if let Some(o) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        g.check(&Uri::from_static("/metrics"), &headers)
            .map_err(|r| r.status)
    }

    #[test]
    fn loopback_and_the_own_address_pass_by_default() {
        let g = guard(&[], "127.0.0.1:9090", true, &[]);
        for host in [
            "localhost",
            "LocalHost.:9090",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.8.9.10:80",
            "[::1]",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:9090",
        ] {
            assert_eq!(check(&g, Some(host), None), Ok(()), "{host}");
        }
        assert_eq!(check(&g, None, None), Ok(()), "no Host: not a browser");
        assert_eq!(
            check(&g, Some("127.0.0.1:9090"), Some("http://localhost:9090")),
            Ok(())
        );
        let own = guard(&[], "10.1.2.3:9090", true, &[]);
        assert_eq!(check(&own, Some("10.1.2.3:9090"), None), Ok(()));
        assert_eq!(
            check(&own, Some("10.1.2.4:9090"), None),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        let any_ip = guard(&[], "0.0.0.0:9090", true, &[]);
        assert_eq!(check(&any_ip, Some("10.1.2.4:9090"), None), Ok(()));
        assert_eq!(
            check(&any_ip, Some("metrics.internal:9090"), None),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
    }

    #[test]
    fn foreign_hosts_and_origins_are_refused() {
        let g = guard(&[], "127.0.0.1:9090", true, &[]);
        assert_eq!(
            check(&g, Some("evil.example:9090"), None),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(
            check(&g, Some("localhost.evil.example"), None),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(
            check(&g, Some("127.0.0.1:9090"), Some("http://evil.example:9090")),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            check(&g, Some("127.0.0.1:9090"), Some("null")),
            Err(StatusCode::FORBIDDEN)
        );
        for bad in [
            "",
            "a@localhost",
            "localhost/x",
            "[::1",
            "::1",
            "localhost:x",
        ] {
            assert_eq!(
                check(&g, Some(bad), None),
                Err(StatusCode::BAD_REQUEST),
                "{bad:?}"
            );
        }
        let r = g
            .check(
                &Uri::from_static("http://evil.example/metrics"),
                &HeaderMap::new(),
            )
            .unwrap_err();
        assert_eq!(
            r.status,
            StatusCode::MISDIRECTED_REQUEST,
            "the URI's authority too"
        );
        assert!(r.reason.contains("evil.example"), "{}", r.reason);
        assert!(r.reason.contains("--http-allowed-hosts"), "{}", r.reason);
    }

    #[test]
    fn listed_hosts_and_star_are_allowed() {
        let g = guard(
            &["Console.Example.com", "10.9.9.9", "[fd00::1]", ""],
            "127.0.0.1:9090",
            true,
            &[],
        );
        assert_eq!(check(&g, Some("console.example.com:443"), None), Ok(()));
        assert_eq!(
            check(
                &g,
                Some("console.example.com"),
                Some("https://console.example.com")
            ),
            Ok(())
        );
        assert_eq!(check(&g, Some("10.9.9.9"), None), Ok(()));
        assert_eq!(check(&g, Some("[fd00::1]:8080"), None), Ok(()));
        assert_eq!(
            check(&g, Some("other.example.com"), None),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        let star = guard(&["*"], "127.0.0.1:9090", true, &[]);
        assert!(star.0.allowed.allows_any());
        assert_eq!(check(&star, Some("anything"), Some("null")), Ok(()));
    }

    #[test]
    fn the_grpc_port_checks_origin_only_and_allows_cors_origins() {
        let g = guard(&[], "127.0.0.1:50051", false, &["https://app.example.com"]);
        assert_eq!(check(&g, Some("broker.internal:50051"), None), Ok(()));
        assert_eq!(
            check(&g, Some("broker.internal"), Some("https://app.example.com")),
            Ok(())
        );
        assert_eq!(
            check(&g, None, Some("http://evil.example:50051")),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(check(&g, None, Some("http://127.0.0.1:3000")), Ok(()));
    }

    #[test]
    fn bad_entries_name_the_flag() {
        for bad in [
            "http://console.example.com",
            "console.example.com:8080",
            "console.example.com/x",
            "[fd00::1]:80",
            "bad host",
        ] {
            let e = AllowedHosts::parse(&[bad]).unwrap_err();
            assert!(e.starts_with("--http-allowed-hosts"), "{e}");
        }
    }
}
