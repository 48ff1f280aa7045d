use super::*;

fn tool(name: &str) -> Tool {
    Tool { name: name.into(), description: format!("{name}s."), parameters: r#"{"type": "object"}"#.into() }
}

#[test]
fn the_format_is_read_from_the_template() {
    let qwen = "{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> <tool_call>{% endif %}";
    assert_eq!(ToolFormat::of_template(Some(qwen)), ToolFormat::Hermes);
    let mistral = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
    assert_eq!(ToolFormat::of_template(Some(mistral)), ToolFormat::Mistral);
    let llama = "{% if tools is not none %}{{ '<|start_header_id|>ipython' }}{% endif %}";
    assert_eq!(ToolFormat::of_template(Some(llama)), ToolFormat::Llama3);
    // A template that never renders tools, or none at all, is generic.
    assert_eq!(ToolFormat::of_template(Some("<tool_call> {{ messages }}")), ToolFormat::Generic);
    assert_eq!(ToolFormat::of_template(None), ToolFormat::Generic);
}

#[test]
fn a_generic_conversation_describes_the_tools_and_writes_calls_as_json() {
    let tools = ToolParams { tools: vec![tool("add")], ..ToolParams::default() };
    let mut assistant = ChatMessage::text("assistant", "");
    assistant.tool_calls =
        vec![ToolCall { id: "call_1".into(), name: "add".into(), arguments: r#"{"a": 1}"#.into() }];
    let result = |id: &str, content: &str| ChatMessage {
        tool_call_id: Some(id.into()),
        ..ChatMessage::text("tool", content)
    };
    let messages = vec![
        ChatMessage::text("system", "Be brief."),
        ChatMessage::text("user", "1 + 1?"),
        assistant,
        result("call_1", "2"),
        result("call_2", "3"),
    ];
    let generic = generic_messages(&messages, &tools);
    assert_eq!(generic.len(), 4, "{generic:#?}");
    assert!(generic[0].content.starts_with("Be brief.\n\nYou can call these tools:"));
    assert!(generic[0].content.contains("\"name\": \"add\""));
    assert_eq!(generic[2].content, r#"{"tool_calls": [{"name": "add", "arguments": {"a": 1}}]}"#);
    assert_eq!(generic[3].role, "user", "tool results are one user turn");
    assert_eq!(generic[3].content.lines().count(), 2);
    // Without tools (or with `none`), nothing is described, but past calls still render.
    let none = ToolParams { choice: ToolChoice::None, ..tools };
    let generic = generic_messages(&messages, &none);
    assert_eq!(generic[0].content, "Be brief.");
}

#[test]
fn tool_params_are_checked() {
    let param_of = |params: ToolParams| params.validate().expect_err("refused").param;
    let two = ToolParams { tools: vec![tool("a"), tool("a")], ..ToolParams::default() };
    assert_eq!(param_of(two), "tools[1].function.name");
    let bad_schema =
        ToolParams { tools: vec![Tool { parameters: "[]".into(), ..tool("a") }], ..ToolParams::default() };
    assert_eq!(param_of(bad_schema), "tools[0].function.parameters");
    let unnamed =
        ToolParams { tools: vec![tool("a")], choice: ToolChoice::Function("b".into()), parallel: true };
    assert_eq!(param_of(unnamed), "tool_choice");
    let many = ToolParams {
        tools: (0..=MAX_TOOLS).map(|i| tool(&format!("f{i}"))).collect(),
        ..ToolParams::default()
    };
    assert_eq!(param_of(many), "tools");
}

#[test]
fn native_formats_refuse_a_response_format_beside_tools() {
    let tools = ToolParams { tools: vec![tool("a")], ..ToolParams::default() };
    let error = grammar_plan(&tools, &ResponseFormat::JsonObject, ToolFormat::Hermes).expect_err("refused");
    assert_eq!(error.param, "response_format");
    assert!(matches!(
        grammar_plan(&tools, &ResponseFormat::JsonObject, ToolFormat::Generic),
        Ok(GrammarPlan::Now(_))
    ));
}
