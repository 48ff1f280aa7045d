//! `POST /v1/embeddings`: embed one text or a batch, answering with floats or, as OpenAI does
//! with `encoding_format: "base64"`, base64 of the little-endian `f32` bytes.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{FromJsonObject, JsonBody, JsonObject, json_kind, missing};
use super::types::{EmbeddingList, EmbeddingObject, EmbeddingUsage, EmbeddingVector};
use super::{AppState, served_by};
use crate::engine::EmbedRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    Float,
    Base64,
}

#[derive(Debug)]
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<String>,
    pub encoding_format: EncodingFormat,
}

impl FromJsonObject for EmbeddingRequest {
    fn from_json_object(mut fields: JsonObject) -> Result<Self, ApiError> {
        let model = fields.required_text("model")?;
        let inputs = parse_inputs(fields.take("input"))?;
        let encoding_format = match fields.optional::<String>("encoding_format")?.as_deref() {
            None | Some("float") => EncodingFormat::Float,
            Some("base64") => EncodingFormat::Base64,
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "encoding_format",
                    format!("Unknown encoding_format '{other}': expected 'float' or 'base64'."),
                ));
            }
        };
        if fields.take("dimensions").is_some() {
            return Err(ApiError::invalid_param(
                "dimensions",
                "'dimensions' is not supported: each model's embedding size is fixed.",
            ));
        }
        Ok(Self { model, inputs, encoding_format })
    }
}

/// `input` is a string or an array of strings. (How many, and that none is empty, is
/// `EmbedRequest::validate`'s to check.)
fn parse_inputs(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("input", message);
    match value {
        None => Err(missing("input")),
        Some(Value::String(input)) => Ok(vec![input]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(input) => Ok(input),
                Value::Number(_) | Value::Array(_) => Err(invalid(
                    "Token arrays are not supported: send 'input' as a string or an array of \
                     strings."
                        .into(),
                )),
                other => Err(invalid(format!("Each input must be a string, not {}.", json_kind(&other)))),
            })
            .collect(),
        Some(other) => Err(invalid(format!(
            "'input' must be a string or an array of strings, not {}.",
            json_kind(&other)
        ))),
    }
}

pub async fn create_embeddings(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("model", request.model.as_str());
    let EmbeddingRequest { model, inputs, encoding_format } = request;
    let expected = inputs.len();
    let request = EmbedRequest { model: model.clone(), inputs };
    request.validate()?;
    let embeddings = state.engine_for(&caller, &model)?.embed(request).await?;
    if embeddings.vectors.len() != expected {
        return Err(ApiError::Internal(format!(
            "the engine returned {} vectors for {expected} inputs",
            embeddings.vectors.len()
        )));
    }
    let data = embeddings
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingObject {
            object: "embedding",
            index,
            embedding: encode(vector, encoding_format),
        })
        .collect();
    let usage =
        EmbeddingUsage { prompt_tokens: embeddings.prompt_tokens, total_tokens: embeddings.prompt_tokens };
    let list = Json(EmbeddingList { object: "list", data, model, usage });
    Ok(served_by(list.into_response(), embeddings.served_by.as_deref()))
}

fn encode(vector: Vec<f32>, format: EncodingFormat) -> EmbeddingVector {
    match format {
        EncodingFormat::Float => EmbeddingVector::Float(vector),
        EncodingFormat::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|value| value.to_le_bytes()).collect();
            EmbeddingVector::Base64(BASE64.encode(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        let EmbeddingVector::Base64(text) = encode(vec![1.0, -2.5], EncodingFormat::Base64) else {
            panic!("expected base64");
        };
        let bytes = BASE64.decode(text).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }

    #[test]
    fn token_arrays_and_other_shapes_are_refused() {
        for bad in [
            serde_json::json!([1, 2, 3]),
            serde_json::json!([[1, 2]]),
            serde_json::json!(["a", null]),
            serde_json::json!({"text": "a"}),
        ] {
            let error = parse_inputs(Some(bad.clone())).unwrap_err();
            assert_eq!(error.body().error.param.as_deref(), Some("input"), "{bad}");
        }
        let error = parse_inputs(Some(serde_json::json!([1]))).unwrap_err();
        assert!(error.to_string().contains("Token arrays"));
    }
}
