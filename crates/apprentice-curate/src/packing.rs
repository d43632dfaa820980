//! Episodes as conversations. When each selected inference of an episode was sent the previous
//! one's messages, its output and new turns, the episode becomes one multi-turn example whose
//! assistant turns carry the loss (`"weight": 1`, OpenAI's per-message key) and whose other
//! assistant turns are context only (`"weight": 0`). Every trained turn sees exactly the context
//! its own per-inference example would have, so packing changes the cost of training, not what is
//! learned; an episode whose inferences do not extend one another stays one example per inference.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::example::Example;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// One example per episode where its inferences extend one another, else one per inference.
    #[default]
    Auto,
    /// Always one example per inference.
    PerInference,
}

/// What packing did.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    pub examples: Vec<Example>,
    /// Episodes (of two or more examples) turned into one conversation.
    pub episodes: usize,
}

/// Packs the examples of each episode that forms a conversation; the others pass unchanged. The
/// output lists episodes in order of their first example, each episode's examples in their order.
pub(crate) fn pack(examples: Vec<Example>) -> Packed {
    let mut order = Vec::new();
    let mut groups: HashMap<Uuid, Vec<Example>> = HashMap::new();
    for example in examples {
        let group = groups.entry(example.episode_id).or_insert_with(|| {
            order.push(example.episode_id);
            Vec::new()
        });
        group.push(example);
    }
    let mut packed = Packed::default();
    for episode in order {
        let group = groups.remove(&episode).unwrap_or_default();
        if group.len() >= 2 && group.windows(2).all(|pair| extends(&pair[0], &pair[1])) {
            packed.episodes += 1;
            packed.examples.push(conversation(group));
        } else {
            packed.examples.extend(group);
        }
    }
    packed
}

/// `next` was sent all of `prev`'s messages (its output included), then at least one more.
/// Examples of an episode weighted differently cannot share one example weight.
fn extends(prev: &Example, next: &Example) -> bool {
    let prompt = &next.messages[..next.messages.len().saturating_sub(1)];
    prompt.len() > prev.messages.len()
        && prompt.starts_with(&prev.messages)
        && prev.tools == next.tools
        && prev.weight == next.weight
        && prev.task == next.task
}

/// The last example's messages hold every earlier one's; each example's output is trained on, any
/// other assistant turn (a step left out by curation, say) is context.
fn conversation(group: Vec<Example>) -> Example {
    let trained: BTreeSet<usize> = group.iter().map(|e| e.messages.len() - 1).collect();
    let demonstrated = group.iter().any(|e| e.demonstrated);
    let inference_ids = group.iter().map(|e| e.inference_id).collect();
    let mut last = group.into_iter().next_back().expect("a group has examples");
    for (index, message) in last.messages.iter_mut().enumerate() {
        if message.get("role").and_then(Value::as_str) == Some("assistant") {
            if let Some(object) = message.as_object_mut() {
                object.insert("weight".into(), Value::from(u8::from(trained.contains(&index))));
            }
        }
    }
    Example { inference_ids, demonstrated, ..last }
}

/// OpenAI's format trains on every assistant message that carries no `weight`. An example that was
/// not packed trains on its output only: earlier assistant turns in its prompt are context, or each
/// step would be trained again in every later example of its episode. Packed examples already say
/// which turns carry the loss, and single-turn examples need no key.
pub(crate) fn mark_context_turns(example: &mut Example) {
    let is_assistant = |m: &Value| m.get("role").and_then(Value::as_str) == Some("assistant");
    let already_marked = example.messages.iter().any(|m| m.get("weight").is_some());
    if already_marked || example.messages.iter().filter(|m| is_assistant(m)).count() < 2 {
        return;
    }
    let output = example.messages.len() - 1;
    for (index, message) in example.messages.iter_mut().enumerate() {
        if is_assistant(message) {
            if let Some(object) = message.as_object_mut() {
                object.insert("weight".into(), Value::from(u8::from(index == output)));
            }
        }
    }
}

/// A stand-in for a token count until a tokenizer is at hand: whitespace-separated words of every
/// message's text content.
pub(crate) fn approx_tokens(examples: &[Example]) -> usize {
    examples
        .iter()
        .flat_map(|e| &e.messages)
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|text| text.split_whitespace().count())
        .sum()
}
