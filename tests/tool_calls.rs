//! Tool calls end to end on SmolLM2-135M-Instruct, whose chat template knows no tools (llmesh's
//! generic format), through a two-node cluster whose entry has no model: `required`, a named
//! function and `auto`, whole and streamed in OpenAI's delta shape, a round trip with the tool's
//! result, the Responses API's `function_call` items, and malformed tools refused naming their
//! field. The arguments always satisfy the tool's schema. The model comes from
//! `scripts/fetch-models.sh` (LLMESH_MODELS_DIR to look elsewhere than `models/`).

mod support;

use axum::http::StatusCode;
use llmesh::node::Node;
use serde_json::{Value, json};

use support::cluster::{call, entry_node};
use support::demo_models::smollm2_host_and_entry;

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            },
            "required": ["city", "unit"],
            "additionalProperties": false
        }
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time", "description": "The time now, in UTC."}})
}

fn request(messages: Value, tool_choice: Value, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": messages,
        "tools": [weather_tool(), time_tool()],
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 200,
        "stream": stream,
    })
}

fn weather_question() -> Value {
    json!([{"role": "user", "content": "What is the weather in Paris, in celsius?"}])
}

/// A call's arguments, checked against the tool's schema by hand.
fn assert_valid_call(name: &str, arguments: &str) {
    let arguments: Value =
        serde_json::from_str(arguments).unwrap_or_else(|e| panic!("not JSON ({e}): {arguments}"));
    let arguments = arguments.as_object().unwrap_or_else(|| panic!("not an object: {arguments}"));
    match name {
        "get_weather" => {
            let mut keys: Vec<&str> = arguments.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["city", "unit"], "{arguments:?}");
            assert!(
                arguments["city"].as_str().is_some_and(|city| city.chars().count() <= 30),
                "{arguments:?}"
            );
            assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap_or_default()));
        }
        "get_time" => assert!(arguments.is_empty(), "get_time takes nothing: {arguments:?}"),
        other => panic!("an unknown function was called: {other}"),
    }
}

/// The calls of a whole answer, checked, as (name, arguments).
fn calls_of(answer: &Value) -> Vec<(String, String)> {
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    assert!(choice["message"]["content"].is_null(), "only calls: {answer}");
    let calls =
        choice["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("no tool_calls: {answer}"));
    assert!(!calls.is_empty());
    calls
        .iter()
        .map(|call| {
            assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{call}");
            assert_eq!(call["type"], "function");
            let name = call["function"]["name"].as_str().expect("a name").to_string();
            let arguments = call["function"]["arguments"].as_str().expect("arguments as text").to_string();
            assert_valid_call(&name, &arguments);
            (name, arguments)
        })
        .collect()
}

/// A streamed answer put back together from its deltas, checking their shape: the first delta of
/// call `i` carries `index`, `id`, `type` and the name; later ones only argument fragments.
fn assemble_stream(body: &str) -> (String, Vec<(String, String)>, String) {
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish_reason = String::new();
    for line in body.lines().filter_map(|line| line.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish_reason = reason.to_string();
        }
        if let Some(text) = choice["delta"]["content"].as_str() {
            content.push_str(text);
        }
        for delta in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = delta["index"].as_u64().expect("an index") as usize;
            if index == calls.len() {
                assert!(delta["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{delta}");
                assert_eq!(delta["type"], "function", "{delta}");
                calls.push((delta["function"]["name"].as_str().expect("a name").to_string(), String::new()));
            } else {
                assert_eq!(index + 1, calls.len(), "deltas of one call follow each other: {delta}");
                assert!(delta.get("id").is_none() && delta["function"].get("name").is_none(), "{delta}");
            }
            calls[index].1.push_str(delta["function"]["arguments"].as_str().expect("arguments text"));
        }
    }
    (content, calls, finish_reason)
}

async fn chat(entry: &Node, body: Value) -> Value {
    let response = call(entry, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(response.served_by.as_deref(), Some("host"));
    serde_json::from_str(&response.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_through_a_remote_host() {
    let dir = tempfile::tempdir().unwrap();
    let (host, entry) = smollm2_host_and_entry(&dir).await;

    // `required`: at least one call, of either tool, its arguments valid.
    let answer = chat(&entry, request(weather_question(), json!("required"), false)).await;
    let calls = calls_of(&answer);
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // A named function, one call only, streamed.
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let mut body = request(weather_question(), named, true);
    body["parallel_tool_calls"] = json!(false);
    let response = call(&entry, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let (content, streamed, finish_reason) = assemble_stream(&response.body);
    assert_eq!((content.as_str(), finish_reason.as_str()), ("", "tool_calls"), "{}", response.body);
    assert_eq!(streamed.len(), 1, "{streamed:?}");
    assert_eq!(streamed[0].0, "get_time");
    assert_valid_call(&streamed[0].0, &streamed[0].1);

    // The round trip: the first answer's call and the tool's result, then the final answer.
    let (name, arguments) = calls[0].clone();
    let id = answer["choices"][0]["message"]["tool_calls"][0]["id"].clone();
    let mut messages = weather_question();
    let messages_list = messages.as_array_mut().unwrap();
    messages_list.push(json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}));
    messages_list.push(json!({"role": "tool", "tool_call_id": id, "content": "Sunny, 21 degrees celsius."}));
    for stream in [false, true] {
        let final_answer = request(messages.clone(), json!("none"), stream);
        let response = call(&entry, "POST", "/v1/chat/completions", Some(final_answer)).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        let (content, finish_reason) = if stream {
            let (content, calls, finish_reason) = assemble_stream(&response.body);
            assert!(calls.is_empty(), "tool_choice none: {}", response.body);
            (content, finish_reason)
        } else {
            let answer: Value = serde_json::from_str(&response.body).unwrap();
            let message = &answer["choices"][0]["message"];
            assert!(message.get("tool_calls").is_none(), "{answer}");
            (
                message["content"].as_str().unwrap().to_string(),
                answer["choices"][0]["finish_reason"].to_string(),
            )
        };
        assert!(!content.trim().is_empty() && !finish_reason.contains("tool_calls"), "{}", response.body);
    }

    // `auto`: the model chooses; either way the answer is well formed, whole and streamed alike.
    let answer = chat(&entry, request(weather_question(), json!("auto"), false)).await;
    let response =
        call(&entry, "POST", "/v1/chat/completions", Some(request(weather_question(), json!("auto"), true)))
            .await;
    let (content, streamed, finish_reason) = assemble_stream(&response.body);
    let choice = &answer["choices"][0];
    if choice["finish_reason"] == "tool_calls" {
        let whole = calls_of(&answer);
        assert_eq!(
            whole.iter().map(|call| &call.0).collect::<Vec<_>>(),
            streamed.iter().map(|call| &call.0).collect::<Vec<_>>()
        );
        assert_eq!(finish_reason, "tool_calls");
    } else {
        assert_eq!(choice["message"]["content"].as_str(), Some(content.as_str()), "the same greedy answer");
        assert!(!content.starts_with('{'), "the generic format's wrapper is not shown: {content}");
    }

    // The Responses API, the same through the entry: a `function_call` output item.
    let mut flat = weather_tool();
    let function = flat.as_object_mut().unwrap().remove("function").unwrap();
    flat.as_object_mut().unwrap().extend(function.as_object().unwrap().clone());
    let body = json!({"model": "smollm2", "input": "What is the weather in Paris, in celsius?", "tools": [flat],
        "tool_choice": "required", "temperature": 0, "max_output_tokens": 200});
    let response = call(&entry, "POST", "/v1/responses", Some(body)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let answer: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!((&answer["object"], &answer["status"]), (&json!("response"), &json!("completed")), "{answer}");
    let item = &answer["output"][0];
    assert_eq!((&item["type"], &item["name"]), (&json!("function_call"), &json!("get_weather")), "{answer}");
    assert_valid_call("get_weather", item["arguments"].as_str().unwrap());

    entry.shutdown();
    host.shutdown();
    entry.join().await.unwrap();
    host.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tools_are_refused_naming_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let entry = entry_node("entry", &dir, Vec::new(), |_| {}).await;
    let cases = [
        (json!({"tools": "get_weather"}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "get weather"}}]}),
            "tools[0].function.name",
        ),
        (json!({"tools": [weather_tool()], "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"messages": [{"role": "tool", "content": "21"}]}), "messages[0].tool_call_id"),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"type": "function"}]}]}),
            "messages[0].tool_calls[0].id",
        ),
    ];
    for (fields, param) in cases {
        let mut body = json!({"model": "smollm2", "messages": weather_question()});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let response = call(&entry, "POST", "/v1/chat/completions", Some(body)).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{}", response.body);
        let error: Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    entry.shutdown();
    entry.join().await.unwrap();
}
