//! The model's own chat template (HF Jinja), rendered with minijinja so the text equals what
//! Python's `transformers` `apply_chat_template` produces, and assistant-only loss masks.
//!
//! The environment mirrors transformers': `trim_blocks`, `lstrip_blocks`, loop controls
//! (`{% break %}`), Python string/dict methods (minijinja-contrib pycompat), `raise_exception`,
//! `strftime_now`, and a `tojson` that writes what Python's `json.dumps(x, ensure_ascii=False)`
//! writes (`", "` and `": "` separators, keys in their original order, Python float repr, no HTML
//! escaping), with `indent`, `separators`, `sort_keys` and `ensure_ascii` arguments. The
//! `{% generation %}` blocks some templates carry (transformers' assistant-mask extension) render
//! their body. Variables: `messages`, `tools` (none when absent), `documents` (none),
//! `add_generation_prompt`, and the tokenizer's `bos_token`, `eos_token`, `unk_token`,
//! `pad_token` when it has them.
//!
//! Loss masks ([`ChatTemplate::render_with_loss_mask`]): the conversation is rendered once and
//! tokenized once; each assistant turn's text span is found by rendering the conversation up to
//! that turn with and without it (the prefix with the generation prompt must be a prefix of the
//! prefix with the turn, which must be a prefix of the whole text — otherwise a clear error).
//! The span runs from the end of the generation prompt through the end-of-turn token (the
//! tokenizer's eos, `<|im_end|>` for SmolLM2); what follows it (the newline) and everything else
//! gets no loss. The text is tokenized piece by piece (before the first turn, the turn, between
//! turns, ...), so a turn's tokens are exactly what the model generates after the prompt; the ids
//! equal tokenizing the whole text at once except where a content starts with whitespace that
//! would merge with the header's newline into one token.

use std::collections::BTreeMap;
use std::ops::Range;

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use crate::tokenizer::{Tokenizer, TokenizerError};

const TEMPLATE_NAME: &str = "chat_template";
const RAISED: &str = "raise_exception: ";

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the tokenizer has no chat template (no GGUF `tokenizer.chat_template`, no tokenizer_config.json `chat_template`)")]
    NoTemplate,
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    #[error("the chat template raised an exception: {0}")]
    Raised(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("message {index}: {message}")]
    BadMessage { index: usize, message: String },
    #[error("message {index}: `weight` must be a number ≥ 0 or a bool, found {found}")]
    BadWeight { index: usize, found: String },
    #[error("the example weight must be a finite number ≥ 0, found {0}")]
    BadExampleWeight(String),
    #[error(
        "cannot find the assistant turn of message {index} in the rendered text: {detail} \
         (the template renders earlier turns differently once later ones exist)"
    )]
    NotPrefixStable { index: usize, detail: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

type Result<T> = std::result::Result<T, ChatTemplateError>;

/// The special tokens a template can refer to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    /// The tokenizer's bos/eos/unk/pad tokens.
    pub fn of(tokenizer: &Tokenizer) -> Self {
        Self {
            bos_token: tokenizer.bos_token(),
            eos_token: tokenizer.eos_token(),
            unk_token: tokenizer.unk_token(),
            pad_token: tokenizer.pad_token_id().and_then(|id| tokenizer.id_to_token(id)),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special: SpecialTokens,
    supports_tools: bool,
    supports_tool_calls: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special", &self.special)
            .field("supports_tools", &self.supports_tools)
            .field("supports_tool_calls", &self.supports_tool_calls)
            .finish()
    }
}

/// One assistant turn found in a rendered conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct AssistantTurn {
    /// Index of the message in the conversation.
    pub message_index: usize,
    /// The message's weight times the example weight (0: context only).
    pub weight: f32,
    /// Byte range of the trained text (content through the end-of-turn token) in `text`.
    pub text_range: Range<usize>,
    /// The tokens of `text_range` in `input_ids`.
    pub token_range: Range<usize>,
}

/// A rendered, tokenized conversation with a loss weight per token.
#[derive(Debug, Clone, PartialEq)]
pub struct LossMaskedExample {
    pub text: String,
    /// The ids of `text`, tokenized piece by piece at turn boundaries.
    pub input_ids: Vec<u32>,
    /// One per token: the weight of the assistant turn it belongs to, else 0.
    pub weights: Vec<f32>,
    pub turns: Vec<AssistantTurn>,
}

impl LossMaskedExample {
    /// 1 where a token carries loss (weight > 0), else 0.
    pub fn loss_mask(&self) -> Vec<u8> {
        self.weights.iter().map(|&w| u8::from(w > 0.0)).collect()
    }

    /// The number of tokens that carry loss.
    pub fn trained_tokens(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

impl ChatTemplate {
    /// Compiles `source` with the special tokens it may refer to.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self> {
        let source = strip_generation_tags(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
        });
        env.add_function("strftime_now", |format: String| -> std::result::Result<String, Error> {
            Ok(strftime_utc_now(&format))
        });
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        let supports_tools = source.contains("tools");
        let supports_tool_calls = source.contains("tool_calls");
        Ok(Self { env, source, special, supports_tools, supports_tool_calls })
    }

    /// The tokenizer's own template and special tokens.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let source = tokenizer.chat_template().ok_or(ChatTemplateError::NoTemplate)?;
        Self::new(source, SpecialTokens::of(tokenizer))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Whether the template renders `tools` (otherwise [`ChatTemplate::prepare`] writes them
    /// into the system message).
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// Whether the template renders assistant `tool_calls` (otherwise [`ChatTemplate::prepare`]
    /// writes them into the content).
    pub fn supports_tool_calls(&self) -> bool {
        self.supports_tool_calls
    }

    /// Renders messages exactly as given, as transformers' `apply_chat_template(messages,
    /// tools=tools, add_generation_prompt=..., tokenize=False)` does.
    pub fn render(&self, messages: &[Json], tools: Option<&[Json]>, add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("tools", tools.map(Value::from_serialize).unwrap_or(Value::from(())));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        for (key, token) in [
            ("bos_token", &self.special.bos_token),
            ("eos_token", &self.special.eos_token),
            ("unk_token", &self.special.unk_token),
            ("pad_token", &self.special.pad_token),
        ] {
            if let Some(token) = token {
                ctx.insert(key, Value::from(token.as_str()));
            }
        }
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        template.render(Value::from_iter(ctx)).map_err(|e| {
            let text = describe(&e);
            match text.find(RAISED) {
                Some(at) => {
                    let message = &text[at + RAISED.len()..];
                    // The detail ends before the location minijinja appends.
                    let message = message.split(" (in ").next().unwrap_or(message);
                    ChatTemplateError::Raised(message.trim().to_string())
                }
                None => ChatTemplateError::Render(text),
            }
        })
    }

    /// Messages and tools as this template should see them, from OpenAI chat format:
    /// - `weight` keys are dropped (they are loss weights, not content);
    /// - tool-call `arguments` given as JSON text become objects (HF templates expect objects);
    /// - when the template does not render `tool_calls`, they are written into the assistant
    ///   content as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` blocks;
    /// - when the template does not render `tools`, their schemas are written into the system
    ///   message (inserted first when there is none);
    /// - a `null` content becomes `""`.
    pub fn prepare(&self, messages: &[Json], tools: Option<&[Json]>) -> Result<(Vec<Json>, Option<Vec<Json>>)> {
        let mut out = Vec::with_capacity(messages.len() + 1);
        for (index, message) in messages.iter().enumerate() {
            let Json::Object(object) = message else {
                return Err(ChatTemplateError::BadMessage { index, message: format!("not a JSON object: {message}") });
            };
            let mut object = object.clone();
            object.remove("weight");
            if !matches!(object.get("role"), Some(Json::String(_))) {
                return Err(ChatTemplateError::BadMessage { index, message: "has no string `role`".into() });
            }
            if let Some(Json::Array(calls)) = object.get_mut("tool_calls") {
                for call in calls.iter_mut() {
                    let target = match call.get_mut("function") {
                        Some(function) => function,
                        None => call,
                    };
                    if let Some(arguments) = target.get_mut("arguments") {
                        if let Json::String(text) = arguments {
                            if let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(text) {
                                *arguments = parsed;
                            }
                        }
                    }
                }
            }
            if matches!(object.get("tool_calls"), Some(Json::Array(a)) if a.is_empty()) {
                object.remove("tool_calls");
            }
            if !self.supports_tool_calls {
                if let Some(Json::Array(calls)) = object.remove("tool_calls") {
                    let mut text = content_text(object.get("content"));
                    for call in &calls {
                        let function = call.get("function").unwrap_or(call);
                        let name = function.get("name").and_then(Json::as_str).unwrap_or_default();
                        let arguments = function.get("arguments").cloned().unwrap_or(Json::Object(Default::default()));
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&format!(
                            "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
                            python_json(&Json::String(name.to_string())),
                            python_json(&arguments)
                        ));
                    }
                    object.insert("content".into(), Json::String(text));
                }
            }
            if matches!(object.get("content"), None | Some(Json::Null)) {
                object.insert("content".into(), Json::String(String::new()));
            }
            out.push(Json::Object(object));
        }
        let tools = tools.filter(|t| !t.is_empty());
        if self.supports_tools || tools.is_none() {
            return Ok((out, tools.map(<[Json]>::to_vec)));
        }
        let mut block = String::from("# Tools\n\nYou can call these functions (JSON schemas, one per line):\n<tools>");
        for tool in tools.unwrap_or_default() {
            block.push('\n');
            block.push_str(&python_json(tool));
        }
        block.push_str(
            "\n</tools>\n\nTo call a function, answer with:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>",
        );
        match out.first_mut() {
            Some(Json::Object(first)) if first.get("role").and_then(Json::as_str) == Some("system") => {
                let mut text = content_text(first.get("content"));
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(&block);
                first.insert("content".into(), Json::String(text));
            }
            _ => out.insert(0, serde_json::json!({"role": "system", "content": block})),
        }
        Ok((out, None))
    }

    /// The prompt for generating the next assistant turn: [`ChatTemplate::prepare`] then
    /// [`ChatTemplate::render`] with the generation prompt.
    pub fn render_prompt(&self, messages: &[Json], tools: Option<&[Json]>) -> Result<String> {
        let (messages, tools) = self.prepare(messages, tools)?;
        self.render(&messages, tools.as_deref(), true)
    }

    /// Renders and tokenizes a conversation with assistant-only loss weights.
    ///
    /// Each assistant message's weight is its `weight` key (a number ≥ 0 or a bool; absent means
    /// 1), times `example_weight`. Weight-0 turns stay in the context and get no loss.
    pub fn render_with_loss_mask(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Json],
        tools: Option<&[Json]>,
        example_weight: f32,
    ) -> Result<LossMaskedExample> {
        if !example_weight.is_finite() || example_weight < 0.0 {
            return Err(ChatTemplateError::BadExampleWeight(example_weight.to_string()));
        }
        let mut weights_by_message = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            let weight = match message.get("weight") {
                None | Some(Json::Null) => 1.0,
                Some(Json::Bool(b)) => f32::from(u8::from(*b)),
                Some(Json::Number(n)) => match n.as_f64() {
                    Some(w) if w.is_finite() && w >= 0.0 => w as f32,
                    _ => return Err(ChatTemplateError::BadWeight { index, found: n.to_string() }),
                },
                Some(other) => return Err(ChatTemplateError::BadWeight { index, found: other.to_string() }),
            };
            weights_by_message.push(weight);
        }
        let (prepared, tools) = self.prepare(messages, tools)?;
        let tools = tools.as_deref();
        // `prepare` may insert a system message first: indexes in `prepared` shift by one.
        let shift = prepared.len() - messages.len();
        let text = self.render(&prepared, tools, false)?;
        let eot = self.special.eos_token.as_deref().filter(|t| !t.is_empty());
        let mut spans: Vec<(usize, f32, Range<usize>)> = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            if message.get("role").and_then(Json::as_str) != Some("assistant") {
                continue;
            }
            let at = index + shift;
            let prompt = self.render(&prepared[..at], tools, true).map_err(|e| ChatTemplateError::NotPrefixStable {
                index,
                detail: format!("rendering the messages before it failed: {e}"),
            })?;
            let with_turn = self.render(&prepared[..=at], tools, false)?;
            if !with_turn.starts_with(&prompt) {
                return Err(ChatTemplateError::NotPrefixStable {
                    index,
                    detail: "the conversation before it with the generation prompt is not a prefix of the conversation through it".into(),
                });
            }
            if !text.starts_with(&with_turn) {
                return Err(ChatTemplateError::NotPrefixStable {
                    index,
                    detail: "the conversation through it is not a prefix of the whole conversation".into(),
                });
            }
            let start = prompt.len();
            let mut end = with_turn.len();
            if let Some(eot) = eot {
                if let Some(pos) = with_turn[start..end].rfind(eot) {
                    end = start + pos + eot.len();
                }
            }
            spans.push((index, weights_by_message[index] * example_weight, start..end));
        }
        // Tokenize piece by piece: the text before each turn, the turn, ..., the rest. A turn's
        // first token then starts exactly where generation starts after the prompt.
        let mut input_ids = Vec::new();
        let mut weights = Vec::new();
        let mut turns = Vec::with_capacity(spans.len());
        let mut at = 0;
        for (message_index, weight, range) in spans {
            let before = tokenizer.encode(&text[at..range.start], false)?;
            weights.resize(weights.len() + before.len(), 0.0);
            input_ids.extend(before);
            let ids = tokenizer.encode(&text[range.clone()], false)?;
            let token_range = input_ids.len()..input_ids.len() + ids.len();
            weights.resize(weights.len() + ids.len(), weight);
            input_ids.extend(ids);
            at = range.end;
            turns.push(AssistantTurn { message_index, weight, text_range: range, token_range });
        }
        let rest = tokenizer.encode(&text[at..], false)?;
        weights.resize(weights.len() + rest.len(), 0.0);
        input_ids.extend(rest);
        Ok(LossMaskedExample { text, input_ids, weights, turns })
    }

    /// [`ChatTemplate::render_with_loss_mask`] for one record of OpenAI chat fine-tuning JSONL:
    /// `{"messages": [...], "tools": [...], "weight": w}` (tools and weight optional).
    pub fn render_record(&self, tokenizer: &Tokenizer, record: &Json) -> Result<LossMaskedExample> {
        let messages = match record.get("messages") {
            Some(Json::Array(messages)) => messages,
            _ => {
                return Err(ChatTemplateError::BadMessage {
                    index: 0,
                    message: "the record has no `messages` array".into(),
                })
            }
        };
        let tools = match record.get("tools") {
            Some(Json::Array(tools)) => Some(tools.as_slice()),
            None | Some(Json::Null) => None,
            Some(other) => {
                return Err(ChatTemplateError::BadMessage {
                    index: 0,
                    message: format!("`tools` is not an array: {other}"),
                })
            }
        };
        let weight = match record.get("weight") {
            None | Some(Json::Null) => 1.0,
            Some(Json::Number(n)) => n.as_f64().unwrap_or(f64::NAN) as f32,
            Some(other) => return Err(ChatTemplateError::BadExampleWeight(other.to_string())),
        };
        self.render_with_loss_mask(tokenizer, messages, tools, weight)
    }
}

fn content_text(content: Option<&Json>) -> String {
    match content {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Json::as_str)).collect::<Vec<_>>().join("")
        }
        Some(other) => other.to_string(),
    }
}

/// A minijinja error with its chain of causes.
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` tags (which minijinja
/// does not know) by an always-true `if`, keeping their whitespace control.
pub fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(body) => (&inner[..1], body),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(body) => (body, &inner[inner.len() - 1..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => out.push_str(&format!("{{%{left} {word} {right}%}}")),
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Writes values as Python's `str()` does (jinja2 prints with `str`): `True`, `False`, `None`,
/// floats as `repr`, lists and dicts as their Python repr. Strings and the rest as minijinja does.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &minijinja::State<'_, '_>,
    value: &Value,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            python_repr(value, &mut text)?;
            out.write_str(&text).map_err(Error::from)
        }
        ValueKind::Number if !value.is_integer() => {
            out.write_str(&python_float_repr(f64::try_from(value.clone())?)).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr()` of a value (strings quoted as Python quotes them).
fn python_repr(value: &Value, out: &mut String) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if c.is_control() && (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push(quote);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out)?;
                out.push_str(": ");
                python_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// Python's `json.dumps(value, ensure_ascii=False)` of a JSON value.
pub fn python_json(value: &Json) -> String {
    let mut out = String::new();
    let options = JsonOptions::default();
    write_json(&Value::from_serialize(value), &options, 0, &mut out).unwrap_or_else(|_| out.push_str("null"));
    out
}

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl Default for JsonOptions {
    fn default() -> Self {
        Self {
            ensure_ascii: false,
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            sort_keys: false,
        }
    }
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<String, Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.0.len() > names.len() {
        return Err(Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let mut given: BTreeMap<&str, Value> = BTreeMap::new();
    for (name, arg) in names.iter().zip(args.0.iter()) {
        given.insert(name, arg.clone());
    }
    for name in names {
        if kwargs.has(name) {
            given.insert(name, kwargs.get::<Value>(name)?);
        }
    }
    kwargs.assert_all_used()?;
    let mut options = JsonOptions::default();
    if let Some(v) = given.get("ensure_ascii") {
        options.ensure_ascii = v.is_true();
    }
    if let Some(v) = given.get("indent") {
        options.indent = match v.kind() {
            ValueKind::None | ValueKind::Undefined => None,
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string"))
                }
            },
        };
    }
    if options.indent.is_some() {
        options.item_separator = ",".into();
    }
    if let Some(v) = given.get("separators") {
        if !v.is_none() && !v.is_undefined() {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    options.item_separator = a.as_str().unwrap_or_default().to_string();
                    options.key_separator = b.as_str().unwrap_or_default().to_string();
                }
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
            }
        }
    }
    if let Some(v) = given.get("sort_keys") {
        options.sort_keys = v.is_true();
    }
    let mut out = String::new();
    write_json(value, &options, 0, &mut out)?;
    Ok(out)
}

fn newline(options: &JsonOptions, level: usize, out: &mut String) {
    if let Some(indent) = &options.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_json(value: &Value, options: &JsonOptions, level: usize, out: &mut String) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Undefined => {
            return Err(Error::new(ErrorKind::UndefinedError, "tojson: the value is undefined"));
        }
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let x = f64::try_from(value.clone())?;
                out.push_str(&python_float_repr(x));
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), options.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                newline(options, level + 1, out);
                write_json(item, options, level + 1, out)?;
            }
            newline(options, level, out);
            out.push(']');
        }
        ValueKind::Map | ValueKind::Plain => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            let key_text = |key: &Value| -> std::result::Result<String, Error> {
                Ok(match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                    ValueKind::Number if key.is_integer() => key.to_string(),
                    ValueKind::Number => python_float_repr(f64::try_from(key.clone())?),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: keys must be str, int, float, bool or None",
                        ))
                    }
                })
            };
            if options.sort_keys {
                let mut keyed: Vec<(String, Value)> =
                    keys.drain(..).map(|k| key_text(&k).map(|t| (t, k))).collect::<std::result::Result<_, _>>()?;
                keyed.sort_by(|a, b| a.0.cmp(&b.0));
                keys = keyed.into_iter().map(|(_, k)| k).collect();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                newline(options, level + 1, out);
                write_json_string(&key_text(key)?, options.ensure_ascii, out);
                out.push_str(&options.key_separator);
                write_json(&value.get_item(key)?, options, level + 1, out)?;
            }
            newline(options, level, out);
            out.push('}');
        }
        ValueKind::Bytes | ValueKind::Invalid => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {} value", value.kind()),
            ));
        }
        // ValueKind is non-exhaustive.
        _ => out.push_str(&format!("{:?}", value.to_string())),
    }
    Ok(())
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed notation for decimal
/// exponents from -4 to 15 with at least one decimal (`1.0`), else `1e-05` / `1e+16`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    // value = 0.DIGITS × 10^decpt
    let decpt = exponent + 1;
    let n = digits.len() as i32;
    let body = if !(-3..=16).contains(&decpt) {
        let mut m = digits[..1].to_string();
        if n > 1 {
            m.push('.');
            m.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    } else if decpt <= 0 {
        format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
    } else if decpt >= n {
        format!("{}{}.0", digits, "0".repeat((decpt - n) as usize))
    } else {
        format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
    };
    format!("{sign}{body}")
}

/// `datetime.now().strftime(format)` for the directives chat templates use, in UTC.
fn strftime_utc_now(format: &str) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(secs, format)
}

/// Formats a Unix time (UTC) with `%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`.
pub fn strftime_utc(unix_seconds: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1e-4, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (-3.25, "-3.25"),
            (0.1 + 0.2, "0.30000000000000004"),
            (123456789.125, "123456789.125"),
            (1.5e-7, "1.5e-07"),
            (2.5e300, "2.5e+300"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        assert_eq!(strftime_utc(1_721_997_296, "%d %b %Y %H:%M:%S %A %j"), "26 Jul 2024 12:34:56 Friday 208");
        assert_eq!(strftime_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        let source = "{%- generation %}x{% endgeneration -%}{% if a %}y{% endif %}";
        assert_eq!(strip_generation_tags(source), "{%- if true %}x{% endif -%}{% if a %}y{% endif %}");
    }
}
