//! Reading a request body as a JSON object, with every failure (too large, not UTF-8, not JSON,
//! a field of the wrong type) turned into an `ApiError`.
//!
//! Request types are parsed field by field from the top-level object ([`JsonObject`]) rather than
//! by one derived `Deserialize`, so that an error can name the field it is about (`param`), `null`
//! counts as absent (OpenAI clients send `"stop": null`), and unknown fields are ignored.

use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// The largest request body accepted, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A request type that can be built from the top-level JSON object of a body.
pub trait FromJsonObject: Sized {
    fn from_json_object(object: JsonObject) -> Result<Self, ApiError>;
}

/// Extracts `T` from a JSON body. The `Content-Type` is not enforced (curl sends form
/// encoding by default); what matters is that the bytes are a JSON object.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    BodyLimit: FromRef<S>,
    T: FromJsonObject,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let BodyLimit(limit) = BodyLimit::from_ref(state);
        let (parts, body) = request.into_parts();
        let bytes = read_limited(&parts.headers, body, limit).await?;
        let object = parse_object(&bytes, &parts.headers)?;
        T::from_json_object(object).map(JsonBody)
    }
}

/// Read the whole body, refusing it as soon as it is known to exceed `limit`.
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(declared.map_or(0, |length| length as usize));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|error| {
            tracing::debug!(%error, "reading the request body failed");
            ApiError::invalid_request("The request body could not be read.")
        })?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn parse_object(bytes: &[u8], headers: &HeaderMap) -> Result<JsonObject, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::invalid_request("The request body is not valid UTF-8."))?;
    let value: Value = serde_json::from_str(text).map_err(|error| {
        let mut message = format!("We could not parse the JSON body of your request: {error}.");
        if let Some(content_type) = non_json_content_type(headers) {
            message.push_str(&format!(
                " The Content-Type was '{content_type}'; send JSON with 'application/json'."
            ));
        }
        ApiError::invalid_request(message)
    })?;
    match value {
        Value::Object(map) => Ok(JsonObject(map)),
        other => Err(ApiError::invalid_request(format!(
            "The request body must be a JSON object, not {}.",
            json_kind(&other)
        ))),
    }
}

/// The `Content-Type`, when one was sent and it is not JSON.
fn non_json_content_type(headers: &HeaderMap) -> Option<&str> {
    let content_type = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    (!is_json_media_type(content_type)).then_some(content_type)
}

/// Whether the request says its body is JSON (`application/json` or a `+json` type).
pub fn is_json_content_type(headers: &HeaderMap) -> bool {
    let content_type = headers.get(CONTENT_TYPE).and_then(|value| value.to_str().ok());
    content_type.is_some_and(is_json_media_type)
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// "a string", "an array"… for error messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The top-level fields of a request body, taken out one at a time.
#[derive(Debug, Default)]
pub struct JsonObject(pub Map<String, Value>);

impl JsonObject {
    /// The raw value of a field; absent and `null` both give `None`.
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|value| !value.is_null())
    }

    /// A field that may be absent or `null`.
    pub fn optional<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        self.take(name)
            .map(|value| {
                serde_json::from_value(value).map_err(|error| {
                    ApiError::invalid_param(name, format!("Invalid value for '{name}': {error}."))
                })
            })
            .transpose()
    }

    /// A field that must be present and not `null`.
    pub fn required<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, ApiError> {
        self.optional(name)?.ok_or_else(|| missing(name))
    }

    /// A required string that must not be empty, such as `model`.
    pub fn required_text(&mut self, name: &str) -> Result<String, ApiError> {
        let text: String = self.required(name)?;
        if text.is_empty() {
            return Err(ApiError::invalid_param(name, format!("'{name}' must not be empty.")));
        }
        Ok(text)
    }
}

pub fn missing(name: &str) -> ApiError {
    ApiError::invalid_param(name, format!("Missing required parameter: '{name}'."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: &str) -> JsonObject {
        parse_object(json.as_bytes(), &HeaderMap::new()).unwrap()
    }

    #[test]
    fn null_counts_as_absent() {
        let mut fields = object(r#"{"stop": null}"#);
        assert_eq!(fields.optional::<String>("stop").unwrap(), None);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let mut fields = object(r#"{"temperature": "hot"}"#);
        let error = fields.optional::<f64>("temperature").unwrap_err();
        assert_eq!(error.body().error.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn arrays_are_not_objects() {
        let error = parse_object(b"[1]", &HeaderMap::new()).unwrap_err();
        assert!(error.to_string().contains("an array"), "{error}");
    }

    #[test]
    fn form_content_type_is_mentioned_when_parsing_fails() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/x-www-form-urlencoded".parse().unwrap());
        let error = parse_object(b"a=1", &headers).unwrap_err();
        assert!(error.to_string().contains("application/json"), "{error}");
    }
}
