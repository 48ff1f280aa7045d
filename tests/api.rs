//! The HTTP API through the real router (`oneshot`, no socket) over a fake engine whose models
//! answer with scripted events, so every status code and every stream framing can be provoked.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use http_body_util::BodyExt;
use llmesh::api::{self, ApiConfig};
use llmesh::engine::{ChatMessage, Prompt};
use support::fake_engine::*;
use tower::ServiceExt;

#[tokio::test]
async fn health_is_ok() {
    let answer = send(router(), get("/health")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), json!({"status": "ok"}));
    assert!(answer.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn models_are_listed_in_openai_shape() {
    let answer = send(router(), get("/v1/models")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        data[0],
        json!({
            "id": "fake-chat", "object": "model", "created": 1_700_000_000u64, "owned_by": "llmesh",
            "llmesh": {"kind": "chat", "architecture": "fake", "quantization": "f32",
                       "context_length": CHAT_CONTEXT, "parameters": 0, "file_bytes": 0, "hosts": []},
        })
    );
    assert_eq!(data[1]["llmesh"]["kind"], "embeddings");
}

#[tokio::test]
async fn chat_completion_collects_text_and_usage() {
    let answer = post_json(router(), "/v1/chat/completions", chat_body("fake-chat")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["model"], "fake-chat");
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "Hello, world"},
                "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(body["usage"], json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}));
}

#[tokio::test]
async fn chat_request_reaches_the_engine_as_sampling_params() {
    let (app, engine) = setup(ApiConfig::default());
    let request = json!({
        "model": "fake-chat",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "one"},
                {"type": "text", "text": "two"},
            ]},
        ],
        "temperature": 0.25, "top_p": 0.5, "top_k": 40, "max_tokens": 9, "stop": ["\n\n", "END"],
        "seed": 42, "frequency_penalty": 0.5, "presence_penalty": -1, "n": 1, "user": "ignored",
        "ignore_eos": true,
        "logit_bias": {}, "some_future_field": [1, 2],
    });
    assert_eq!(post_json(app, "/v1/chat/completions", request).await.status, StatusCode::OK);
    let seen = engine.last_generate.lock().unwrap().clone().unwrap();
    assert_eq!(seen.model, "fake-chat");
    assert_eq!(
        seen.prompt,
        Prompt::Chat(vec![ChatMessage::text("system", "Be brief."), ChatMessage::text("user", "one\ntwo"),])
    );
    let params = seen.params;
    assert_eq!((params.temperature, params.top_p, params.top_k), (0.25, 0.5, 40));
    assert_eq!(params.max_tokens, 9);
    assert_eq!(params.stop, ["\n\n", "END"]);
    assert_eq!(params.seed, Some(42));
    assert_eq!((params.frequency_penalty, params.presence_penalty), (0.5, -1.0));
    assert!(params.ignore_eos);
}

#[tokio::test]
async fn chat_without_a_limit_may_fill_the_context() {
    let (app, engine) = setup(ApiConfig::default());
    post_json(app.clone(), "/v1/chat/completions", chat_body("fake-chat")).await;
    let params = engine.last_generate.lock().unwrap().clone().unwrap().params;
    assert_eq!(params.max_tokens, CHAT_CONTEXT);
    assert_eq!((params.temperature, params.top_p, params.top_k), (1.0, 1.0, 0));
    assert!(params.stop.is_empty());

    let mut request = chat_body("fake-chat");
    request["max_tokens"] = json!(5);
    request["max_completion_tokens"] = json!(11);
    request["stop"] = json!("STOP");
    post_json(app, "/v1/chat/completions", request).await;
    let params = engine.last_generate.lock().unwrap().clone().unwrap().params;
    assert_eq!(params.max_tokens, 11, "max_completion_tokens wins");
    assert_eq!(params.stop, ["STOP"]);
}

#[tokio::test]
async fn streamed_chat_is_framed_like_openai() {
    let mut request = chat_body("fake-chat");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let data = post_json(router(), "/v1/chat/completions", request).await.sse_data();

    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(chunks.len(), 1 + SCRIPTED_TEXT.len() + 2, "role, texts, finish, usage");
    let id = &chunks[0]["id"];
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(&chunk["id"], id, "one id per stream");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "fake-chat");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let text: String = chunks[1..=SCRIPTED_TEXT.len()]
        .iter()
        .map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, SCRIPTED_TEXT.concat());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    for chunk in &chunks[..chunks.len() - 1] {
        assert!(chunk["usage"].is_null() && chunk.as_object().unwrap().contains_key("usage"));
    }
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}));
}

#[tokio::test]
async fn streamed_chat_without_usage_has_no_usage_field() {
    let mut request = chat_body("fake-chat");
    request["stream"] = json!(true);
    let data = post_json(router(), "/v1/chat/completions", request).await.sse_data();
    assert_eq!(data.len(), 1 + SCRIPTED_TEXT.len() + 1 + 1, "role, texts, finish, [DONE]");
    for line in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(line).unwrap();
        assert!(!chunk.as_object().unwrap().contains_key("usage"), "{chunk}");
    }
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn error_mid_stream_becomes_an_error_event_then_done() {
    let mut request = chat_body("fake-broken");
    request["stream"] = json!(true);
    let data = post_json(router(), "/v1/chat/completions", request).await.sse_data();
    assert_eq!(data.len(), 4, "role, text, error, [DONE]: {data:?}");
    let text: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(text["choices"][0]["delta"]["content"], "partial");
    let error = assert_openai_error(&serde_json::from_str(&data[2]).unwrap());
    assert_eq!(error["type"], "server_error");
    assert!(!error["message"].as_str().unwrap().contains("secret"), "internal detail leaked");
    assert_eq!(data[3], "[DONE]");
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_generation() {
    let (app, engine) = setup(ApiConfig::default());
    let (cancelled_sender, cancelled) = oneshot::channel();
    *engine.cancelled.lock().unwrap() = Some(cancelled_sender);
    let mut request = chat_body("fake-endless");
    request["stream"] = json!(true);
    let response = app.oneshot(post("/v1/chat/completions", request.to_string())).await.unwrap();
    let mut body = response.into_body();
    // The generation never ends, so seeing a tick proves the body is relayed incrementally.
    loop {
        let frame = body.frame().await.expect("the stream goes on").unwrap();
        if frame.data_ref().is_some_and(|data| data.windows(4).any(|w| w == b"tick")) {
            break;
        }
    }
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), cancelled)
        .await
        .expect("the engine saw the receiver dropped")
        .unwrap();
}

#[tokio::test]
async fn chat_failures_map_to_statuses() {
    let answer = post_json(router(), "/v1/chat/completions", chat_body("fake-broken")).await;
    let error = answer.error(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!error["message"].as_str().unwrap().contains("secret"));

    let answer = post_json(router(), "/v1/chat/completions", chat_body("fake-silent")).await;
    answer.error(StatusCode::INTERNAL_SERVER_ERROR);

    let answer = post_json(router(), "/v1/chat/completions", chat_body("no-such-model")).await;
    let error = answer.error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");

    let answer = post_json(router(), "/v1/chat/completions", chat_body("fake-embed")).await;
    assert_eq!(answer.error(StatusCode::BAD_REQUEST)["param"], "model");
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let answer = post_json(router(), "/v1/chat/completions", chat_body("fake-busy")).await;
    let error = answer.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["code"], "model_busy");
    assert_eq!(answer.headers[header::RETRY_AFTER], "1");
}

#[tokio::test]
async fn invalid_chat_requests_are_400_naming_the_field() {
    let cases = [
        (json!({"model": "fake-chat", "messages": []}), "messages"),
        (json!({"model": "fake-chat"}), "messages"),
        (json!({"model": "fake-chat", "messages": "Hi"}), "messages"),
        (json!({"messages": [{"role": "user", "content": "Hi"}]}), "model"),
        (json!({"model": 7, "messages": [{"role": "user", "content": "Hi"}]}), "model"),
        (
            json!({"model": "fake-chat", "messages": [{"role": "wizard", "content": "Hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "fake-chat", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
            ]}),
            "messages[0].content",
        ),
        (json!({"model": "fake-chat", "messages": [{"role": "user", "content": 3}]}), "messages[0].content"),
    ];
    for (request, param) in cases {
        let answer = post_json(router(), "/v1/chat/completions", request.clone()).await;
        let error = answer.error(StatusCode::BAD_REQUEST);
        assert_eq!(error["type"], "invalid_request_error", "{request}");
        assert_eq!(error["param"], param, "{request}");
    }
    let sampling = [
        ("temperature", json!(2.5)),
        ("temperature", json!(-0.1)),
        ("temperature", json!("hot")),
        ("top_p", json!(0)),
        ("top_k", json!(-1)),
        ("max_tokens", json!(0)),
        ("max_completion_tokens", json!(-5)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stop", json!("")),
        ("frequency_penalty", json!(2.5)),
        ("n", json!(9)),
        ("stream", json!("yes")),
        ("stream_options", json!(true)),
    ];
    for (field, value) in sampling {
        let mut request = chat_body("fake-chat");
        request[field] = value.clone();
        let answer = post_json(router(), "/v1/chat/completions", request).await;
        let error = answer.error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], field, "{field}: {value}");
    }
}

#[tokio::test]
async fn unreadable_bodies_are_400_json() {
    let bodies: [&[u8]; 6] = [
        b"{not json",
        br#"{"model": "fake-chat", "messages": [{"role": "user""#,
        b"",
        b"[1, 2]",
        b"\xff\xfe{\"model\": \"fake-chat\"}",
        b"model=fake-chat&messages=hi",
    ];
    for body in bodies {
        let answer = send(router(), post("/v1/chat/completions", body.to_vec())).await;
        let error = answer.error(StatusCode::BAD_REQUEST);
        assert_eq!(error["type"], "invalid_request_error", "{}", String::from_utf8_lossy(body));
    }
    let form = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("model=fake-chat"))
        .unwrap();
    let error = send(router(), form).await.error(StatusCode::BAD_REQUEST);
    assert!(error["message"].as_str().unwrap().contains("application/json"));
    // A JSON body is accepted whatever the Content-Type says (curl -d sends form encoding).
    let lenient =
        Request::post("/v1/chat/completions").body(Body::from(chat_body("fake-chat").to_string())).unwrap();
    assert_eq!(send(router(), lenient).await.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let padding = "a".repeat(10 * 1024 * 1024);
    let huge = format!(r#"{{"model":"fake-chat","messages":[{{"role":"user","content":"{padding}"}}]}}"#);
    let answer = send(router(), post("/v1/chat/completions", huge.clone())).await;
    assert_eq!(answer.error(StatusCode::PAYLOAD_TOO_LARGE)["code"], "request_too_large");
    // Also when the client declares its length up front.
    let declared = Request::post("/v1/chat/completions")
        .header(header::CONTENT_LENGTH, huge.len())
        .body(Body::from(huge))
        .unwrap();
    send(router(), declared).await.error(StatusCode::PAYLOAD_TOO_LARGE);

    let (small, _) = setup(ApiConfig { max_body_bytes: 200, ..ApiConfig::default() });
    let fits = post_json(small.clone(), "/v1/chat/completions", chat_body("fake-chat")).await;
    assert_eq!(fits.status, StatusCode::OK);
    let mut request = chat_body("fake-chat");
    request["messages"][0]["content"] = json!("x".repeat(200));
    post_json(small, "/v1/chat/completions", request).await.error(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn api_key_guards_v1_but_not_health() {
    let config = ApiConfig { api_key: Some("sk-test-key".into()), ..ApiConfig::default() };
    let (app, _) = setup(config);

    assert_eq!(send(app.clone(), get("/health")).await.status, StatusCode::OK);

    let missing = send(app.clone(), get("/v1/models")).await;
    let error = missing.error(StatusCode::UNAUTHORIZED);
    assert_eq!(error["code"], "invalid_api_key");
    assert!(error["message"].as_str().unwrap().contains("didn't provide"));

    let with_key = |key: &str| {
        Request::get("/v1/models")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    for wrong in ["sk-test-kez", "sk-test-key-and-more", "sk-test-ke", "x"] {
        let error = send(app.clone(), with_key(wrong)).await.error(StatusCode::UNAUTHORIZED);
        assert!(error["message"].as_str().unwrap().contains("Incorrect API key"), "{wrong}");
    }
    assert_eq!(send(app.clone(), with_key("sk-test-key")).await.status, StatusCode::OK);

    // POST routes are guarded too, before the body is even read.
    let unauthorized = send(app.clone(), post("/v1/chat/completions", "{bad json")).await;
    unauthorized.error(StatusCode::UNAUTHORIZED);
    let authorized = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, "Bearer sk-test-key")
        .body(Body::from(chat_body("fake-chat").to_string()))
        .unwrap();
    assert_eq!(send(app, authorized).await.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let error = send(router(), get("/v1/nope")).await.error(StatusCode::NOT_FOUND);
    assert!(error["message"].as_str().unwrap().contains("/v1/nope"));
    let wrong_method = send(router(), get("/v1/chat/completions")).await;
    wrong_method.error(StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.headers[header::ALLOW], "POST");
    send(router(), post("/v1/models", "{}")).await.error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn legacy_completion_uses_the_raw_prompt() {
    let (app, engine) = setup(ApiConfig::default());
    let request = json!({"model": "fake-chat", "prompt": ["Once upon"], "temperature": 0});
    let answer = post_json(app, "/v1/completions", request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(
        body["choices"],
        json!([{"text": "Hello, world", "index": 0, "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(body["usage"]["total_tokens"], 10);
    let seen = engine.last_generate.lock().unwrap().clone().unwrap();
    assert_eq!(seen.prompt, Prompt::Text("Once upon".into()));
    assert_eq!(seen.params.max_tokens, api::DEFAULT_COMPLETION_MAX_TOKENS);
    assert_eq!(seen.params.temperature, 0.0);
}

#[tokio::test]
async fn streamed_legacy_completion() {
    let request = json!({"model": "fake-chat", "prompt": "Once", "stream": true,
                         "stream_options": {"include_usage": true}});
    let data = post_json(router(), "/v1/completions", request).await.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(chunks.len(), SCRIPTED_TEXT.len() + 2, "texts, finish, usage");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
    }
    let text: String = chunks[..SCRIPTED_TEXT.len()]
        .iter()
        .map(|chunk| chunk["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, SCRIPTED_TEXT.concat());
    assert_eq!(chunks[SCRIPTED_TEXT.len()]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[SCRIPTED_TEXT.len() + 1]["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn legacy_prompt_must_be_one_string() {
    for prompt in [json!(["a", "b"]), json!([1, 2, 3]), json!(5), json!("")] {
        let request = json!({"model": "fake-chat", "prompt": prompt});
        let answer = post_json(router(), "/v1/completions", request).await;
        assert_eq!(answer.error(StatusCode::BAD_REQUEST)["param"], "prompt", "{prompt}");
    }
}

#[tokio::test]
async fn embeddings_as_floats() {
    let (app, engine) = setup(ApiConfig::default());
    let request = json!({"model": "fake-embed", "input": ["first", "second"]});
    let answer = post_json(app, "/v1/embeddings", request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({
            "object": "list",
            "data": [
                {"object": "embedding", "index": 0, "embedding": embedding(0)},
                {"object": "embedding", "index": 1, "embedding": embedding(1)},
            ],
            "model": "fake-embed",
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        })
    );
    let seen = engine.last_embed.lock().unwrap().clone().unwrap();
    assert_eq!(seen.inputs, ["first", "second"]);
}

#[tokio::test]
async fn embeddings_as_base64() {
    let request = json!({"model": "fake-embed", "input": "only", "encoding_format": "base64"});
    let answer = post_json(router(), "/v1/embeddings", request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let encoded = answer.json()["data"][0]["embedding"].as_str().unwrap().to_owned();
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let floats: Vec<f32> =
        bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap())).collect();
    assert_eq!(floats, embedding(0));
}

#[tokio::test]
async fn invalid_embedding_requests() {
    let cases = [
        (json!({"model": "fake-embed", "input": [1, 2, 3]}), "input"),
        (json!({"model": "fake-embed", "input": [[1, 2]]}), "input"),
        (json!({"model": "fake-embed", "input": []}), "input"),
        (json!({"model": "fake-embed", "input": ["ok", ""]}), "input"),
        (json!({"model": "fake-embed"}), "input"),
        (json!({"model": "fake-embed", "input": "x", "encoding_format": "int8"}), "encoding_format"),
        (json!({"model": "fake-embed", "input": "x", "dimensions": 64}), "dimensions"),
    ];
    for (request, param) in cases {
        let answer = post_json(router(), "/v1/embeddings", request.clone()).await;
        assert_eq!(answer.error(StatusCode::BAD_REQUEST)["param"], param, "{request}");
    }
    let token_error = post_json(router(), "/v1/embeddings", json!({"model": "fake-embed", "input": [1]}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(token_error["message"].as_str().unwrap().contains("Token arrays"));

    let unknown = json!({"model": "nope", "input": "x"});
    let error = post_json(router(), "/v1/embeddings", unknown).await.error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
    let wrong_kind = json!({"model": "fake-chat", "input": "x"});
    post_json(router(), "/v1/embeddings", wrong_kind).await.error(StatusCode::BAD_REQUEST);
}
