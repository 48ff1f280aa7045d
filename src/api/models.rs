//! `GET /v1/models`: the engine's models in OpenAI's list shape, with what OpenAI has no field for
//! (kind, architecture, quantization, context length, parameters, file size) under an `llmesh`
//! key. `/api/models`: this node's own models, loaded and unloaded while it serves.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject};
use super::types::{ModelList, ModelObject};
use crate::engine::{EngineError, ModelState, ModelStatus};

pub async fn list_models(State(state): State<AppState>, caller: Caller) -> Json<ModelList> {
    let data = state.models_for(&caller).into_iter().map(ModelObject::from).collect();
    Json(ModelList { object: "list", data })
}

/// `GET /api/models`: this node's own models with their state: loading (with progress), ready,
/// unloading, or failed (with the reason).
pub async fn list_local_models(State(state): State<AppState>) -> Result<Json<LocalModels>, ApiError> {
    let router =
        state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))?;
    Ok(Json(LocalModels { object: "list", data: router.local_engine().model_states() }))
}

#[derive(Debug, Serialize)]
pub struct LocalModels {
    pub object: &'static str,
    pub data: Vec<ModelStatus>,
}

/// `POST /api/models` `{"id": ..., "path": ...}`: load a model while serving. Answers 202 at once;
/// the file is read in the background (see `GET /api/models`).
pub async fn load_model(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<LoadRequest>,
) -> Result<(StatusCode, Json<ModelStatus>), ApiError> {
    let router =
        state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))?;
    let engine = router.local_engine().clone();
    let (id, path) = (request.id.clone(), request.path.clone());
    tokio::task::spawn_blocking(move || engine.start_loading(&id, &path))
        .await
        .map_err(|error| ApiError::Internal(format!("starting a load: {error}")))?
        .map_err(|error| match error {
            EngineError::InvalidRequest(message) => ApiError::invalid_param("id", message),
            other => ApiError::Engine(other),
        })?;
    let status = ModelStatus {
        id: request.id,
        state: ModelState::Loading,
        source: Some(request.path),
        ..ModelStatus::default()
    };
    Ok((StatusCode::ACCEPTED, Json(status)))
}

pub struct LoadRequest {
    id: String,
    path: String,
}

impl FromJsonObject for LoadRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let id = fields.required_text("id")?;
        let path = fields.required_text("path")?;
        Ok(Self { id, path })
    }
}

#[derive(Debug, Deserialize)]
pub struct UnloadQuery {
    #[serde(default)]
    force: bool,
}

/// `DELETE /api/models/{id}[?force=true]`: stop serving a model. New requests get 503 at once;
/// answers being generated finish (`force`: end with an error), then the model is dropped.
/// Answers 202; the model shows as `unloading` in `GET /api/models` until it is gone.
pub async fn unload_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<UnloadQuery>,
) -> Result<(StatusCode, Json<ModelStatus>), ApiError> {
    let router =
        state.router.as_ref().ok_or_else(|| ApiError::Internal("no router behind this API".into()))?;
    router.local_engine().start_unloading(&id, query.force)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ModelStatus { id, state: ModelState::Unloading, ..ModelStatus::default() }),
    ))
}
