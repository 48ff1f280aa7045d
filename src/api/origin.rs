//! Defences against the web pages an operator's browser visits. Without them a node with no API
//! key does what any page asks: a form or a `fetch` POSTing the attacker's connection key to
//! `/api/join` (cross-site request forgery), or a page whose name the attacker points at
//! 127.0.0.1 after it loaded (DNS rebinding) reading `/api/nodes` and minting invitations.
//!
//! Three rules, each cheap, each enough against one attack, none affecting clients that are not
//! browsers (curl, the OpenAI SDKs, `llmesh` itself send no `Origin` and a loopback `Host`):
//! - **`Origin`**: a browser names the page behind every cross-origin request and every POST. One
//!   that is not this node's own (the `Host` the request was sent to, over http or https: behind a
//!   TLS proxy the node cannot tell which) is refused, on every route. `/v1` included: a page
//!   could otherwise POST `text/plain` to `/v1/chat/completions` and spend the node's compute, and
//!   the node never sends CORS headers, so no cross-origin page could read an answer anyway.
//! - **`Host`**: a node listening on loopback answers only to loopback names (`localhost`,
//!   `127.0.0.1`, `[::1]`, at any port, since no page can make its browser send those for another
//!   site and an `ssh -L` tunnel may use another port) and the names the operator allows; a
//!   rebound page's requests carry the attacker's name. A node listening elsewhere answers to any
//!   name unless names are configured.
//! - **`Content-Type`** on the operator's POST routes: a page can send `text/plain` or a form to
//!   any site without asking, but `application/json` needs a CORS preflight, which this node never
//!   grants. (`/v1` stays lenient: `curl -d` sends form encoding.)

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::header::{HOST, ORIGIN};
use axum::http::uri::Authority;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::extract::is_json_content_type;

/// Names that reach this machine only, whatever the page asking: browsers never resolve them
/// through DNS, so a rebinding attacker cannot use them.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// The `Host` names a node answers to when its API listens on `listen`: `None` (any name) for a
/// node listening beyond loopback with no names configured; otherwise the loopback names, the
/// listen address itself, and `configured` (`name` or `name:port`).
pub fn allowed_hosts(listen: SocketAddr, configured: &[String]) -> Option<Vec<String>> {
    if !listen.ip().is_loopback() && configured.is_empty() {
        return None;
    }
    let mut names = configured.to_vec();
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => names.push(ip.to_string()),
        IpAddr::V6(ip) if ip.is_loopback() => names.push(format!("[{ip}]")),
        _ => {}
    }
    Some(names)
}

/// A name the node answers to; no port means any port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostName {
    name: String,
    port: Option<u16>,
}

impl HostName {
    fn parse(text: &str) -> Option<Self> {
        if text.contains('@') {
            return None;
        }
        let authority: Authority = text.trim().parse().ok()?;
        Some(Self { name: authority.host().to_ascii_lowercase(), port: authority.port_u16() })
    }

    /// Whether a request's `Host` is this name. A `Host` without a port is the scheme's default.
    fn admits(&self, host: &HostName) -> bool {
        let port_matches = match (self.port, host.port) {
            (None, _) => true,
            (Some(wanted), Some(port)) => wanted == port,
            (Some(wanted), None) => matches!(wanted, 80 | 443),
        };
        self.name == host.name && port_matches
    }
}

/// Which `Host` headers are answered (see the module's documentation).
#[derive(Debug, Clone, Default)]
pub struct HostPolicy(Option<Arc<[HostName]>>);

impl HostPolicy {
    /// `None` answers to any name; `Some(names)` to the loopback names and `names`.
    pub fn new(allowed: Option<&[String]>) -> Self {
        Self(allowed.map(|configured| {
            let loopback = LOOPBACK_NAMES.iter().map(|name| name.to_string());
            let mut names = Vec::new();
            for entry in loopback.chain(configured.iter().cloned()) {
                match HostName::parse(&entry) {
                    Some(name) => names.push(name),
                    None => tracing::warn!(host = %entry, "ignored an allowed host that is not a host name"),
                }
            }
            names.into()
        }))
    }

    fn admits(&self, host: &str) -> bool {
        let Some(names) = &self.0 else { return true };
        HostName::parse(host).is_some_and(|host| names.iter().any(|name| name.admits(&host)))
    }
}

/// The name the request was sent to: `Host`, or the authority of an HTTP/2 or absolute-form
/// request. A header that is not text reads as the empty name, which no policy admits.
fn request_host(request: &Request) -> Option<&str> {
    match request.headers().get(HOST) {
        Some(value) => Some(value.to_str().unwrap_or_default()),
        None => request.uri().authority().map(Authority::as_str),
    }
}

/// Whether a browser's `Origin` is the site the request was sent to.
fn same_origin(origin: &str, host: &str) -> bool {
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|authority| authority.eq_ignore_ascii_case(host))
}

/// Middleware on every route: refuse a `Host` the policy does not admit, and an `Origin` that is
/// not this node's own. A request without `Host` (HTTP/1.0) did not come from a browser.
pub async fn refuse_other_sites(
    State(policy): State<HostPolicy>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let host = request_host(&request);
    if let Some(host) = host
        && !policy.admits(host)
    {
        return Err(ApiError::UnknownHost { host: host.to_string() });
    }
    if let Some(origin) = request.headers().get(ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !host.is_some_and(|host| same_origin(origin, host)) {
            return Err(ApiError::CrossOrigin { origin: origin.to_string() });
        }
    }
    Ok(next.run(request).await)
}

/// Middleware on the operator's routes: anything but a GET must say it is JSON.
pub async fn require_json(request: Request, next: Next) -> Result<Response, ApiError> {
    let reads_only = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads_only && !is_json_content_type(request.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_for(configured: &[&str], listen: &str) -> HostPolicy {
        let configured: Vec<String> = configured.iter().map(|name| name.to_string()).collect();
        HostPolicy::new(allowed_hosts(listen.parse().unwrap(), &configured).as_deref())
    }

    #[test]
    fn loopback_nodes_answer_to_loopback_names_only() {
        let policy = policy_for(&[], "127.0.0.1:8080");
        for host in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:9000", "[::1]:8080", "localhost"] {
            assert!(policy.admits(host), "{host}");
        }
        for host in ["evil.example:8080", "evil.example", "127.0.0.1.evil.example:8080", "", "a@localhost"] {
            assert!(!policy.admits(host), "{host}");
        }
    }

    #[test]
    fn configured_names_and_the_listen_address_are_admitted() {
        let policy = policy_for(&["llmesh.lan", "proxy.example:8443"], "127.0.0.2:8080");
        assert!(policy.admits("127.0.0.2:8080"));
        assert!(policy.admits("llmesh.lan:8080"));
        assert!(policy.admits("proxy.example:8443"));
        assert!(!policy.admits("proxy.example:8080"));
        assert!(policy_for(&["proxy.example:443"], "127.0.0.1:1").admits("proxy.example"));
    }

    #[test]
    fn nodes_beyond_loopback_answer_to_any_name_unless_told() {
        assert!(allowed_hosts("0.0.0.0:8080".parse().unwrap(), &[]).is_none());
        assert!(policy_for(&[], "0.0.0.0:8080").admits("anything.example"));
        let told = policy_for(&["gpu-box.lan"], "0.0.0.0:8080");
        assert!(told.admits("gpu-box.lan:8080"));
        assert!(!told.admits("evil.example:8080"));
    }

    #[test]
    fn an_origin_is_the_node_s_own_only_at_the_same_host_and_port() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(same_origin("https://llmesh.example", "llmesh.example"));
        assert!(same_origin("http://LOCALHOST:8080", "localhost:8080"));
        assert!(!same_origin("http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
        assert!(!same_origin("file://", "127.0.0.1:8080"));
    }
}
