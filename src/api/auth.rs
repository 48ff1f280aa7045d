//! Who is calling: the bearer token of each request to the `/v1`, `/api` and `/metrics` routes
//! makes it the admin or a user.
//!
//! - The admin key (`--api-key`) may do everything. A node started without one is open: a request
//!   with no key, or a key it does not know, is the admin's.
//! - A user key (`llmesh keys create`, spread to every node by the p2p layer) may use `/v1` only,
//!   and only its models; its limits are checked where the model is known (`key_scope.rs`).
//!
//! The admin key is compared in constant time, and the time taken depends only on its length,
//! never on how much of the offered key matches; user keys are compared by their secrets' hashes,
//! also in constant time (`p2p/api_keys.rs`). No secret is logged.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use crate::p2p::{KeyGrant, KeyLookup};

/// The admin key clients present as `Authorization: Bearer <key>`.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(key.into())
    }
}

/// Who a request comes from. Handlers take it as an extractor; without the middleware (an API
/// with no keys at all) every request is the admin's.
#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    User(KeyGrant),
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or(Caller::Admin))
    }
}

/// What the middleware checks tokens against.
#[derive(Clone)]
pub struct Authenticator {
    pub admin: Option<ApiKey>,
    /// The cluster's user keys, on a node.
    pub router: Option<crate::router::Router>,
}

impl Authenticator {
    fn caller(&self, offered: Option<&str>) -> Result<Caller, ApiError> {
        if let (Some(token), Some(admin)) = (offered, &self.admin)
            && keys_match(token.as_bytes(), admin.0.as_bytes())
        {
            return Ok(Caller::Admin);
        }
        if let (Some(token), Some(router)) = (offered, &self.router) {
            match router.lookup_api_key(token) {
                KeyLookup::Valid(grant) => return Ok(Caller::User(grant)),
                KeyLookup::Expired(name) => return Err(ApiError::ExpiredApiKey(name)),
                KeyLookup::Unknown => {}
            }
        }
        match (&self.admin, offered) {
            (None, _) => Ok(Caller::Admin),
            (Some(_), None) => Err(ApiError::MissingApiKey),
            (Some(_), Some(_)) => Err(ApiError::WrongApiKey),
        }
    }
}

/// Middleware: find out who calls, refuse what that caller may not do, and hand the `Caller` to
/// the handler.
pub async fn authenticate(
    State(authenticator): State<Authenticator>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let offered =
        request.headers().get(AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(bearer_token);
    let caller = authenticator.caller(offered)?;
    if let Caller::User(grant) = &caller {
        let path = request.uri().path();
        if !path.starts_with("/v1/") {
            return Err(ApiError::AdminOnly { key: grant.name.clone(), path: path.to_string() });
        }
        tracing::Span::current().record("key", grant.name.as_str());
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Constant-time equality that does not stop early at the first difference or on a length
/// mismatch: every byte of `expected` is compared whatever `offered` is.
fn keys_match(offered: &[u8], expected: &[u8]) -> bool {
    let mut equal: Choice = (offered.len() as u64).ct_eq(&(expected.len() as u64));
    for (index, byte) in expected.iter().enumerate() {
        let other = offered.get(index).copied().unwrap_or(0);
        equal &= byte.ct_eq(&other);
    }
    equal.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_key_matches() {
        assert!(keys_match(b"secret", b"secret"));
        assert!(!keys_match(b"secreT", b"secret"));
        assert!(!keys_match(b"secret2", b"secret"));
        assert!(!keys_match(b"secre", b"secret"));
        assert!(!keys_match(b"", b"secret"));
        // A prefix padded with the zeros used for missing bytes must not match either.
        assert!(!keys_match(b"ab", b"ab\0"));
    }

    #[test]
    fn bearer_scheme_is_parsed() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
