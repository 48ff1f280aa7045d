//! `GET /v1/models`: the engine's models in OpenAI's list shape, with what OpenAI has no field for
//! (kind, architecture, quantization, context length) under an `llmesh` key.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::types::{ModelList, ModelObject};

pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state.engine.models().into_iter().map(ModelObject::from).collect();
    Json(ModelList { object: "list", data })
}
