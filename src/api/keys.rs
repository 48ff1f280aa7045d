//! `/api/keys` (admin only): make, list and revoke the cluster's API keys. A new key's secret is
//! in the answer that made it and nowhere else.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject};
use crate::p2p::{ApiKeyError, ApiKeyInfo, KeySpec, MAX_KEY_MODELS, P2pError, valid_key_name};
use crate::router::KeyWithUsage;

/// The longest a key may be made to last: ten years.
const MAX_EXPIRES_IN_SECONDS: u64 = 10 * 365 * 24 * 3600;

#[derive(Debug, Serialize)]
pub struct KeyList {
    pub object: &'static str,
    pub data: Vec<KeyWithUsage>,
}

/// `GET /api/keys`: every key, revoked ones included, with its use.
pub async fn list_keys(State(state): State<AppState>) -> Result<Json<KeyList>, ApiError> {
    Ok(Json(KeyList { object: "list", data: router(&state)?.api_keys() }))
}

#[derive(Debug, Serialize)]
pub struct NewKey {
    pub object: &'static str,
    /// Shown this once: only its hash is kept.
    pub secret: String,
    #[serde(flatten)]
    pub key: ApiKeyInfo,
}

/// `POST /api/keys` `{"name", "models"?, "requests_per_minute"?, "tokens_per_minute"?,
/// "expires_in_seconds"?}`.
pub async fn create_key(
    State(state): State<AppState>,
    JsonBody(spec): JsonBody<KeySpec>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    let (secret, key) = router(&state)?.create_api_key(spec).await.map_err(refusal)?;
    Ok((StatusCode::CREATED, Json(NewKey { object: "api_key", secret, key })))
}

#[derive(Debug, Serialize)]
pub struct KeyRevocation {
    pub object: &'static str,
    pub name: String,
    /// False when it had been revoked before.
    pub newly_revoked: bool,
}

/// `POST /api/keys/{name}/revoke`: the key stops working on every node.
pub async fn revoke_key(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<KeyRevocation>, ApiError> {
    let newly_revoked = router(&state)?.revoke_api_key(&name).await.map_err(refusal)?;
    Ok(Json(KeyRevocation { object: "api_key.revocation", name, newly_revoked }))
}

impl FromJsonObject for KeySpec {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let name = fields.required_text("name")?;
        if !valid_key_name(&name) {
            return Err(ApiError::invalid_param(
                "name",
                "'name' must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            ));
        }
        let models: Vec<String> = fields.optional("models")?.unwrap_or_default();
        if models.len() > MAX_KEY_MODELS || models.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "models",
                format!("'models' must list at most {MAX_KEY_MODELS} model ids, none empty."),
            ));
        }
        let requests_per_minute = positive(&mut fields, "requests_per_minute")?;
        let tokens_per_minute = positive(&mut fields, "tokens_per_minute")?;
        let expires_at = match fields.optional::<u64>("expires_in_seconds")? {
            Some(seconds) if (1..=MAX_EXPIRES_IN_SECONDS).contains(&seconds) => {
                Some(crate::p2p::unix_now() + seconds)
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "expires_in_seconds",
                    format!("'expires_in_seconds' must be between 1 and {MAX_EXPIRES_IN_SECONDS}."),
                ));
            }
            None => None,
        };
        Ok(KeySpec { name, models, requests_per_minute, tokens_per_minute, expires_at })
    }
}

/// A limit: absent, or at least 1.
fn positive(fields: &mut JsonObject, name: &str) -> Result<Option<u32>, ApiError> {
    match fields.optional::<u32>(name)? {
        Some(0) => Err(ApiError::invalid_param(
            name,
            format!("'{name}' must be at least 1 (or left out: no limit)."),
        )),
        limit => Ok(limit),
    }
}

fn router(state: &AppState) -> Result<&crate::router::Router, ApiError> {
    state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))
}

/// What the p2p layer refused, as the client's mistake where it is one.
fn refusal(error: P2pError) -> ApiError {
    match error {
        P2pError::ApiKey(ApiKeyError::NotFound(name)) => ApiError::KeyNotFound(name),
        P2pError::ApiKey(error @ (ApiKeyError::Exists(_) | ApiKeyError::WasRevoked(_))) => {
            ApiError::invalid_param("name", error.to_string())
        }
        P2pError::ApiKey(error @ (ApiKeyError::InvalidName(_) | ApiKeyError::OutOfBounds(_))) => {
            ApiError::invalid_request(error.to_string())
        }
        P2pError::ApiKey(error @ (ApiKeyError::SignerFull(_) | ApiKeyError::Full)) => {
            ApiError::invalid_request(error.to_string())
        }
        other => ApiError::Internal(format!("API keys: {other}")),
    }
}
