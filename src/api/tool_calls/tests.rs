use serde_json::json;

use super::*;

fn object(value: Value) -> JsonObject {
    let Value::Object(fields) = value else { panic!("not an object") };
    JsonObject(fields)
}

fn tools(names: &[&str]) -> ToolParams {
    let tools = names
        .iter()
        .map(|name| Tool { name: name.to_string(), description: String::new(), parameters: "{}".into() })
        .collect();
    ToolParams { tools, ..ToolParams::default() }
}

/// Feed `text` in pieces of `size` bytes (on character boundaries), then finish.
fn parse_in_pieces(text: &str, size: usize) -> Vec<Parsed> {
    let mut parser = ToolCallParser::new(&tools(&["get_weather", "add"]));
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (piece, tail) = rest.split_at(cut);
        out.extend(parser.push(piece));
        rest = tail;
    }
    out.extend(parser.finish());
    merged(out)
}

/// Adjacent content pieces joined, call ids blanked.
fn merged(parsed: Vec<Parsed>) -> Vec<Parsed> {
    let mut out: Vec<Parsed> = Vec::new();
    for item in parsed {
        match (out.last_mut(), item) {
            (Some(Parsed::Content(previous)), Parsed::Content(text)) => previous.push_str(&text),
            (_, Parsed::Call(call)) => {
                assert!(call.id.starts_with("call_") && call.id.len() == 29, "{}", call.id);
                out.push(Parsed::Call(ToolCall { id: String::new(), ..call }));
            }
            (_, item) => out.push(item),
        }
    }
    out
}

fn call(name: &str, arguments: &str) -> Parsed {
    Parsed::Call(ToolCall { id: String::new(), name: name.into(), arguments: arguments.into() })
}

fn content(text: &str) -> Parsed {
    Parsed::Content(text.into())
}

/// Every format, read whole and one byte at a time, gives the same.
fn check(text: &str, expected: &[Parsed]) {
    for size in [1, 3, text.len().max(1)] {
        assert_eq!(parse_in_pieces(text, size), expected, "{text:?} in pieces of {size}");
    }
}

#[test]
fn hermes_calls_between_text() {
    check(
        "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>",
        &[content("Let me look.\n"), call("get_weather", r#"{"city":"Paris"}"#), call("add", r#"{"a":1}"#)],
    );
}

#[test]
fn generic_calls_and_generic_answers() {
    check(
        r#"{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}"#,
        &[call("add", r#"{"a":1,"b":2}"#)],
    );
    check(r#"{"response": "Hello \"you\"\n\u00e9\ud83d\ude00 done"}"#, &[content("Hello \"you\"\né😀 done")]);
}

#[test]
fn mistral_and_llama3_calls() {
    check(
        r#"[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]"#,
        &[call("add", r#"{"a":1}"#), call("get_weather", "{}")],
    );
    check(r#"{"name": "add", "parameters": {"a": 1}}"#, &[call("add", r#"{"a":1}"#)]);
    check(r#"<|python_tag|>{"name": "add", "parameters": "{\"a\": 2}"}"#, &[call("add", r#"{"a": 2}"#)]);
}

#[test]
fn unknown_functions_and_broken_json_stay_text() {
    let unknown = r#"<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>"#;
    check(unknown, &[content(unknown)]);
    check("{\"name\": \"add\", \"arguments\": {", &[content("{\"name\": \"add\", \"arguments\": {")]);
    check("{ not json at all }", &[content("{ not json at all }")]);
}

#[test]
fn text_is_held_back_only_while_it_may_begin_a_marker() {
    let mut parser = ToolCallParser::new(&tools(&["add"]));
    assert_eq!(parser.push("Sum: 1 <"), vec![content("Sum: 1 ")]);
    assert_eq!(parser.push("tool"), vec![]);
    assert_eq!(parser.push(" box"), vec![content("<tool box")]);
    assert_eq!(parser.finish(), vec![]);
    assert!(!parser.made_calls());
    // The generic answer streams as it comes.
    let mut parser = ToolCallParser::new(&tools(&["add"]));
    assert_eq!(parser.push("{\"resp"), vec![]);
    assert_eq!(parser.push("onse\": \"Hi"), vec![content("Hi")]);
    assert_eq!(parser.push(" there\\"), vec![content(" there")]);
    assert_eq!(parser.push("n\"}"), vec![content("\n")]);
    assert_eq!(parser.finish(), vec![]);
}

#[test]
fn tools_and_choices_are_read_and_checked() {
    let mut fields = object(json!({
        "tools": [{"type": "function", "function": {"name": "add", "description": "Adds.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "parallel_tool_calls": false,
    }));
    let params = parse_tool_params(&mut fields).expect("valid");
    assert_eq!(params.choice, ToolChoice::Function("add".into()));
    assert!(!params.parallel);
    assert_eq!(params.tools[0].description, "Adds.");
    let mut none = object(json!({}));
    assert_eq!(parse_tool_params(&mut none).expect("valid").choice, ToolChoice::None);

    let param_of = |value: Value| {
        let mut fields = object(value);
        let error = parse_tool_params(&mut fields).expect_err("refused");
        error.body().error.param.expect("a param")
    };
    let add = json!({"type": "function", "function": {"name": "add"}});
    assert_eq!(param_of(json!({"tools": {}})), "tools");
    assert_eq!(param_of(json!({"tools": [{"type": "retrieval"}]})), "tools[0].type");
    assert_eq!(param_of(json!({"tools": [{"type": "function"}]})), "tools[0].function");
    assert_eq!(
        param_of(json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
        "tools[0].function.name"
    );
    assert_eq!(
        param_of(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]})),
        "tools[0].function.parameters"
    );
    assert_eq!(param_of(json!({"tools": [add, add]})), "tools[1].function.name");
    assert_eq!(param_of(json!({"tools": [add], "tool_choice": "always"})), "tool_choice");
    assert_eq!(
        param_of(json!({"tools": [add], "tool_choice": {"type": "function", "function": {"name": "sub"}}})),
        "tool_choice"
    );
    assert_eq!(param_of(json!({"tool_choice": "required"})), "tool_choice");
    assert_eq!(param_of(json!({"tools": [add], "parallel_tool_calls": "yes"})), "parallel_tool_calls");
}

#[test]
fn assistant_tool_calls_are_read_from_messages() {
    let calls =
        json!([{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]);
    let parsed = parse_message_tool_calls(2, Some(calls)).expect("valid");
    assert_eq!(
        parsed,
        vec![ToolCall { id: "call_1".into(), name: "add".into(), arguments: "{\"a\": 1}".into() }]
    );
    let error = parse_message_tool_calls(2, Some(json!([{"function": {"name": "add"}}]))).expect_err("no id");
    assert_eq!(error.body().error.param.as_deref(), Some("messages[2].tool_calls[0].id"));
}
