//! Bearer-token authentication for the `/v1` routes, applied only when an API key is configured.
//!
//! The key is compared in constant time, and the time taken depends only on the configured key's
//! length, never on how much of the offered key matches.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;

/// The key clients must present as `Authorization: Bearer <key>`.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(key.into())
    }
}

/// Middleware: pass the request on only when it carries the right bearer token.
pub async fn require_api_key(
    State(expected): State<ApiKey>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let offered = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .ok_or(ApiError::MissingApiKey)?;
    if !keys_match(offered.as_bytes(), expected.0.as_bytes()) {
        return Err(ApiError::WrongApiKey);
    }
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
