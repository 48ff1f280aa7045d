//! PLACEHOLDER (being written by a helper).
use crate::engine::SharedEngine;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
}

pub fn app(_engine: SharedEngine, _config: ApiConfig) -> axum::Router {
    axum::Router::new()
}
