//! `response_format` end to end on SmolLM2-135M-Instruct: the answers parse as JSON and hold to
//! their schema, greedy and sampled, batched beside a plain answer, and through a two-node
//! cluster whose entry has no model (the request and a schema error cross `/llmesh/infer/3`).
//! The models come from `scripts/fetch-models.sh`; set LLMESH_MODELS_DIR to look elsewhere than
//! `models/`.

mod support;

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use llmesh::api::{self, ApiConfig};
use llmesh::engine::{LocalEngine, QueueLimits, SharedEngine};
use serde_json::{Map, Value, json};
use tower::ServiceExt;

use support::cluster::call;
use support::demo_models::{smollm2, smollm2_host_and_entry};

fn engine() -> SharedEngine {
    static ENGINE: OnceLock<SharedEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            // No prompt cache: an answer that starts from a cached prefix may differ in near-ties,
            // and the batching test compares answers.
            let limits = QueueLimits { prompt_cache_tokens: 0, ..QueueLimits::default() };
            let engine =
                LocalEngine::load(&[smollm2()], limits, &candle_core::Device::Cpu).expect("load SmolLM2");
            Arc::new(engine)
        })
        .clone()
}

async fn post(body: Value) -> (StatusCode, Value) {
    let app = api::app(engine(), ApiConfig::default());
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).expect("a JSON body"))
}

/// A person: a bounded string, an integer range, an enum, a nested object with a pattern, an
/// array of 1 to 3 short strings; everything required, nothing else allowed.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "role", "address", "tags"],
        "additionalProperties": false
    })
}

fn person_request(temperature: f64, seed: u64) -> Value {
    json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": "Describe Alice, a 34 year old administrator from Paris."}
        ],
        "temperature": temperature,
        "seed": seed,
        "max_tokens": 300,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": person_schema(), "strict": true}
        }
    })
}

/// The answer's text, after checking that it ended by itself.
fn content(answer: &Value) -> &str {
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "the grammar ends the answer: {answer}");
    choice["message"]["content"].as_str().expect("text content")
}

fn keys(object: &Map<String, Value>) -> Vec<&str> {
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// `person_schema`, checked by hand.
fn assert_person(text: &str) {
    let person: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let person = person.as_object().unwrap_or_else(|| panic!("not an object: {text}"));
    assert_eq!(keys(person), ["address", "age", "name", "role", "tags"], "{text}");
    assert!(person["name"].as_str().is_some_and(|name| name.chars().count() <= 30), "{text}");
    assert!(person["age"].as_u64().is_some_and(|age| age <= 120), "{text}");
    assert!(["admin", "user", "guest"].contains(&person["role"].as_str().unwrap_or_default()), "{text}");
    let address = person["address"].as_object().unwrap_or_else(|| panic!("no address object: {text}"));
    assert_eq!(keys(address), ["city", "zip"], "{text}");
    assert!(address["city"].as_str().is_some_and(|city| city.chars().count() <= 30), "{text}");
    let zip = address["zip"].as_str().unwrap_or_default();
    assert!(zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()), "{text}");
    let tags = person["tags"].as_array().unwrap_or_else(|| panic!("no tags array: {text}"));
    assert!((1..=3).contains(&tags.len()), "{text}");
    assert!(tags.iter().all(|tag| tag.as_str().is_some_and(|tag| tag.chars().count() <= 15)), "{text}");
}

#[tokio::test]
async fn json_object_answers_are_json_objects() {
    // A greedy answer of this small model may loop inside a JSON string until `max_tokens` (a
    // string's length is free in a bare object), whatever the grammar: the prompt is one whose
    // answer closes.
    let (status, answer) = post(json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Give the name and the color of one fruit."}],
        "temperature": 0,
        "max_tokens": 300,
        "response_format": {"type": "json_object"}
    }))
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = content(&answer);
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(value.is_object(), "{text}");
}

#[tokio::test]
async fn legacy_completions_take_a_response_format_too() {
    let app = api::app(engine(), ApiConfig::default());
    let body = json!({
        "model": "smollm2",
        "prompt": "Alice is 34 and lives in Paris. As JSON:",
        "temperature": 0,
        "max_tokens": 200,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema()}}
    });
    let request = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert_person(answer["choices"][0]["text"].as_str().expect("text"));
}

#[tokio::test]
async fn greedy_json_schema_answers_hold_to_the_schema() {
    let (status, answer) = post(person_request(0.0, 0)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_person(content(&answer));
}

#[tokio::test]
async fn sampled_json_schema_answers_hold_to_the_schema() {
    for seed in 1..=3 {
        let (status, answer) = post(person_request(1.0, seed)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_person(content(&answer));
    }
}

#[tokio::test]
async fn a_plain_answer_batched_beside_a_constrained_one_is_unchanged() {
    let plain = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 30
    });
    let (_, alone) = post(plain.clone()).await;
    let ((_, beside), (_, constrained)) = tokio::join!(post(plain), post(person_request(0.0, 0)));
    assert_eq!(beside["choices"][0]["message"], alone["choices"][0]["message"]);
    assert!(!alone["choices"][0]["message"]["content"].as_str().unwrap().starts_with('{'));
    assert_person(content(&constrained));
}

#[tokio::test]
async fn schemas_the_engine_cannot_follow_are_refused_naming_them() {
    let overlapping = [
        json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        json!({"type": "object", "properties": {"b": {"type": "integer"}}}),
    ];
    let mut request = person_request(0.0, 0);
    request["response_format"]["json_schema"]["schema"] = json!({"oneOf": overlapping});
    let (status, answer) = post(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["param"], "response_format.json_schema.schema");
    assert!(answer["error"]["message"].as_str().unwrap().contains("oneOf"), "{answer}");
}

/// A node hosting SmolLM2, and an entry node without models peered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_host_follows_the_schema_and_reports_what_it_cannot_follow() {
    let dir = tempfile::tempdir().unwrap();
    let (host, entry) = smollm2_host_and_entry(&dir).await;

    let response = call(&entry, "POST", "/v1/chat/completions", Some(person_request(0.0, 0))).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(response.served_by.as_deref(), Some("host"));
    assert_person(content(&serde_json::from_str(&response.body).unwrap()));

    let mut request = person_request(0.0, 0);
    request["response_format"]["json_schema"]["schema"] =
        json!({"type": "object", "if": {"required": ["a"]}});
    let response = call(&entry, "POST", "/v1/chat/completions", Some(request)).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST, "{}", response.body);
    let error: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(error["error"]["param"], "response_format.json_schema.schema");
    assert!(error["error"]["message"].as_str().unwrap().contains("if"), "{error}");

    entry.shutdown();
    host.shutdown();
    entry.join().await.unwrap();
    host.join().await.unwrap();
}
