//! Chat templates rendered as transformers' `apply_chat_template` renders them (golden texts from
//! tests/golden/make_golden.py), Jinja details, and assistant-only loss masks on the real SmolLM2
//! tokenizer (fetched by `apprentice model fetch smollm2-135m`; these tests fail without it).

use std::sync::OnceLock;

use apprentice_model::cache::resolve_model;
use apprentice_model::chat_template::{ChatTemplate, ChatTemplateError, LossMaskedExample, SpecialTokens};
use apprentice_model::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = resolve_model("smollm2-135m")
            .unwrap_or_else(|e| panic!("the SmolLM2 model is required by these tests: {e}"));
        Tokenizer::from_gguf(&path).unwrap()
    })
}

fn smollm2_template() -> ChatTemplate {
    ChatTemplate::from_tokenizer(smollm2()).unwrap()
}

fn tools_template() -> ChatTemplate {
    ChatTemplate::new(include_str!("golden/templates/tools.jinja"), SpecialTokens::of(smollm2())).unwrap()
}

/// A template with no special tokens, for Jinja-only checks.
fn bare(source: &str) -> ChatTemplate {
    ChatTemplate::new(source, SpecialTokens::default()).unwrap()
}

fn render_vars(source: &str, vars: Value) -> String {
    // The template reads its variables from the first message's content.
    let wrapped = format!("{{% set v = messages[0].content %}}{source}");
    bare(&wrapped).render(&[json!({"role": "user", "content": vars})], None, false).unwrap()
}

#[test]
fn golden_texts_equal_transformers_apply_chat_template() {
    let golden: Value = serde_json::from_str(include_str!("golden/chat_templates.json")).unwrap();
    let special = &golden["special_tokens"];
    let ours = SpecialTokens::of(smollm2());
    assert_eq!(ours.bos_token.as_deref(), special["bos_token"].as_str());
    assert_eq!(ours.eos_token.as_deref(), special["eos_token"].as_str());
    assert_eq!(ours.unk_token.as_deref(), special["unk_token"].as_str());
    assert_eq!(ours.pad_token.as_deref(), special["pad_token"].as_str());
    let smollm2 = smollm2_template();
    let tools = tools_template();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let template = match case["template"].as_str().unwrap() {
            "smollm2" => &smollm2,
            "tools" => &tools,
            other => panic!("unknown template {other}"),
        };
        let messages = case["messages"].as_array().unwrap();
        let tool_list = case["tools"].as_array().map(Vec::as_slice);
        let text = template.render(messages, tool_list, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{} / {}", case["template"], case["name"]);
    }
}

#[test]
fn smollm2_inserts_its_default_system_prompt() {
    let text = smollm2_template().render(&[json!({"role": "user", "content": "hi"})], None, true).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{text}");
    assert!(text.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), "{text}");
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    // Expected texts from transformers' jinja environment (see make_golden.py's notes).
    assert_eq!(
        render_vars("{{ v | tojson(indent=2, sort_keys=true) }}", json!({"b": [1, 2.0, {}], "a": {"z": null, "y": []}, "é": "ü\n\"<>&'"})),
        "{\n  \"a\": {\n    \"y\": [],\n    \"z\": null\n  },\n  \"b\": [\n    1,\n    2.0,\n    {}\n  ],\n  \"é\": \"ü\\n\\\"<>&'\"\n}"
    );
    assert_eq!(
        render_vars("{{ v | tojson(separators=(',', ':')) }}", json!({"b": 1, "a": [true, false, null, 0.1]})),
        "{\"b\":1,\"a\":[true,false,null,0.1]}"
    );
    assert_eq!(
        render_vars("{{ v | tojson(ensure_ascii=true) }}", json!(["é", "🤖", "\u{1}\u{7f}"])),
        "[\"\\u00e9\", \"\\ud83e\\udd16\", \"\\u0001\\u007f\"]"
    );
    // Keys keep their order, in iteration and in tojson.
    assert_eq!(
        render_vars(
            "{% for k, x in v.items() %}{{ k }}={{ x }};{% endfor %}{{ v | tojson }}",
            json!({"zeta": 1, "alpha": 2, "mid": 3})
        ),
        "zeta=1;alpha=2;mid=3;{\"zeta\": 1, \"alpha\": 2, \"mid\": 3}"
    );
}

#[test]
fn jinja_behaves_as_python_jinja2() {
    assert_eq!(
        render_vars("{{ v.strip() }}|{{ v.split(',') | length }}|{{ v.startswith('  a') }}|{{ v.upper() }}|{{ v.replace('a', 'o') }}", json!("  a,b,c  ")),
        "a,b,c|3|True|  A,B,C  |  o,b,c  "
    );
    assert_eq!(
        render_vars("{% for i in v %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 3 %}{% break %}{% endif %}{{ i }}{% endfor %}", json!([1, 2, 3, 4, 5])),
        "13"
    );
    assert_eq!(
        render_vars("{% set ns = namespace(n=0) %}{% for m in v[::-1] %}{% set ns.n = ns.n + m %}{% endfor %}{{ ns.n }} {{ v[1:] }} {{ v[-1] }}", json!([1, 2, 3])),
        "6 [2, 3] 3"
    );
    assert_eq!(
        render_vars(
            "{{ v.t }} {{ v.f }} {{ v.n }} {{ v.xs }} {{ v.d }} {{ v.fl }} {{ v.big }} {{ v.u }}|{{ v.s }}",
            json!({"t": true, "f": false, "n": null, "xs": ["a", "it's", 1, 2.5, null, true], "d": {"k": "v", "n": [1, {"x": false}]}, "fl": 1.0, "big": 1e16, "s": "q\"'\n"})
        ),
        "True False None ['a', \"it's\", 1, 2.5, None, True] {'k': 'v', 'n': [1, {'x': False}]} 1.0 1e+16 |q\"'\n"
    );
    // trim_blocks and lstrip_blocks, and the trailing newline dropped, as transformers sets them.
    assert_eq!(bare("  {% if true %}\n  x\n  {% endif %}\ny\n").render(&[], None, false).unwrap(), "  x\ny");
}

#[test]
fn raise_exception_is_an_error_with_its_message() {
    let err = tools_template().render(&[json!({"role": "bogus", "content": "x"})], None, false).unwrap_err();
    match err {
        ChatTemplateError::Raised(message) => assert_eq!(message, "unknown role: bogus"),
        other => panic!("expected Raised, got {other}"),
    }
    let err = ChatTemplate::new("{% if %}", SpecialTokens::default()).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err}");
}

#[test]
fn generation_tags_render_their_body() {
    let source = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}";
    let text = bare(source)
        .render(&[json!({"role": "user", "content": "a"}), json!({"role": "assistant", "content": "b"})], None, false)
        .unwrap();
    assert_eq!(text, "[a]b");
}

fn conversation() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "You play BabyAI."}),
        json!({"role": "user", "content": "You see a wall 2 steps ahead. Go to the red ball."}),
        json!({"role": "assistant", "content": "turn left"}),
        json!({"role": "user", "content": "A red ball 🤖 is 3 steps forward.\n\nWhat next?"}),
        json!({"role": "assistant", "content": "go forward\n  then 12 more "}),
        json!({"role": "user", "content": "done?"}),
        json!({"role": "assistant", "content": ""}),
    ]
}

/// Checks the invariants of a loss-masked example whose assistant contents do not start with
/// whitespace (so the turn boundaries fall between tokens of the whole text).
fn check_example(tokenizer: &Tokenizer, example: &LossMaskedExample, messages: &[Value]) {
    assert_eq!(example.input_ids, tokenizer.encode(&example.text, false).unwrap(), "ids are the full text's ids");
    assert_eq!(example.weights.len(), example.input_ids.len());
    let assistants: Vec<usize> =
        messages.iter().enumerate().filter(|(_, m)| m["role"] == "assistant").map(|(i, _)| i).collect();
    assert_eq!(example.turns.iter().map(|t| t.message_index).collect::<Vec<_>>(), assistants);
    // The ids are the text's pieces (outside / inside each turn) tokenized one after the other.
    let mut pieces = Vec::new();
    let mut at = 0;
    for turn in &example.turns {
        pieces.push(at..turn.text_range.start);
        pieces.push(turn.text_range.clone());
        at = turn.text_range.end;
    }
    pieces.push(at..example.text.len());
    let mut concatenated = Vec::new();
    for piece in pieces {
        concatenated.extend(tokenizer.encode(&example.text[piece], false).unwrap());
    }
    assert_eq!(concatenated, example.input_ids, "ids are the pieces' ids concatenated");
    // Only turn tokens carry weight, and every turn token carries its turn's weight.
    let mut expected = vec![0.0f32; example.input_ids.len()];
    for turn in &example.turns {
        for w in &mut expected[turn.token_range.clone()] {
            *w = turn.weight;
        }
    }
    assert_eq!(example.weights, expected);
}

#[test]
fn loss_mask_covers_exactly_each_assistant_content_and_end_of_turn() {
    let tokenizer = smollm2();
    let messages = conversation();
    let example = smollm2_template().render_with_loss_mask(tokenizer, &messages, None, 1.0).unwrap();
    check_example(tokenizer, &example, &messages);
    assert_eq!(example.text, smollm2_template().render(&messages, None, false).unwrap());
    for turn in &example.turns {
        let content = messages[turn.message_index]["content"].as_str().unwrap();
        let trained = tokenizer.decode(&example.input_ids[turn.token_range.clone()], false).unwrap();
        assert_eq!(trained, format!("{content}<|im_end|>"), "turn {}", turn.message_index);
        assert_eq!(&example.text[turn.text_range.clone()], trained);
        // What precedes a turn is its header, what follows is the newline after <|im_end|>.
        assert!(example.text[..turn.text_range.start].ends_with("<|im_start|>assistant\n"));
        assert_eq!(example.input_ids[turn.token_range.end - 1], 2);
        assert_eq!(example.input_ids.get(turn.token_range.end), Some(&198));
    }
    // Everything else (system, user, headers) carries none.
    let trained: String = example
        .loss_mask()
        .iter()
        .zip(&example.input_ids)
        .filter(|(m, _)| **m == 1)
        .map(|(_, &id)| tokenizer.decode(&[id], false).unwrap())
        .collect();
    assert_eq!(trained, "turn left<|im_end|>go forward\n  then 12 more <|im_end|><|im_end|>");
    assert_eq!(example.trained_tokens(), example.turns.iter().map(|t| t.token_range.len()).sum::<usize>());
}

#[test]
fn weight_zero_turns_stay_in_context_without_loss() {
    let tokenizer = smollm2();
    let template = smollm2_template();
    let mut weighted = conversation();
    weighted[2]["weight"] = json!(0);
    weighted[4]["weight"] = json!(1);
    weighted[6]["weight"] = json!(0.5);
    let plain = template.render_with_loss_mask(tokenizer, &conversation(), None, 1.0).unwrap();
    let example = template.render_with_loss_mask(tokenizer, &weighted, None, 2.0).unwrap();
    check_example(tokenizer, &example, &weighted);
    assert_eq!(example.text, plain.text, "weights do not change the text");
    assert_eq!(example.input_ids, plain.input_ids);
    let weights: Vec<f32> = example.turns.iter().map(|t| t.weight).collect();
    assert_eq!(weights, vec![0.0, 2.0, 1.0]);
    assert!(example.weights[example.turns[0].token_range.clone()].iter().all(|&w| w == 0.0));
    assert_eq!(example.loss_mask().iter().filter(|&&m| m == 1).count(), example.turns[1].token_range.len() + 1);

    // A record of the weighted OpenAI JSONL export: per-message and per-example weights.
    let record = json!({"messages": weighted, "weight": 0.25});
    let from_record = template.render_record(tokenizer, &record).unwrap();
    assert_eq!(from_record.turns.iter().map(|t| t.weight).collect::<Vec<_>>(), vec![0.0, 0.25, 0.125]);

    let mut bad = conversation();
    bad[2]["weight"] = json!("heavy");
    let err = template.render_with_loss_mask(tokenizer, &bad, None, 1.0).unwrap_err();
    assert!(matches!(err, ChatTemplateError::BadWeight { index: 2, .. }), "{err}");
    let err = template.render_with_loss_mask(tokenizer, &conversation(), None, f32::NAN).unwrap_err();
    assert!(matches!(err, ChatTemplateError::BadExampleWeight(_)), "{err}");
}

fn tool_conversation() -> (Vec<Value>, Vec<Value>) {
    let tools = vec![json!({"type": "function", "function": {"name": "move", "description": "Move one cell.",
        "parameters": {"type": "object", "properties": {"direction": {"type": "string"}}, "required": ["direction"]}}})];
    let messages = vec![
        json!({"role": "user", "content": "Go to the door."}),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "move", "arguments": "{\"direction\": \"left\"}"}}]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": "moved"}),
        json!({"role": "assistant", "content": "I am at the door."}),
    ];
    (messages, tools)
}

#[test]
fn tool_calls_are_trained_with_a_tool_template() {
    let tokenizer = smollm2();
    let template = tools_template();
    let (messages, tools) = tool_conversation();
    let example = template.render_with_loss_mask(tokenizer, &messages, Some(&tools), 1.0).unwrap();
    check_example(tokenizer, &example, &messages);
    let first = &example.text[example.turns[0].text_range.clone()];
    // String arguments (OpenAI format) are passed to the template as an object.
    assert_eq!(
        first,
        "<tool_call>\n{\"name\": \"move\", \"arguments\": {\"direction\": \"left\"}}\n</tool_call><|im_end|>"
    );
    assert_eq!(&example.text[example.turns[1].text_range.clone()], "I am at the door.<|im_end|>");
    assert!(example.text.contains("<tool_response>\nmoved\n</tool_response>"));
}

#[test]
fn templates_without_tool_support_get_tools_and_calls_as_text() {
    let tokenizer = smollm2();
    let template = smollm2_template();
    assert!(!template.supports_tools() && !template.supports_tool_calls());
    let (messages, tools) = tool_conversation();
    let example = template.render_with_loss_mask(tokenizer, &messages, Some(&tools), 1.0).unwrap();
    // A system message with the tools was inserted first; turn indexes still name the input messages.
    assert!(example.text.starts_with("<|im_start|>system\n# Tools\n"), "{}", example.text);
    assert!(example.text.contains("{\"type\": \"function\", \"function\": {\"name\": \"move\""));
    assert_eq!(example.turns.iter().map(|t| t.message_index).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(
        &example.text[example.turns[0].text_range.clone()],
        "<tool_call>\n{\"name\": \"move\", \"arguments\": {\"direction\": \"left\"}}\n</tool_call><|im_end|>"
    );
    assert!(example.text.contains("<|im_start|>tool\nmoved<|im_end|>"));
    assert_eq!(example.input_ids, tokenizer.encode(&example.text, false).unwrap());

    // The prompt for generation is prepared the same way.
    let prompt = template.render_prompt(&messages[..3], Some(&tools)).unwrap();
    assert!(example.text.starts_with(&prompt), "the training text extends the generation prompt");
    assert!(prompt.ends_with("<|im_start|>assistant\n"));
}

#[test]
fn templates_that_rewrite_history_are_reported() {
    let tokenizer = smollm2();
    // Renders only the last assistant message's content, like templates that drop old reasoning.
    let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let template = ChatTemplate::new(source, SpecialTokens::of(tokenizer)).unwrap();
    let err = template.render_with_loss_mask(tokenizer, &conversation(), None, 1.0).unwrap_err();
    match &err {
        ChatTemplateError::NotPrefixStable { index: 2, detail } => {
            assert!(detail.contains("whole conversation"), "{err}")
        }
        other => panic!("expected NotPrefixStable for message 2, got {other}"),
    }
}

#[test]
fn malformed_messages_are_reported_with_their_index() {
    let tokenizer = smollm2();
    let template = smollm2_template();
    let err = template
        .render_with_loss_mask(tokenizer, &[json!({"role": "user", "content": "x"}), json!("not an object")], None, 1.0)
        .unwrap_err();
    assert!(matches!(err, ChatTemplateError::BadMessage { index: 1, .. }), "{err}");
    let err = template.render_with_loss_mask(tokenizer, &[json!({"content": "x"})], None, 1.0).unwrap_err();
    assert!(err.to_string().contains("message 0") && err.to_string().contains("role"), "{err}");
    let err = template.render_record(tokenizer, &json!({"msgs": []})).unwrap_err();
    assert!(err.to_string().contains("messages"), "{err}");
}

#[test]
fn a_turn_is_tokenized_as_generation_after_its_prompt_sees_it() {
    let tokenizer = smollm2();
    let template = smollm2_template();
    let messages =
        vec![json!({"role": "user", "content": "hi"}), json!({"role": "assistant", "content": "  two leading spaces"})];
    let example = template.render_with_loss_mask(tokenizer, &messages, None, 1.0).unwrap();
    let prompt = template.render_prompt(&messages[..1], None).unwrap();
    let mut expected = tokenizer.encode(&prompt, false).unwrap();
    let turn_start = expected.len();
    expected.extend(tokenizer.encode("  two leading spaces<|im_end|>", false).unwrap());
    let turn_end = expected.len();
    expected.extend(tokenizer.encode("\n", false).unwrap());
    assert_eq!(example.input_ids, expected);
    assert_eq!(example.turns[0].token_range, turn_start..turn_end);
    // Tokenized at once, the header's newline and the first space would merge into one token.
    assert_ne!(example.input_ids, tokenizer.encode(&example.text, false).unwrap());
}
