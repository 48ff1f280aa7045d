//! Log-probabilities, `logit_bias` and `n` end to end on SmolLM2-135M-Instruct, through a
//! two-node cluster whose entry has no model: chat `logprobs` + `top_logprobs` whole and
//! streamed, legacy completions' `logprobs`, each agreeing with the text; a bias that bans the
//! greedy first token and one that forces another; `n` choices sharing one prompt pass (greedy
//! copies equal the single answer), whole and streamed; malformed values refused naming the field. The
//! model comes from `scripts/fetch-models.sh` (LLMESH_MODELS_DIR to look elsewhere than `models/`).

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};

use support::cluster::call;
use support::demo_models::{smollm2, smollm2_host_and_entry};

fn smollm2_tokenizer() -> tokenizers::Tokenizer {
    let path = smollm2().path;
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    llmesh::engine::tokenizer_from_gguf(&content).unwrap().tokenizer
}

/// One chat entry: bytes and token agree, the log-probability is one, the alternatives are the
/// most likely first, and (greedy) the chosen token is the most likely one.
fn check_chat_entry(entry: &Value, top: usize) -> Vec<u8> {
    let bytes: Vec<u8> =
        entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    assert_eq!(entry["token"].as_str().unwrap(), String::from_utf8_lossy(&bytes), "{entry}");
    let logprob = entry["logprob"].as_f64().unwrap();
    assert!(logprob <= 0.0, "{entry}");
    let alternatives = entry["top_logprobs"].as_array().unwrap();
    assert_eq!(alternatives.len(), top, "{entry}");
    let values: Vec<f64> = alternatives.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|pair| pair[0] >= pair[1]), "most likely first: {entry}");
    if top > 0 {
        assert_eq!(alternatives[0]["token"], entry["token"], "greedy picks the most likely: {entry}");
        assert!((values[0] - logprob).abs() < 1e-6, "{entry}");
        assert!(values.iter().map(|v| v.exp()).sum::<f64>() <= 1.0 + 1e-4);
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_through_a_remote_host_agree_with_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let (host, entry) = smollm2_host_and_entry(&dir).await;

    let chat = |stream: bool| {
        json!({
            "model": "smollm2",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
            "temperature": 0,
            "max_tokens": 12,
            "logprobs": true,
            "top_logprobs": 3,
            "stream": stream,
        })
    };
    let response = call(&entry, "POST", "/v1/chat/completions", Some(chat(false))).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(response.served_by.as_deref(), Some("host"));
    let answer: Value = serde_json::from_str(&response.body).unwrap();
    let choice = &answer["choices"][0];
    let entries = choice["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(entries.len() as u64, answer["usage"]["completion_tokens"].as_u64().unwrap(), "{answer}");
    let bytes: Vec<u8> = entries.iter().flat_map(|entry| check_chat_entry(entry, 3)).collect();
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(String::from_utf8(bytes.clone()).unwrap().starts_with(text), "{answer}");

    // Streamed: the same entries, spread over the chunks.
    let response = call(&entry, "POST", "/v1/chat/completions", Some(chat(true))).await;
    let mut streamed = Vec::new();
    for line in
        response.body.lines().filter_map(|line| line.strip_prefix("data: ")).filter(|line| *line != "[DONE]")
    {
        let chunk: Value = serde_json::from_str(line).unwrap();
        for entry in chunk["choices"][0]["logprobs"]["content"].as_array().into_iter().flatten() {
            streamed.extend(check_chat_entry(entry, 3));
        }
    }
    assert_eq!(streamed, bytes, "{}", response.body);

    // Legacy completions: parallel arrays and offsets into the text.
    let completion =
        json!({"model": "smollm2", "prompt": "The sky is", "temperature": 0, "max_tokens": 8, "logprobs": 2});
    let response = call(&entry, "POST", "/v1/completions", Some(completion)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let answer: Value = serde_json::from_str(&response.body).unwrap();
    let logprobs = &answer["choices"][0]["logprobs"];
    let tokens: Vec<&str> =
        logprobs["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), answer["choices"][0]["text"].as_str().unwrap(), "{answer}");
    let offsets: Vec<u64> =
        logprobs["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    let mut expected = 0;
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(*offset, expected);
        expected += token.chars().count() as u64;
    }
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), tokens.len());
    for top in logprobs["top_logprobs"].as_array().unwrap() {
        assert_eq!(top.as_object().unwrap().len(), 2, "{top}");
    }

    // logit_bias: -100 bans the greedy answer's first token, +100 forces another.
    let tokenizer = smollm2_tokenizer();
    let first = &entries[0]["token"];
    let first_id =
        tokenizer.token_to_id(&first.as_str().unwrap().replace(' ', "Ġ")).expect("the first token's id");
    let forced_id = tokenizer.token_to_id("Ġpurple").expect("a token for ' purple'");
    for (bias, expect_first) in
        [(json!({first_id.to_string(): -100}), None), (json!({forced_id.to_string(): 100}), Some(" purple"))]
    {
        let mut body = chat(false);
        body["logit_bias"] = bias;
        let answer: Value =
            serde_json::from_str(&call(&entry, "POST", "/v1/chat/completions", Some(body)).await.body)
                .unwrap();
        let token = &answer["choices"][0]["logprobs"]["content"][0]["token"];
        match expect_first {
            None => assert_ne!(token, first, "{answer}"),
            Some(forced) => assert_eq!(token, forced, "{answer}"),
        }
    }

    // n: greedy choices, each from a copy of one prompt pass, are the single greedy answer.
    let mut greedy = chat(false);
    greedy["n"] = json!(3);
    let answer: Value =
        serde_json::from_str(&call(&entry, "POST", "/v1/chat/completions", Some(greedy)).await.body).unwrap();
    let choices = answer["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{answer}");
    for (index, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], index);
        assert_eq!(choice["message"]["content"].as_str(), Some(text), "{answer}");
    }
    let single: u64 = entries.len() as u64;
    assert_eq!(answer["usage"]["completion_tokens"].as_u64(), Some(3 * single), "{answer}");
    // Sampled and streamed: every choice finishes once, the usage counts them all, [DONE] once.
    let mut sampled = chat(true);
    sampled["n"] = json!(3);
    sampled["temperature"] = json!(1.0);
    sampled["seed"] = json!(5);
    sampled["stream_options"] = json!({"include_usage": true});
    let response = call(&entry, "POST", "/v1/chat/completions", Some(sampled)).await;
    let mut finished = [0; 3];
    let mut tokens = [0u64; 3];
    let mut usage = Value::Null;
    let data: Vec<&str> = response.body.lines().filter_map(|line| line.strip_prefix("data: ")).collect();
    assert_eq!(data.iter().filter(|line| **line == "[DONE]").count(), 1, "{}", response.body);
    for line in data.iter().filter(|line| **line != "[DONE]") {
        let chunk: Value = serde_json::from_str(line).unwrap();
        if chunk["choices"].as_array().unwrap().is_empty() {
            usage = chunk["usage"].clone();
            continue;
        }
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        tokens[index] += choice["logprobs"]["content"].as_array().map_or(0, |entries| entries.len() as u64);
        if !choice["finish_reason"].is_null() {
            finished[index] += 1;
        }
    }
    assert_eq!(finished, [1, 1, 1], "{}", response.body);
    assert_eq!(usage["completion_tokens"].as_u64(), Some(tokens.iter().sum()), "{}", response.body);

    for (body, path, param) in [
        (json!({"messages": [{"role": "user", "content": "hi"}], "n": 9}), "/v1/chat/completions", "n"),
        (json!({"prompt": "hi", "n": 0}), "/v1/completions", "n"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}),
            "/v1/chat/completions",
            "logit_bias",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}),
            "/v1/chat/completions",
            "logit_bias",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"4000000": 1}}),
            "/v1/chat/completions",
            "logit_bias",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            "/v1/chat/completions",
            "top_logprobs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
            "/v1/chat/completions",
            "top_logprobs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}),
            "/v1/chat/completions",
            "logprobs",
        ),
        (json!({"prompt": "hi", "logprobs": 6}), "/v1/completions", "logprobs"),
    ] {
        let mut body = body;
        body["model"] = json!("smollm2");
        let response = call(&entry, "POST", path, Some(body)).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{}", response.body);
        let error: Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }

    entry.shutdown();
    host.shutdown();
    entry.join().await.unwrap();
    host.join().await.unwrap();
}
