//! The grammar machinery on a small byte-level vocabulary (`small_vocabulary.rs`): every byte, a
//! few merges, an end-of-sequence token.

use super::small_vocabulary::tokenizer;
use super::*;

fn compiler() -> (GrammarCompiler, Arc<Tokenizer>, u32) {
    let (tokenizer, eos) = tokenizer();
    (GrammarCompiler::new(tokenizer.clone(), &[eos]).expect("a compiler"), tokenizer, eos)
}

fn allowed(constraint: &mut TokenConstraint, size: usize) -> Vec<u32> {
    let mut logits = vec![0.0; size];
    let allowed = constraint.allowed_tokens().expect("a mask");
    constraint.mask(&allowed, &mut logits);
    (0..size as u32).filter(|&token| logits[token as usize].is_finite()).collect()
}

/// Feed `text` one byte token at a time.
fn feed(constraint: &mut TokenConstraint, text: &str) {
    for byte in text.bytes() {
        constraint.accept(byte as u32).unwrap_or_else(|error| panic!("{text:?} at {byte:?}: {error}"));
    }
}

/// The constraint of a response format, `None` for plain text.
fn compile(
    compiler: &GrammarCompiler,
    format: &ResponseFormat,
) -> Result<Option<TokenConstraint>, EngineError> {
    let grammar = format.grammar().map_err(InvalidParam::naming_the_field)?;
    grammar.map(|grammar| compiler.compile_grammar(grammar, SCHEMA_PARAM)).transpose()
}

fn schema(json: Value) -> ResponseFormat {
    ResponseFormat::JsonSchema { schema: json.to_string() }
}

#[test]
fn a_json_object_starts_with_a_brace_and_ends_at_its_close() {
    let (compiler, tokenizer, eos) = compiler();
    let size = tokenizer.get_vocab_size(true) + 3; // and a model's padding rows
    let mut constraint = compile(&compiler, &ResponseFormat::JsonObject).unwrap().expect("a constraint");
    assert_eq!(allowed(&mut constraint, size), vec![b'{' as u32, 256], "'{{' or '{{\"' first");
    feed(&mut constraint, "{\"a\": [1, true]");
    assert!(!constraint.is_finished());
    let next = allowed(&mut constraint, size);
    assert!(next.contains(&(b'}' as u32)) && next.contains(&260) && !next.contains(&eos), "{next:?}");
    feed(&mut constraint, "}");
    assert!(constraint.is_finished());
}

#[test]
fn a_schema_holds_keys_types_and_enums() {
    let (compiler, tokenizer, _) = compiler();
    let size = tokenizer.get_vocab_size(true);
    let format = schema(serde_json::json!({
        "type": "object",
        "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer"}},
        "required": ["color", "n"],
        "additionalProperties": false,
    }));
    let mut constraint = compile(&compiler, &format).unwrap().expect("a constraint");
    feed(&mut constraint, "{\"color\": \"");
    assert_eq!(allowed(&mut constraint, size), vec![b'b' as u32, b'r' as u32]);
    feed(&mut constraint, "red\", \"n\": ");
    let digits = allowed(&mut constraint, size);
    assert!(digits.contains(&(b'7' as u32)) && !digits.contains(&(b'"' as u32)), "{digits:?}");
    assert!(constraint.accept(b'x' as u32).is_err(), "a token outside the mask is refused");
}

#[test]
fn special_tokens_are_never_text_and_eos_only_ends() {
    let (compiler, tokenizer, eos) = compiler();
    let size = tokenizer.get_vocab_size(true);
    // Any string: the end token's text is not a way to write "<|end|>".
    let format = schema(serde_json::json!({"type": "string"}));
    let mut constraint = compile(&compiler, &format).unwrap().expect("a constraint");
    feed(&mut constraint, "\"a");
    assert!(!allowed(&mut constraint, size).contains(&eos));
    feed(&mut constraint, "\"");
    assert_eq!(allowed(&mut constraint, size), vec![eos], "only the end once the string closed");
}

#[test]
fn a_continuation_resumes_where_the_text_stopped() {
    let (compiler, tokenizer, _) = compiler();
    let mut constraint = compile(&compiler, &ResponseFormat::JsonObject).unwrap().expect("a constraint");
    constraint.accept_text("{\"key\": ").unwrap();
    let next = allowed(&mut constraint, tokenizer.get_vocab_size(true));
    assert!(next.contains(&(b'"' as u32)) && !next.contains(&(b'}' as u32)), "{next:?}");
    let mut other = compile(&compiler, &ResponseFormat::JsonObject).unwrap().expect("a constraint");
    assert!(other.accept_text("not json").is_err());
}

#[test]
fn schemas_that_cannot_be_compiled_name_the_schema_and_the_feature() {
    let (compiler, _, _) = compiler();
    let refused = |json: Value| match compile(&compiler, &schema(json)) {
        Err(EngineError::InvalidParam { param, message }) => (param, message),
        Err(other) => panic!("not an invalid param: {other:?}"),
        Ok(_) => panic!("compiled"),
    };
    let overlapping = [
        serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        serde_json::json!({"type": "object", "properties": {"b": {"type": "integer"}}}),
    ];
    let (param, message) = refused(serde_json::json!({"oneOf": overlapping}));
    assert_eq!(param, SCHEMA_PARAM);
    assert!(message.contains("oneOf"), "{message}");
    let (_, message) = refused(serde_json::json!({"type": "object", "if": {"required": ["a"]}}));
    assert!(message.contains("if"), "{message}");
    let (_, message) = refused(serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1}));
    assert!(!message.is_empty());
}

#[test]
fn a_schema_must_be_a_json_object_of_bounded_size() {
    let invalid = |schema: &str| ResponseFormat::JsonSchema { schema: schema.into() }.validate().unwrap_err();
    assert_eq!(invalid("[1]").param, SCHEMA_PARAM);
    assert_eq!(invalid("{").param, SCHEMA_PARAM);
    let huge = format!("{{\"description\": \"{}\"}}", "x".repeat(MAX_SCHEMA_BYTES));
    assert_eq!(invalid(&huge).param, SCHEMA_PARAM);
    assert_eq!(schema(serde_json::json!({"type": "object"})).validate(), Ok(()));
    assert_eq!(ResponseFormat::Text.validate(), Ok(()));
}

#[test]
fn plain_text_needs_no_constraint() {
    let (compiler, _, _) = compiler();
    assert!(compile(&compiler, &ResponseFormat::Text).unwrap().is_none());
}

#[test]
fn the_deepest_schema_json_can_carry_compiles_on_a_small_stack() {
    // serde_json refuses JSON nested deeper than 128, so this is as deep as a schema gets; a
    // blocking thread of tokio's has 2 MiB of stack, and overflowing it would abort the node.
    let (compiler, tokenizer, _) = compiler();
    let mut schema = serde_json::json!({"type": "integer"});
    for _ in 0..62 {
        schema = serde_json::json!({"type": "object", "properties": {"a": schema}, "required": ["a"]});
    }
    let format = ResponseFormat::JsonSchema { schema: schema.to_string() };
    assert_eq!(format.validate(), Ok(()), "within serde_json's depth");
    let size = tokenizer.get_vocab_size(true);
    let compiled = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let mut constraint = compile(&compiler, &format).unwrap().expect("a constraint");
            feed(&mut constraint, &"{\"a\": ".repeat(62));
            allowed(&mut constraint, size)
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert!(compiled.contains(&(b'7' as u32)));
}

mod tool_calls {
    use super::*;
    use crate::engine::tools::{GrammarPlan, ToolFormat, grammar_plan};
    use crate::engine::{Tool, ToolChoice, ToolParams};

    fn tools(choice: ToolChoice, parallel: bool) -> ToolParams {
        let add = Tool {
            name: "add".into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}},
                "required": ["a"], "additionalProperties": false})
            .to_string(),
        };
        let ping = Tool { name: "ping".into(), description: String::new(), parameters: "{}".into() };
        ToolParams { tools: vec![add, ping], choice, parallel }
    }

    /// The plan's constraint and whether it waits for a marker.
    fn plan(tools: &ToolParams, format: ToolFormat) -> (GenerationGrammar, bool) {
        let (compiler, _, _) = compiler();
        let compile = |grammar| compiler.compile_grammar(grammar, "tools").expect("compiles");
        match grammar_plan(tools, &ResponseFormat::Text, format).expect("a plan") {
            GrammarPlan::Free => panic!("no grammar"),
            GrammarPlan::Now(grammar) => (GenerationGrammar::now(compile(grammar)), false),
            GrammarPlan::AfterMarker { marker, at_start, grammar } => {
                (GenerationGrammar::after_marker(compile(grammar), marker, at_start), true)
            }
        }
    }

    fn accepts(grammar: &mut GenerationGrammar, text: &str) -> bool {
        let constraint = grammar.active().expect("active");
        text.bytes().all(|byte| constraint.accept(byte as u32).is_ok())
    }

    #[test]
    fn generic_calls_hold_to_the_tools_schemas() {
        let (mut required, waits) = plan(&tools(ToolChoice::Required, true), ToolFormat::Generic);
        assert!(!waits);
        let two =
            r#"{"tool_calls": [{"name": "add", "arguments": {"a": 1}}, {"name": "ping", "arguments": {}}]}"#;
        assert!(accepts(&mut required, two));
        assert!(required.active().unwrap().is_finished());
        let (mut required, _) = plan(&tools(ToolChoice::Required, true), ToolFormat::Generic);
        assert!(!accepts(&mut required, r#"{"response": "#), "required means a call");
        let (mut wrong, _) = plan(&tools(ToolChoice::Required, true), ToolFormat::Generic);
        assert!(!accepts(&mut wrong, r#"{"tool_calls": [{"name": "add", "arguments": {"a": "x"#));
        let (mut one, _) = plan(&tools(ToolChoice::Required, false), ToolFormat::Generic);
        assert!(!accepts(&mut one, r#"{"tool_calls": [{"name": "add", "arguments": {"a": 1}}, "#));
        let (mut named, _) = plan(&tools(ToolChoice::Function("ping".into()), true), ToolFormat::Generic);
        assert!(!accepts(&mut named, r#"{"tool_calls": [{"name": "a"#), "only the named function");
        let (mut auto, _) = plan(&tools(ToolChoice::Auto, true), ToolFormat::Generic);
        assert!(accepts(&mut auto, r#"{"response": "Hi"}"#));
    }

    #[test]
    fn hermes_calls_under_auto_are_constrained_from_their_marker() {
        let (mut auto, waits) = plan(&tools(ToolChoice::Auto, true), ToolFormat::Hermes);
        assert!(waits && !auto.is_active());
        auto.observe_text("Let me add that. <tool").unwrap();
        assert!(!auto.is_active());
        auto.observe_text("_call>\n{\"na").unwrap();
        assert!(auto.is_active(), "the marker switched the grammar on");
        assert!(accepts(&mut auto, "me\": \"add\", \"arguments\": {\"a\": 2}}\n</tool_call>"));
        // A second call may follow; the grammar is complete after either.
        let (mut auto, _) = plan(&tools(ToolChoice::Auto, true), ToolFormat::Hermes);
        assert!(auto.observe_text("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": \"no").is_err());
        let (mut required, waits) = plan(&tools(ToolChoice::Required, false), ToolFormat::Hermes);
        assert!(!waits);
        assert!(!accepts(&mut required, "Sure"), "required starts with the marker");
    }

    #[test]
    fn llama3_calls_count_only_at_the_start() {
        let (mut late, _) = plan(&tools(ToolChoice::Auto, true), ToolFormat::Llama3);
        late.observe_text("Use {\"name\": \"add\"}").unwrap();
        assert!(!late.is_active(), "a brace later in the text is not a call");
        let (mut call, _) = plan(&tools(ToolChoice::Auto, true), ToolFormat::Llama3);
        call.observe_text("{").unwrap();
        call.observe_text("\"name\": \"ping\", ").unwrap();
        assert!(call.is_active());
        assert!(accepts(&mut call, "\"parameters\": {}}"));
        assert!(call.active().unwrap().is_finished());
    }
}

#[test]
fn after_a_token_that_stops_short_of_forced_bytes_the_mask_holds_what_the_grammar_takes() {
    // `"` and `:` sampled as two tokens where `": ` is forced: only the space may follow, and
    // every token the mask allows is taken.
    let (compiler, tokenizer, _) = compiler();
    let size = tokenizer.get_vocab_size(true);
    let mut constraint = compile(&compiler, &ResponseFormat::JsonObject).unwrap().expect("a constraint");
    feed(&mut constraint, "{\"a\":");
    assert_eq!(allowed(&mut constraint, size), vec![b' ' as u32]);
    constraint.accept(b' ' as u32).expect("the space the mask allowed");
}

#[test]
fn the_factory_is_built_by_the_first_grammar_and_spells_tokens_as_before() {
    let (compiler, _, eos) = compiler();
    assert!(compiler.factory.get().is_none(), "nothing is built before a grammar needs it");
    // Log-probabilities' bytes come without building anything.
    assert_eq!(compiler.token_bytes(u32::from(b'{')), b"{");
    assert!(compiler.factory.get().is_none());
    compile(&compiler, &ResponseFormat::JsonObject).unwrap();
    let trie = compiler.factory.get().unwrap().as_ref().unwrap().tok_env().tok_trie();
    // Every token's bytes as the trie holds them (special tokens without their marker).
    for token in 0..trie.vocab_size() as u32 {
        let held = trie.token(token);
        let held = held.strip_prefix(&[toktrie::TokTrie::SPECIAL_TOKEN_MARKER]).unwrap_or(held);
        assert_eq!(compiler.token_bytes(token), held, "token {token}");
    }
    assert!(!compiler.token_bytes(eos).is_empty());
    assert!(compiler.token_bytes(trie.vocab_size() as u32).is_empty());
}

#[test]
fn closing_objects_reaches_every_subschema_and_only_schemas() {
    let mut schema = serde_json::json!({
        "type": "object",
        "properties": {
            "address": {"$ref": "#/$defs/Address"},
            "properties": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {}}}},
            "either": {"anyOf": [{"properties": {"a": {}}}, {"type": "null"}]},
            "extra": {"type": "object", "properties": {"x": {}}, "additionalProperties": true},
            "map": {"type": "object"}
        },
        "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}}}
    });
    close_objects(&mut schema);
    let closed =
        |pointer: &str| schema.pointer(pointer).and_then(|object| object.get("additionalProperties"));
    assert_eq!(closed(""), Some(&Value::Bool(false)));
    assert_eq!(closed("/$defs/Address"), Some(&Value::Bool(false)));
    assert_eq!(closed("/properties/tags/items"), Some(&Value::Bool(false)));
    assert_eq!(closed("/properties/either/anyOf/0"), Some(&Value::Bool(false)));
    // What the schema says is kept; a free-form map stays open; a property's name is no keyword.
    assert_eq!(closed("/properties/extra"), Some(&Value::Bool(true)));
    assert_eq!(closed("/properties/map"), None);
    assert_eq!(closed("/properties/properties"), None);
    assert_eq!(closed("/properties/either/anyOf/1"), None);
}

/// Under a closed schema, once every named key is written the object can only end.
#[test]
fn a_closed_object_ends_after_its_keys() {
    let (compiler, tokenizer, _) = compiler();
    let size = tokenizer.get_vocab_size(true);
    let mut open =
        serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let after_the_key = |json: &Value| {
        let mut constraint = compile(&compiler, &schema(json.clone())).unwrap().expect("a constraint");
        feed(&mut constraint, "{\"a\": 1");
        allowed(&mut constraint, size)
    };
    assert!(after_the_key(&open).contains(&(b',' as u32)), "open: other keys may follow");
    close_objects(&mut open);
    let next = after_the_key(&open);
    assert!(!next.contains(&(b',' as u32)) && next.contains(&(b'}' as u32)), "closed: {next:?}");
}
