//! Replay evaluation: recorded calls' structured inputs re-rendered for a candidate variant, run
//! through the gateway, and scored against what was recorded (or demonstrated) by evaluators.
//! Scores are stored as feedback on the candidate's inference, tagged with the run.

use std::collections::BTreeMap;
use std::str::FromStr;

use apprentice_core::{new_id, ContentBlock, FeedbackRecord, FeedbackValue, InferenceOutput, MetricLevel};
use apprentice_store::{InferenceQuery, Record, Recorder, SqliteStore, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("evaluator `{spec}`: {message}")]
    Evaluator { spec: String, message: String },
    #[error("gateway {url}: {message}")]
    Gateway { url: String, message: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no recorded inferences of function `{0}` match")]
    Empty(String),
}

/// How a candidate's output is scored against the reference (1 = match, 0 = not; a judge may
/// give anything in between).
#[derive(Debug, Clone)]
pub enum Evaluator {
    /// The same text (trimmed); for JSON outputs the same parsed value.
    Exact,
    /// The candidate's text matches the pattern.
    Regex(regex::Regex),
    /// The value at a JSON pointer (`/answer/city`) is the same in candidate and reference.
    JsonField(String),
    /// The same tool calls, in order: names and arguments as JSON values.
    ToolCall,
    /// A function served by the gateway judges: its input is `{candidate, reference}` as the user
    /// message's template arguments; its answer is a number in [0, 1], `yes`/`no`, or JSON
    /// `{"score": ...}`.
    Judge { function: String },
}

impl FromStr for Evaluator {
    type Err = ReplayError;
    fn from_str(spec: &str) -> Result<Self, ReplayError> {
        let bad = |message: &str| ReplayError::Evaluator { spec: spec.into(), message: message.into() };
        let (kind, argument) = spec.split_once(':').map_or((spec, None), |(k, a)| (k, Some(a)));
        match (kind, argument) {
            ("exact", None) => Ok(Evaluator::Exact),
            ("tool-call", None) => Ok(Evaluator::ToolCall),
            ("regex", Some(pattern)) => {
                regex::Regex::new(pattern).map(Evaluator::Regex).map_err(|e| bad(&format!("bad pattern: {e}")))
            }
            ("json-field", Some(pointer)) if pointer.starts_with('/') => Ok(Evaluator::JsonField(pointer.into())),
            ("json-field", Some(_)) => {
                Err(bad("the field is a JSON pointer and starts with `/`, e.g. json-field:/answer"))
            }
            ("judge", Some(function)) if !function.is_empty() => Ok(Evaluator::Judge { function: function.into() }),
            _ => Err(bad("expected exact, regex:PATTERN, json-field:/POINTER, tool-call or judge:FUNCTION")),
        }
    }
}

impl Evaluator {
    /// The feedback metric its scores are stored under.
    pub fn metric(&self) -> String {
        match self {
            Evaluator::Exact => "replay_exact".into(),
            Evaluator::Regex(_) => "replay_regex".into(),
            Evaluator::JsonField(pointer) => format!("replay_json_field{}", pointer.replace('/', "_")),
            Evaluator::ToolCall => "replay_tool_call".into(),
            Evaluator::Judge { function } => format!("replay_judge_{}", function.replace("::", "_")),
        }
    }

    /// The score of `candidate` against `reference`; None for the judge, which needs the gateway.
    pub fn score(&self, candidate: &InferenceOutput, reference: &InferenceOutput) -> Option<f64> {
        let bool_score = |b: bool| Some(if b { 1.0 } else { 0.0 });
        match self {
            Evaluator::Exact => match (json_value(candidate), json_value(reference)) {
                (Some(a), Some(b)) if matches!(candidate, InferenceOutput::Json(_)) => bool_score(a == b),
                _ => bool_score(text(candidate).trim() == text(reference).trim()),
            },
            Evaluator::Regex(pattern) => bool_score(pattern.is_match(&text(candidate))),
            Evaluator::JsonField(pointer) => {
                let field = |o: &InferenceOutput| json_value(o).and_then(|v| v.pointer(pointer).cloned());
                match (field(candidate), field(reference)) {
                    (Some(a), Some(b)) => bool_score(a == b),
                    _ => bool_score(false),
                }
            }
            Evaluator::ToolCall => bool_score(tool_calls(candidate) == tool_calls(reference)),
            Evaluator::Judge { .. } => None,
        }
    }
}

/// The text of an output: its text blocks joined, or a JSON output's raw text.
pub fn text(output: &InferenceOutput) -> String {
    match output {
        InferenceOutput::Chat { content } => content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(""),
        InferenceOutput::Json(json) => json.raw.clone(),
    }
}

fn json_value(output: &InferenceOutput) -> Option<Value> {
    match output {
        InferenceOutput::Json(json) => json.parsed.clone().or_else(|| serde_json::from_str(&json.raw).ok()),
        InferenceOutput::Chat { .. } => serde_json::from_str(text(output).trim()).ok(),
    }
}

fn tool_calls(output: &InferenceOutput) -> Vec<(String, Value)> {
    match output {
        InferenceOutput::Chat { content } => content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::ToolCall(call) => Some((
                    call.name.clone(),
                    serde_json::from_str(&call.arguments).unwrap_or_else(|_| Value::String(call.arguments.clone())),
                )),
                _ => None,
            })
            .collect(),
        InferenceOutput::Json(_) => Vec::new(),
    }
}

/// What to replay and against which variant.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub run_id: String,
    pub function: String,
    /// Only calls recorded by this variant (None: any).
    pub source_variant: Option<String>,
    pub candidate_variant: String,
    pub limit: Option<u64>,
}

/// One replayed call and its scores by metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayItem {
    pub recorded: Uuid,
    pub candidate: Uuid,
    /// The reference was a demonstration, not the recorded output.
    pub demonstrated: bool,
    pub scores: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    pub run_id: String,
    pub function: String,
    pub candidate_variant: String,
    pub items: Vec<ReplayItem>,
    /// Mean score per metric.
    pub means: BTreeMap<String, f64>,
}

/// Replays recorded calls of `options.function` through the gateway at `url` with the candidate
/// variant, scores each with every evaluator, and stores the scores as inference feedback.
pub async fn replay(
    store: &SqliteStore,
    recorder: &Recorder,
    url: &str,
    options: &ReplayOptions,
    evaluators: &[Evaluator],
    on_item: impl Fn(&ReplayItem),
) -> Result<ReplayReport, ReplayError> {
    let query = InferenceQuery {
        function_name: Some(options.function.clone()),
        variant_name: options.source_variant.clone(),
        episode_id: None,
        limit: None,
    };
    let mut recorded = store.inferences(&query).await?;
    // Earlier replays of this function are recorded too; they are not references.
    recorded.retain(|r| !r.tags.contains_key("replay_of"));
    if let Some(limit) = options.limit {
        recorded.truncate(limit as usize);
    }
    if recorded.is_empty() {
        return Err(ReplayError::Empty(options.function.clone()));
    }
    let client = reqwest::Client::new();
    let gateway_error = |message: String| ReplayError::Gateway { url: url.to_string(), message };
    let mut items = Vec::with_capacity(recorded.len());
    for record in &recorded {
        let demonstration = store.feedback_for(record.id).await?.into_iter().rev().find_map(|f| match f.value {
            FeedbackValue::Demonstration(output) => Some(output),
            _ => None,
        });
        let demonstrated = demonstration.is_some();
        let reference = demonstration.unwrap_or_else(|| record.output.clone());
        let tags = BTreeMap::from([
            ("eval_run".to_string(), options.run_id.clone()),
            ("replay_of".to_string(), record.id.to_string()),
        ]);
        let body = json!({
            "function_name": options.function,
            "variant_name": options.candidate_variant,
            "input": record.input,
            "tags": tags,
        });
        let answer = post(&client, &format!("{url}/inference"), &body).await.map_err(gateway_error)?;
        let candidate_id = answer["inference_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| gateway_error(format!("answer without an inference_id: {answer}")))?;
        let candidate = output_of(&answer).map_err(gateway_error)?;
        let mut scores = BTreeMap::new();
        for evaluator in evaluators {
            let score = match (evaluator, evaluator.score(&candidate, &reference)) {
                (_, Some(score)) => score,
                (Evaluator::Judge { function }, None) => {
                    judge(&client, url, function, &candidate, &reference, &tags).await.map_err(gateway_error)?
                }
                (_, None) => continue,
            };
            let feedback = FeedbackRecord {
                id: new_id(),
                metric_name: evaluator.metric(),
                target_level: MetricLevel::Inference,
                target_id: candidate_id,
                value: FeedbackValue::Float(score),
                tags: tags.clone(),
                created_at: chrono::Utc::now(),
            };
            recorder.record(Record::Feedback(Box::new(feedback))).await?;
            scores.insert(evaluator.metric(), score);
        }
        let item = ReplayItem { recorded: record.id, candidate: candidate_id, demonstrated, scores };
        on_item(&item);
        items.push(item);
    }
    recorder.flush().await?;
    let mut means = BTreeMap::new();
    for evaluator in evaluators {
        let metric = evaluator.metric();
        let values: Vec<f64> = items.iter().filter_map(|i| i.scores.get(&metric).copied()).collect();
        if !values.is_empty() {
            means.insert(metric, values.iter().sum::<f64>() / values.len() as f64);
        }
    }
    Ok(ReplayReport {
        run_id: options.run_id.clone(),
        function: options.function.clone(),
        candidate_variant: options.candidate_variant.clone(),
        items,
        means,
    })
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Result<Value, String> {
    let response = client.post(url).json(body).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| format!("answer is not JSON: {e}"))?;
    if !status.is_success() {
        return Err(format!("answered {status}: {answer}"));
    }
    Ok(answer)
}

/// The gateway's answer as an output: `content` blocks (chat) or `output` (json).
fn output_of(answer: &Value) -> Result<InferenceOutput, String> {
    if let Some(output) = answer.get("output") {
        let json: apprentice_core::JsonOutput =
            serde_json::from_value(output.clone()).map_err(|e| format!("bad json output {output}: {e}"))?;
        return Ok(InferenceOutput::Json(json));
    }
    let content = answer.get("content").cloned().unwrap_or(Value::Array(Vec::new()));
    let content: Vec<ContentBlock> =
        serde_json::from_value(content).map_err(|e| format!("bad content in {answer}: {e}"))?;
    Ok(InferenceOutput::Chat { content })
}

async fn judge(
    client: &reqwest::Client,
    url: &str,
    function: &str,
    candidate: &InferenceOutput,
    reference: &InferenceOutput,
    tags: &BTreeMap<String, String>,
) -> Result<f64, String> {
    let body = json!({
        "function_name": function,
        "input": {"messages": [{"role": "user", "content": {"candidate": text(candidate), "reference": text(reference)}}]},
        "tags": tags,
    });
    let answer = post(client, &format!("{url}/inference"), &body).await?;
    let output = output_of(&answer)?;
    parse_judgement(&output).ok_or_else(|| format!("judge `{function}` answered `{}`: not a score", text(&output)))
}

/// A judge's answer as a score in [0, 1]: JSON `{"score": x}` (number or boolean), a number, or
/// yes/no (true/false, pass/fail).
pub fn parse_judgement(output: &InferenceOutput) -> Option<f64> {
    let from_value = |v: &Value| match v {
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => n.as_f64(),
        _ => None,
    };
    if let Some(value) = json_value(output) {
        if let Some(score) = value.get("score").and_then(from_value).or_else(|| from_value(&value)) {
            return (0.0..=1.0).contains(&score).then_some(score);
        }
    }
    let answer = text(output).trim().trim_end_matches('.').to_ascii_lowercase();
    match answer.as_str() {
        "yes" | "true" | "pass" => Some(1.0),
        "no" | "false" | "fail" => Some(0.0),
        other => other.parse::<f64>().ok().filter(|s| (0.0..=1.0).contains(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apprentice_core::{JsonOutput, ToolCall};

    fn chat(text: &str) -> InferenceOutput {
        InferenceOutput::Chat { content: vec![ContentBlock::Text { text: text.into() }] }
    }

    fn json(raw: &str) -> InferenceOutput {
        InferenceOutput::Json(JsonOutput { raw: raw.into(), parsed: serde_json::from_str(raw).ok() })
    }

    fn call(name: &str, arguments: &str) -> InferenceOutput {
        InferenceOutput::Chat {
            content: vec![ContentBlock::ToolCall(ToolCall {
                id: "c1".into(),
                name: name.into(),
                arguments: arguments.into(),
            })],
        }
    }

    fn ev(spec: &str) -> Evaluator {
        spec.parse().unwrap()
    }

    #[test]
    fn exact_compares_trimmed_text_and_parsed_json() {
        assert_eq!(ev("exact").score(&chat(" go forward\n"), &chat("go forward")), Some(1.0));
        assert_eq!(ev("exact").score(&chat("go forward"), &chat("turn left")), Some(0.0));
        // Same JSON value, different spacing and key order.
        assert_eq!(ev("exact").score(&json(r#"{"a":1,"b":[2]}"#), &json(r#"{ "b": [2], "a": 1 }"#)), Some(1.0));
        assert_eq!(ev("exact").score(&json(r#"{"a":1}"#), &json(r#"{"a":2}"#)), Some(0.0));
    }

    #[test]
    fn regex_matches_the_candidate() {
        assert_eq!(ev("regex:^(turn (left|right)|go forward)$").score(&chat("turn left"), &chat("x")), Some(1.0));
        assert_eq!(ev("regex:^go").score(&chat("I would go"), &chat("x")), Some(0.0));
        let err = "regex:(".parse::<Evaluator>().unwrap_err().to_string();
        assert!(err.contains("regex:(") && err.contains("bad pattern"), "{err}");
    }

    #[test]
    fn json_field_compares_one_field() {
        let e = ev("json-field:/answer/city");
        let a = json(r#"{"answer":{"city":"Paris","why":"capital"}}"#);
        let b = json(r#"{"answer":{"city":"Paris","why":"river"}}"#);
        let c = json(r#"{"answer":{"city":"Lyon"}}"#);
        assert_eq!(e.score(&a, &b), Some(1.0));
        assert_eq!(e.score(&a, &c), Some(0.0));
        // A chat answer that is JSON text counts too; a missing field does not match.
        assert_eq!(e.score(&chat(r#"{"answer":{"city":"Paris"}}"#), &b), Some(1.0));
        assert_eq!(e.score(&json(r#"{"other":1}"#), &b), Some(0.0));
        assert!("json-field:answer".parse::<Evaluator>().unwrap_err().to_string().contains("starts with `/`"));
    }

    #[test]
    fn tool_call_compares_names_and_argument_values() {
        let e = ev("tool-call");
        assert_eq!(e.score(&call("search", r#"{"q":"a","n":2}"#), &call("search", r#"{"n": 2, "q": "a"}"#)), Some(1.0));
        assert_eq!(e.score(&call("search", r#"{"q":"b"}"#), &call("search", r#"{"q":"a"}"#)), Some(0.0));
        assert_eq!(e.score(&call("lookup", r#"{"q":"a"}"#), &call("search", r#"{"q":"a"}"#)), Some(0.0));
        assert_eq!(e.score(&chat("search a"), &call("search", r#"{"q":"a"}"#)), Some(0.0));
    }

    #[test]
    fn judgements_parse_to_scores_in_the_unit_interval() {
        assert_eq!(parse_judgement(&chat("Yes.")), Some(1.0));
        assert_eq!(parse_judgement(&chat("no")), Some(0.0));
        assert_eq!(parse_judgement(&chat("0.75")), Some(0.75));
        assert_eq!(parse_judgement(&json(r#"{"score": 0.5, "why": "half"}"#)), Some(0.5));
        assert_eq!(parse_judgement(&json(r#"{"score": true}"#)), Some(1.0));
        assert_eq!(parse_judgement(&chat("7")), None, "outside [0, 1]");
        assert_eq!(parse_judgement(&chat("it depends")), None);
        assert!(matches!(ev("judge:grader"), Evaluator::Judge { function } if function == "grader"));
        assert!("judge".parse::<Evaluator>().is_err() && "levenshtein".parse::<Evaluator>().is_err());
    }
}
