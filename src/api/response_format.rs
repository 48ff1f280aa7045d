//! `response_format`, read from JSON into the engine's `ResponseFormat`:
//! `{"type": "text"}`, `{"type": "json_object"}`, or
//! `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
//! Under `"strict": true` every object schema that names its properties takes no others unless it
//! says so (`close_objects`), as OpenAI's strict mode has it.
//!
//! Only the shape is checked here, each error naming the field as OpenAI does
//! (`response_format.json_schema.name`); what the schema asks for is checked when the host that
//! runs the request compiles it (`EngineError::InvalidParam` naming
//! `response_format.json_schema.schema`).

use serde_json::{Map, Value};

use super::error::ApiError;
use super::extract::json_kind;
use crate::engine::{ResponseFormat, close_objects, excerpt, valid_name};

const TYPES: &str = "'text', 'json_object' or 'json_schema'";

/// The request's `response_format`; plain text when it is absent or null.
pub fn parse_response_format(value: Option<Value>) -> Result<ResponseFormat, ApiError> {
    let mut format = match value {
        None | Some(Value::Null) => return Ok(ResponseFormat::Text),
        Some(Value::Object(format)) => format,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "response_format",
                format!("'response_format' must be an object, not {}.", json_kind(&other)),
            ));
        }
    };
    let kind = match format.remove("type") {
        Some(Value::String(kind)) => kind,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "response_format.type",
                format!("'response_format.type' is required: one of {TYPES}."),
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                "response_format.type",
                format!("'response_format.type' must be a string, not {}.", json_kind(&other)),
            ));
        }
    };
    match kind.as_str() {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => parse_json_schema(format.remove("json_schema")),
        other => Err(ApiError::invalid_param(
            "response_format.type",
            format!("Unsupported 'response_format.type' '{}': expected {TYPES}.", excerpt(other)),
        )),
    }
}

fn parse_json_schema(value: Option<Value>) -> Result<ResponseFormat, ApiError> {
    const FIELD: &str = "response_format.json_schema";
    let mut json_schema = match value {
        Some(Value::Object(json_schema)) => json_schema,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                FIELD,
                "'response_format.json_schema' is required when the type is 'json_schema'.",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                FIELD,
                format!("'{FIELD}' must be an object, not {}.", json_kind(&other)),
            ));
        }
    };
    check_name(json_schema.remove("name"))?;
    let strict = json_schema.get("strict") == Some(&Value::Bool(true));
    optional(&mut json_schema, "strict", Value::is_boolean, "a boolean")?;
    optional(&mut json_schema, "description", Value::is_string, "a string")?;
    let schema = match json_schema.remove("schema") {
        // OpenAI's default: any JSON value.
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(schema)) => schema,
        Some(other) => {
            return Err(ApiError::invalid_param(
                format!("{FIELD}.schema"),
                format!("'{FIELD}.schema' must be an object, not {}.", json_kind(&other)),
            ));
        }
    };
    let mut schema = Value::Object(schema);
    if strict {
        close_objects(&mut schema);
    }
    Ok(ResponseFormat::JsonSchema { schema: schema.to_string() })
}

/// OpenAI's rule, the same as for function names: 1 to 64 letters, digits, underscores and dashes.
fn check_name(value: Option<Value>) -> Result<(), ApiError> {
    const FIELD: &str = "response_format.json_schema.name";
    let name = match value {
        Some(Value::String(name)) => name,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(FIELD, format!("'{FIELD}' is required.")));
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                FIELD,
                format!("'{FIELD}' must be a string, not {}.", json_kind(&other)),
            ));
        }
    };
    if !valid_name(&name) {
        return Err(ApiError::invalid_param(
            FIELD,
            format!("'{FIELD}' must be 1 to 64 letters, digits, underscores or dashes."),
        ));
    }
    Ok(())
}

fn optional(
    json_schema: &mut Map<String, Value>,
    name: &str,
    is_kind: fn(&Value) -> bool,
    kind: &str,
) -> Result<(), ApiError> {
    match json_schema.remove(name) {
        None | Some(Value::Null) => Ok(()),
        Some(value) if is_kind(&value) => Ok(()),
        Some(other) => Err(ApiError::invalid_param(
            format!("response_format.json_schema.{name}"),
            format!("'response_format.json_schema.{name}' must be {kind}, not {}.", json_kind(&other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn param_of(value: Value) -> String {
        let error = parse_response_format(Some(value)).expect_err("refused");
        assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);
        error.body().error.param.expect("a param")
    }

    #[test]
    fn the_three_types() {
        assert_eq!(parse_response_format(None).unwrap(), ResponseFormat::Text);
        assert_eq!(parse_response_format(Some(json!({"type": "text"}))).unwrap(), ResponseFormat::Text);
        let object = parse_response_format(Some(json!({"type": "json_object"}))).unwrap();
        assert_eq!(object, ResponseFormat::JsonObject);
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let parsed = |strict: Value| {
            let format = json!({"type": "json_schema", "json_schema": {"name": "a_b-1", "schema": schema, "strict": strict}});
            let ResponseFormat::JsonSchema { schema: text } = parse_response_format(Some(format)).unwrap()
            else {
                panic!("not a schema");
            };
            serde_json::from_str::<Value>(&text).unwrap()
        };
        assert_eq!(parsed(json!(false)), schema);
        assert_eq!(parsed(Value::Null), schema);
        // Strict: no keys but the named ones.
        let mut closed = schema.clone();
        closed["additionalProperties"] = json!(false);
        assert_eq!(parsed(json!(true)), closed);
    }

    #[test]
    fn malformed_values_name_their_field() {
        assert_eq!(param_of(json!("json_object")), "response_format");
        assert_eq!(param_of(json!({})), "response_format.type");
        assert_eq!(param_of(json!({"type": 3})), "response_format.type");
        assert_eq!(param_of(json!({"type": "yaml"})), "response_format.type");
        assert_eq!(param_of(json!({"type": "json_schema"})), "response_format.json_schema");
        assert_eq!(
            param_of(json!({"type": "json_schema", "json_schema": []})),
            "response_format.json_schema"
        );
        let with = |json_schema: Value| json!({"type": "json_schema", "json_schema": json_schema});
        assert_eq!(param_of(with(json!({"schema": {}}))), "response_format.json_schema.name");
        assert_eq!(param_of(with(json!({"name": "a b", "schema": {}}))), "response_format.json_schema.name");
        assert_eq!(param_of(with(json!({"name": "x".repeat(65)}))), "response_format.json_schema.name");
        assert_eq!(
            param_of(with(json!({"name": "n", "schema": "{}"}))),
            "response_format.json_schema.schema"
        );
        assert_eq!(
            param_of(with(json!({"name": "n", "strict": "yes"}))),
            "response_format.json_schema.strict"
        );
    }
}
