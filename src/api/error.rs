//! `ApiError`: every way an API request can fail, rendered as an OpenAI-style error body
//! (`{"error":{"message","type","param","code"}}`) with the matching status code.
//!
//! Server-side detail (an inference failure, a broken engine stream) is logged here and replaced
//! by a generic message: clients never see internals.

use axum::http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::{EngineError, InvalidParam};

/// Seconds a client should wait before retrying a model whose queue is full.
const QUEUE_FULL_RETRY_AFTER_SECS: u64 = 1;
/// Seconds a client should wait before retrying a model that is shutting down: long enough for a
/// restart or for the cluster to route elsewhere.
const SHUTTING_DOWN_RETRY_AFTER_SECS: u64 = 5;

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a value is out of range. `param` names the field when known.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String> },
    #[error("You didn't provide an API key.")]
    MissingApiKey,
    #[error("Incorrect API key provided.")]
    WrongApiKey,
    #[error("no API key is named '{0}'")]
    KeyNotFound(String),
    #[error("the API key '{0}' has expired")]
    ExpiredApiKey(String),
    /// A user key asked for an operator route (`/api`, `/metrics`).
    #[error("the API key '{key}' may use /v1 only, not {path}")]
    AdminOnly { key: String, path: String },
    /// A user key is over one of its limits, counted across the cluster.
    #[error("the API key '{key}' is over its {limit} limit")]
    RateLimited { key: String, limit: &'static str, retry_after_secs: u64 },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("no route for {method} {path}")]
    RouteNotFound { method: Method, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: Method, path: String },
    /// An operator route was sent something other than `Content-Type: application/json`.
    #[error("this route takes a JSON body sent as 'Content-Type: application/json'")]
    UnsupportedMediaType,
    /// A web page of another origin asked (the `Origin` header is not this node's).
    #[error("a request from another web page (Origin {origin}) was refused")]
    CrossOrigin { origin: String },
    /// The `Host` header names something this node does not answer to (DNS rebinding).
    #[error("the Host {host} is not one this node answers to")]
    UnknownHost { host: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A server-side fault that is not the engine's (e.g. a generation stream that ended without
    /// a result). The detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The OpenAI error envelope.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about one field of the request.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param.into()) }
    }

    /// A 400 about the request as a whole.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::MissingApiKey | Self::WrongApiKey | Self::ExpiredApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::AdminOnly { .. } => StatusCode::FORBIDDEN,
            Self::KeyNotFound(_) => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::CrossOrigin { .. } | Self::UnknownHost { .. } => StatusCode::FORBIDDEN,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Engine(error) => match error {
                EngineError::UnknownModel(_) => StatusCode::NOT_FOUND,
                EngineError::WrongKind { .. }
                | EngineError::InvalidRequest(_)
                | EngineError::InvalidParam { .. }
                | EngineError::ContextLength { .. } => StatusCode::BAD_REQUEST,
                EngineError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
                EngineError::ShuttingDown(_) | EngineError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                EngineError::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// Seconds for the `Retry-After` header, for failures that a retry can cure.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_secs, .. } => Some(*retry_after_secs),
            Self::Engine(EngineError::QueueFull(_)) => Some(QUEUE_FULL_RETRY_AFTER_SECS),
            Self::Engine(EngineError::ShuttingDown(_) | EngineError::Unavailable(_)) => {
                Some(SHUTTING_DOWN_RETRY_AFTER_SECS)
            }
            _ => None,
        }
    }

    /// The body sent to the client, both as an HTTP response and as an SSE error event.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code): (_, Option<String>, _) = match self {
            Self::InvalidRequest { param, .. } => (INVALID_REQUEST, param.clone(), None),
            Self::MissingApiKey | Self::WrongApiKey | Self::ExpiredApiKey(_) => {
                (INVALID_REQUEST, None, Some("invalid_api_key"))
            }
            Self::AdminOnly { .. } => (INVALID_REQUEST, None, Some("insufficient_permissions")),
            Self::KeyNotFound(_) => (INVALID_REQUEST, Some("name".into()), Some("api_key_not_found")),
            // OpenAI's type names what ran out: "requests" or "tokens".
            Self::RateLimited { limit, .. } => {
                let kind = if limit.starts_with("tokens") { "tokens" } else { "requests" };
                (kind, None, Some("rate_limit_exceeded"))
            }
            Self::PayloadTooLarge { .. } => (INVALID_REQUEST, None, Some("request_too_large")),
            Self::RouteNotFound { .. } => (INVALID_REQUEST, None, Some("unknown_url")),
            Self::MethodNotAllowed { .. } => (INVALID_REQUEST, None, Some("method_not_allowed")),
            Self::UnsupportedMediaType => (INVALID_REQUEST, None, Some("unsupported_media_type")),
            Self::CrossOrigin { .. } => (INVALID_REQUEST, None, Some("cross_origin_request")),
            Self::UnknownHost { .. } => (INVALID_REQUEST, None, Some("unknown_host")),
            Self::Internal(_) => (SERVER_ERROR, None, None),
            Self::Engine(error) => match error {
                EngineError::UnknownModel(_) => {
                    (INVALID_REQUEST, Some("model".into()), Some("model_not_found"))
                }
                EngineError::WrongKind { .. } => {
                    (INVALID_REQUEST, Some("model".into()), Some("model_not_supported"))
                }
                EngineError::InvalidRequest(_) => (INVALID_REQUEST, None, None),
                EngineError::InvalidParam { param, .. } => (INVALID_REQUEST, Some(param.clone()), None),
                EngineError::ContextLength { .. } => (INVALID_REQUEST, None, Some("context_length_exceeded")),
                EngineError::QueueFull(_) => (SERVER_ERROR, Some("model".into()), Some("model_busy")),
                EngineError::ShuttingDown(_) => (SERVER_ERROR, None, Some("shutting_down")),
                EngineError::Unavailable(_) => {
                    (SERVER_ERROR, Some("model".into()), Some("model_unavailable"))
                }
                EngineError::Inference(_) => (SERVER_ERROR, None, None),
            },
        };
        ErrorBody { error: ErrorDetail { message: self.client_message(), kind, param, code } }
    }

    /// Log the failure at a level that matches whose fault it is.
    pub fn log(&self) {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
        } else if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            tracing::warn!(error = %self, "request refused");
        } else {
            tracing::debug!(error = %self, "request rejected");
        }
    }

    fn client_message(&self) -> String {
        match self {
            Self::MissingApiKey => "You didn't provide an API key. You need to provide your API \
                key in an Authorization header using Bearer auth (i.e. Authorization: Bearer \
                YOUR_KEY)."
                .into(),
            Self::WrongApiKey => "Incorrect API key provided.".into(),
            Self::ExpiredApiKey(name) => format!("The API key '{name}' has expired."),
            Self::AdminOnly { key, path } => {
                format!("The API key '{key}' may use the /v1 API only; {path} needs the node's admin key.")
            }
            Self::RateLimited { key, limit, retry_after_secs } => format!(
                "Rate limit reached for the API key '{key}' on {limit}. Please try again in {retry_after_secs}s."
            ),
            Self::PayloadTooLarge { limit } => {
                format!("The request body is too large: the limit is {limit} bytes.")
            }
            Self::RouteNotFound { method, path } => format!("Invalid URL ({method} {path})"),
            Self::MethodNotAllowed { method, path } => {
                format!("Method {method} is not allowed for {path}.")
            }
            Self::UnsupportedMediaType => {
                "This route takes a JSON body: send it with 'Content-Type: application/json'.".into()
            }
            Self::CrossOrigin { origin } => format!(
                "Requests from other web pages are refused: the Origin '{origin}' is not this node's own."
            ),
            Self::UnknownHost { host } => format!(
                "This node does not answer to the name '{host}'. Use localhost, 127.0.0.1 or [::1], \
                 or add the name with --allowed-host."
            ),
            Self::Engine(EngineError::UnknownModel(model)) => {
                format!("The model `{model}` does not exist.")
            }
            Self::Engine(EngineError::QueueFull(model)) => {
                format!("Model `{model}` is busy: its queue is full. Please retry shortly.")
            }
            Self::Engine(EngineError::Inference(_)) | Self::Internal(_) => {
                "The server had an error while processing your request.".into()
            }
            other => other.to_string(),
        }
    }
}

impl From<InvalidParam> for ApiError {
    fn from(error: InvalidParam) -> Self {
        Self::invalid_param(error.param, error.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_detail_is_not_sent() {
        let error = ApiError::from(EngineError::Inference("cuda out of memory at 0x7f".into()));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.body().error.message.contains("cuda"));
    }

    #[test]
    fn queue_full_is_retryable() {
        let error = ApiError::from(EngineError::QueueFull("m".into()));
        assert_eq!(error.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error.retry_after(), Some(QUEUE_FULL_RETRY_AFTER_SECS));
        assert_eq!(error.body().error.code, Some("model_busy"));
    }

    #[test]
    fn body_always_has_all_four_fields() {
        let json = serde_json::to_value(ApiError::invalid_request("bad").body()).unwrap();
        let detail = json["error"].as_object().unwrap();
        for key in ["message", "type", "param", "code"] {
            assert!(detail.contains_key(key), "missing {key}");
        }
    }
}
