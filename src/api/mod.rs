//! The HTTP API: an OpenAI-compatible server over an `Engine`. This module is the only part of
//! llmesh that knows JSON shapes and status codes.
//!
//! [`app`] builds the router; callers serve it ([`serve`]: HTTP/1.1 with a deadline on request
//! heads) or drive it with `tower::ServiceExt::oneshot` in tests. A web page of another site
//! cannot drive it (`origin.rs`: `Origin`, `Host` and JSON-only operator POSTs). Every failure is
//! an [`ApiError`] rendered in OpenAI's error shape, unknown routes and wrong methods included.
//! Each request runs in a `request` span carrying its `request_id` (also sent back as
//! `x-request-id`) and, once parsed, its `model`.

mod auth;
mod chat;
mod cluster;
mod completions;
mod dashboard;
mod embeddings;
mod error;
mod extract;
#[doc(hidden)]
pub mod fuzz;
mod generation;
mod key_scope;
mod keys;
mod metrics;
mod models;
mod origin;
mod params;
mod response_format;
mod responses;
mod serve;
mod tool_calls;
mod types;

use axum::extract::{FromRef, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::engine::SharedEngine;
use auth::{ApiKey, Authenticator};
use extract::BodyLimit;

pub use chat::DEFAULT_CHAT_MAX_TOKENS;
pub use completions::DEFAULT_COMPLETION_MAX_TOKENS;
pub use error::ApiError;
pub use origin::allowed_hosts;
pub use serve::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, serve};

/// Bodies above this are refused with 413 unless configured otherwise: far more than any chat
/// needs, small enough that a client cannot make the server buffer much.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The admin key. When set, every `/v1`, `/api` and `/metrics` route requires
    /// `Authorization: Bearer` with it or with a user key (`/v1` only); `/health` and the
    /// dashboard's page stay open.
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The `Host` names answered besides `localhost`, `127.0.0.1` and `[::1]` (`name` or
    /// `name:port`); `None` answers to any name. [`allowed_hosts`] gives what a node listening on
    /// an address should use. A request from a web page of another origin is refused either way.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { api_key: None, max_body_bytes: DEFAULT_MAX_BODY_BYTES, allowed_hosts: None }
    }
}

/// What every handler can reach.
#[derive(Clone)]
struct AppState {
    engine: SharedEngine,
    /// Present when serving a cluster node: the `/api` routes read it.
    router: Option<crate::router::Router>,
    body_limit: BodyLimit,
}

impl AppState {
    /// The context length of a model the engine lists.
    fn context_length(&self, model: &str) -> Option<usize> {
        let models = self.engine.models();
        models.into_iter().find(|info| info.id == model).map(|info| info.context_length)
    }
}

impl FromRef<AppState> for BodyLimit {
    fn from_ref(state: &AppState) -> Self {
        state.body_limit
    }
}

/// The OpenAI API over any engine, with its state applied, ready to serve.
pub fn app(engine: SharedEngine, config: ApiConfig) -> Router {
    build(AppState { engine, router: None, body_limit: BodyLimit(config.max_body_bytes) }, config)
}

/// The API of a cluster node: the OpenAI routes over its router, plus the `/api` routes
/// (nodes, statistics) the dashboard and the command line read.
pub fn node_app(router: crate::router::Router, config: ApiConfig) -> Router {
    let state = AppState {
        engine: std::sync::Arc::new(router.clone()),
        router: Some(router),
        body_limit: BodyLimit(config.max_body_bytes),
    };
    build(state, config)
}

fn build(state: AppState, config: ApiConfig) -> Router {
    let mut v1 = Router::new()
        .route("/v1/models", get(models::list_models))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/responses", post(responses::create_response))
        .route("/v1/embeddings", post(embeddings::create_embeddings));
    if state.router.is_some() {
        let operator = Router::new()
            .route("/api/nodes", get(cluster::list_nodes))
            .route("/api/stats", get(cluster::routing_stats))
            .route("/api/invitations", post(cluster::create_invitation))
            .route("/api/nodes/{peer_id}/revoke", post(cluster::revoke_node))
            .route("/api/join", post(cluster::join_cluster))
            .route("/api/drain", post(cluster::drain))
            .route("/api/models", get(models::list_local_models).post(models::load_model))
            .route("/api/models/{id}", delete(models::unload_model))
            .route("/api/keys", get(keys::list_keys).post(keys::create_key))
            .route("/api/keys/{name}/revoke", post(keys::revoke_key))
            .route_layer(middleware::from_fn(origin::require_json));
        v1 = v1.merge(operator).route("/metrics", get(metrics::render));
    }
    let admin = config.api_key.as_deref().map(ApiKey::new);
    if admin.is_some() || state.router.is_some() {
        let authenticator = Authenticator { admin, router: state.router.clone() };
        v1 = v1.route_layer(middleware::from_fn_with_state(authenticator, auth::authenticate));
    }
    Router::new()
        .route("/health", get(health))
        .route("/", get(dashboard::index))
        .route("/assets/{file}", get(dashboard::asset))
        .merge(v1)
        .fallback(route_not_found)
        // Must come after every route: it applies to the routes present when called.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            origin::HostPolicy::new(config.allowed_hosts.as_deref()),
            origin::refuse_other_sites,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(middleware::from_fn(assign_request_id))
        .with_state(state)
}

/// `{"status":"ok"}`, or 503 `{"status":"draining"}` on a node that is going away (load
/// balancers and `llmesh nodes` take it out at once).
async fn health(State(state): State<AppState>) -> (StatusCode, Json<types::Health>) {
    match state.router.as_ref().is_some_and(|router| router.is_draining()) {
        true => (StatusCode::SERVICE_UNAVAILABLE, Json(types::Health { status: "draining" })),
        false => (StatusCode::OK, Json(types::Health { status: "ok" })),
    }
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound { method, path: uri.path().to_owned() }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method, path: uri.path().to_owned() }
}

/// The response header naming the node whose engine answered.
pub const SERVED_BY_HEADER: &str = "x-llmesh-node";

/// Add `x-llmesh-node` when the engine said which node served the request.
fn served_by(mut response: Response, node: Option<&str>) -> Response {
    if let Some(value) = node.and_then(|node| HeaderValue::from_str(node).ok()) {
        response.headers_mut().insert(SERVED_BY_HEADER, value);
    }
    response
}

/// The id that ties a request's logs together and is echoed to the client.
#[derive(Debug, Clone, Copy)]
struct RequestId(uuid::Uuid);

const REQUEST_ID_HEADER: &str = "x-request-id";

async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4();
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

fn request_span(request: &Request) -> tracing::Span {
    let request_id = request.extensions().get::<RequestId>().map(|id| id.0.to_string());
    tracing::info_span!(
        "request",
        request_id = request_id.as_deref().unwrap_or("-"),
        method = %request.method(),
        path = request.uri().path(),
        model = tracing::field::Empty,
        key = tracing::field::Empty,
    )
}
