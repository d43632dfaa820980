//! Generation with a KV cache: a batch of token-id prompts (left-padded together), sampling with
//! temperature / top-k / top-p from a seeded RNG, stop token ids, stop strings matched on decoded
//! text, a token limit, and streaming of tokens and text deltas as they are produced.
//!
//! Text comes from a `TokenDecoder` the caller passes (any `Fn(&[u32]) -> String` is one), so this
//! module does not depend on a particular tokenizer.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llama::{KvCache, Llama, LlamaError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] LlamaError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid generation options: {0}")]
    Options(String),
    #[error("prompt {row}: {reason}")]
    Prompt { row: usize, reason: String },
    #[error("row {row}: the model produced non-finite logits")]
    NonFinite { row: usize },
    #[error("the model's scheduler has stopped")]
    Stopped,
    #[error("the batch step failed: {0}")]
    Step(#[source] std::sync::Arc<crate::serve::engine::EngineError>),
}

/// Turns token ids into text; the tokenizer implements it, or pass a closure.
pub trait TokenDecoder {
    fn decode(&self, ids: &[u32]) -> String;
}

impl<F: Fn(&[u32]) -> String> TokenDecoder for F {
    fn decode(&self, ids: &[u32]) -> String {
        self(ids)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate at most per prompt (a sampled stop token counts).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: Option<f64>,
    /// Keep the `top_k` most likely tokens.
    pub top_k: Option<usize>,
    /// Prompt `i` samples from an RNG seeded with `seed + i`: the same seed gives the same output,
    /// and a prompt alone gives what it gives as row 0 of a batch.
    pub seed: u64,
    /// Ids that end a sequence (usually the model's eos ids); the stop token is not part of the output.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a sequence when they appear in the decoded output, which is cut before
    /// them. Needs a decoder.
    pub stop_strings: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: None,
            top_k: None,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

impl GenerateOptions {
    /// Greedy decoding of at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, temperature: 0.0, ..Self::default() }
    }

    pub(crate) fn validate(&self, has_decoder: bool) -> Result<(), GenerateError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(GenerateError::Options(format!("temperature {} must be >= 0", self.temperature)));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(GenerateError::Options(format!("top_p {p} must be in (0, 1]")));
            }
        }
        if self.top_k == Some(0) {
            return Err(GenerateError::Options("top_k must be at least 1".into()));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(GenerateError::Options("stop strings must not be empty".into()));
        }
        if !self.stop_strings.is_empty() && !has_decoder {
            return Err(GenerateError::Options("stop strings need a decoder".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string ended the sequence.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The stream callback asked to stop this row.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, without a final stop token; a stop string's tokens are included.
    pub tokens: Vec<u32>,
    /// Decoded `tokens`, cut before a stop string; `None` without a decoder.
    pub text: Option<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Tokens sampled, a final stop token included.
    pub completion_tokens: usize,
}

/// What a streaming caller sees, in order, for each row.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent<'a> {
    /// A generated token (never a stop token) and the text it adds, empty while text is held
    /// back: an incomplete UTF-8 character, or what might be the start of a stop string. The
    /// concatenated deltas of a row's events, `Finished` included, equal its final `text` as long
    /// as decoding a longer sequence only appends to the text of a shorter one, as byte-level BPE
    /// decoders do (the whole sequence is decoded after each token).
    Token { row: usize, token: u32, text_delta: &'a str },
    /// The row is done; `text_delta` is the text held back until now.
    Finished { row: usize, reason: FinishReason, text_delta: &'a str },
}

/// Generates for every prompt and returns when all are done.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    decoder: Option<&dyn TokenDecoder>,
) -> Result<Vec<Generation>, GenerateError> {
    generate_stream(model, prompts, options, decoder, |_| ControlFlow::Continue(()))
}

/// Like `generate`, calling `on_event` as tokens are produced. Returning `ControlFlow::Break`
/// from a row's event stops that row (`FinishReason::Cancelled`).
pub fn generate_stream(
    model: &Llama,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    decoder: Option<&dyn TokenDecoder>,
    mut on_event: impl FnMut(StreamEvent<'_>) -> ControlFlow<()>,
) -> Result<Vec<Generation>, GenerateError> {
    validate_prompts(model, prompts, options, decoder)?;
    let mut rows: Vec<RowState> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| RowState::new(p.len(), options.seed.wrapping_add(i as u64), decoder.is_some()))
        .collect();
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if options.max_new_tokens == 0 {
        return Ok(rows.into_iter().map(|r| r.finish_as(FinishReason::Length)).collect());
    }

    // Generation needs no gradients; without the graph every step's intermediates are freed.
    let model = &model.detached();
    // Left padding puts every prompt's last token in the last column, where generation continues.
    let device = model.embed_tokens.embeddings().device().clone();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch * width);
    let mut mask = Vec::with_capacity(batch * width);
    for prompt in prompts {
        let pad = width - prompt.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, prompt.len())));
    }
    let mut cache = KvCache::new(model.config(), batch);
    let input = Tensor::from_vec(ids, (batch, width), &device)?;
    let input_mask = Tensor::from_vec(mask, (batch, width), &device)?;
    decode(model, &mut rows, &mut cache, input, input_mask, options, decoder, &mut on_event)?;
    Ok(rows.into_iter().map(|r| r.into_generation()).collect())
}

fn validate_prompts(
    model: &Llama,
    prompts: &[impl AsRef<[u32]>],
    options: &GenerateOptions,
    decoder: Option<&dyn TokenDecoder>,
) -> Result<(), GenerateError> {
    options.validate(decoder.is_some())?;
    let vocab = model.config().vocab_size;
    for (row, prompt) in prompts.iter().map(AsRef::as_ref).enumerate() {
        if prompt.is_empty() {
            return Err(GenerateError::Prompt { row, reason: "empty prompt".into() });
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::Prompt {
                row,
                reason: format!("token id {bad} outside the vocabulary of {vocab}"),
            });
        }
    }
    Ok(())
}

/// The decoding loop: forward `input`, sample every unfinished row, feed the samples back.
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Llama,
    rows: &mut [RowState],
    cache: &mut KvCache,
    mut input: Tensor,
    mut input_mask: Tensor,
    options: &GenerateOptions,
    decoder: Option<&dyn TokenDecoder>,
    on_event: &mut impl FnMut(StreamEvent<'_>) -> ControlFlow<()>,
) -> Result<(), GenerateError> {
    let batch = rows.len();
    let device = input.device().clone();
    loop {
        let logits = model.forward_cached_last(&input, Some(&input_mask), cache)?;
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = vec![0u32; batch];
        let mut next_mask = vec![0u8; batch];
        for (row, state) in rows.iter_mut().enumerate() {
            if state.finished.is_some() {
                continue;
            }
            let token = sample(&logits[row], options, &mut state.rng).ok_or(GenerateError::NonFinite { row })?;
            state.step(row, token, options, decoder, on_event);
            if state.finished.is_none() {
                next[row] = token;
                next_mask[row] = 1;
            }
        }
        if rows.iter().all(|r| r.finished.is_some()) {
            return Ok(());
        }
        input = Tensor::from_vec(next, (batch, 1), &device)?;
        input_mask = Tensor::from_vec(next_mask, (batch, 1), &device)?;
    }
}

/// One sequence's sampling state: what it generated, its text and stops, its RNG. The batch
/// generation here and the serving scheduler both drive it, so both sample and stop alike.
pub(crate) struct RowState {
    prompt_tokens: usize,
    tokens: Vec<u32>,
    completion_tokens: usize,
    pub(crate) rng: StdRng,
    /// Decoded text of `tokens`, cut at a stop string once one is found.
    text: String,
    /// Bytes of `text` already streamed.
    emitted: usize,
    pub(crate) finished: Option<FinishReason>,
    has_text: bool,
}

impl RowState {
    pub(crate) fn new(prompt_tokens: usize, seed: u64, has_text: bool) -> Self {
        Self {
            prompt_tokens,
            tokens: Vec::new(),
            completion_tokens: 0,
            rng: StdRng::seed_from_u64(seed),
            text: String::new(),
            emitted: 0,
            finished: None,
            has_text,
        }
    }

    pub(crate) fn finish_as(mut self, reason: FinishReason) -> Generation {
        self.finished = Some(reason);
        self.into_generation()
    }

    pub(crate) fn into_generation(self) -> Generation {
        Generation {
            tokens: self.tokens,
            text: self.has_text.then_some(self.text),
            finish_reason: self.finished.unwrap_or(FinishReason::Length),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// Takes one sampled token: records it, decodes, checks stops and limits, and streams.
    pub(crate) fn step(
        &mut self,
        row: usize,
        token: u32,
        options: &GenerateOptions,
        decoder: Option<&dyn TokenDecoder>,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> ControlFlow<()>,
    ) {
        self.completion_tokens += 1;
        if options.stop_token_ids.contains(&token) {
            self.finish(row, FinishReason::Stop, on_event);
            return;
        }
        self.tokens.push(token);

        let mut reason = None;
        let mut releasable = 0;
        if let Some(decoder) = decoder {
            self.text = decoder.decode(&self.tokens);
            if let Some(cut) = find_stop(&self.text, &options.stop_strings, self.emitted) {
                self.text.truncate(cut);
                reason = Some(FinishReason::Stop);
            }
            releasable = releasable_len(&self.text, &options.stop_strings).max(self.emitted);
        }
        let delta = self.text.get(self.emitted..releasable).unwrap_or("");
        let flow = on_event(StreamEvent::Token { row, token, text_delta: delta });
        self.emitted = releasable;
        if reason.is_none() && self.tokens.len() >= options.max_new_tokens {
            reason = Some(FinishReason::Length);
        }
        if reason.is_none() && flow.is_break() {
            reason = Some(FinishReason::Cancelled);
        }
        if let Some(reason) = reason {
            self.finish(row, reason, on_event);
        }
    }

    /// Streams the held-back rest of the text and the end of the row.
    fn finish(
        &mut self,
        row: usize,
        reason: FinishReason,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> ControlFlow<()>,
    ) {
        let rest = self.text.get(self.emitted..).unwrap_or("");
        // The row is ending anyway: there is nothing left for the callback to cancel.
        let _ = on_event(StreamEvent::Finished { row, reason, text_delta: rest });
        self.emitted = self.text.len();
        self.finished = Some(reason);
    }
}

/// The byte offset of the earliest stop string in `text` that starts at or after `from`. Text
/// before `from` was streamed already; it was held back while it could start a stop string, so
/// no stop string can start there.
fn find_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    let start = (0..=from.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    stops.iter().filter_map(|s| text[start..].find(s.as_str()).map(|i| start + i)).min()
}

/// How much of `text` can be streamed now: all but a trailing incomplete character (decoders
/// show one as U+FFFD until its last byte arrives) and a tail that could begin a stop string.
fn releasable_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for stop in stops {
        for (i, _) in text[..end].char_indices() {
            let tail = &text[i..end];
            if stop.starts_with(tail) {
                end = i;
                break;
            }
        }
    }
    end
}

/// Picks the next token from one row of logits; `None` if they are not finite.
///
/// Sampling walks the candidates from the most likely down until the draw is spent, and that walk
/// rarely goes past the first few tokens: candidates are ranked lazily ([`Ranked`]) instead of
/// sorting the whole vocabulary for every token (49,152 ids for SmolLM2, milliseconds a token,
/// which a batch of sequences pays once per sequence).
pub(crate) fn sample(logits: &[f32], options: &GenerateOptions, rng: &mut StdRng) -> Option<u32> {
    if logits.iter().any(|l| !l.is_finite()) {
        return None;
    }
    if options.temperature == 0.0 || options.top_k == Some(1) {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return Some(best as u32);
    }
    let mut ranked = Ranked::new(logits, options.top_k);
    let max = logits[ranked.get(0)? as usize] as f64;
    let weight = |id: u32| ((logits[id as usize] as f64 - max) / options.temperature).exp();
    // The whole mass in id order of the candidates: a fixed order, whatever the ranking did.
    let total: f64 = ranked.candidates().iter().map(|&id| weight(id)).sum();
    let mut kept = ranked.len();
    let mut kept_mass = total;
    if let Some(top_p) = options.top_p {
        // The smallest head of the ranking whose probability reaches top_p.
        let mut cumulative = 0.0;
        for i in 0..ranked.len() {
            let w = weight(ranked.get(i)?);
            cumulative += w;
            if cumulative / total >= top_p {
                kept = i + 1;
                kept_mass = cumulative;
                break;
            }
        }
    }
    let mut draw = rng.gen::<f64>() * kept_mass;
    for i in 0..kept {
        let id = ranked.get(i)?;
        draw -= weight(id);
        if draw < 0.0 {
            return Some(id);
        }
    }
    ranked.get(kept - 1)
}

/// Candidate ids by decreasing logit (ties by id), sorted only as far as they are read.
struct Ranked<'a> {
    logits: &'a [f32],
    order: Vec<u32>,
    /// `order[..sorted]` are the best `sorted` candidates, in order.
    sorted: usize,
}

impl<'a> Ranked<'a> {
    fn new(logits: &'a [f32], top_k: Option<usize>) -> Self {
        let mut ranked = Self { logits, order: (0..logits.len() as u32).collect(), sorted: 0 };
        if let Some(k) = top_k.filter(|&k| k < ranked.order.len()) {
            let logits = ranked.logits;
            ranked.order.select_nth_unstable_by(k - 1, |a, b| by_logit(logits, a, b));
            ranked.order.truncate(k);
        }
        ranked
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn candidates(&self) -> &[u32] {
        &self.order
    }

    /// The `i`-th best candidate.
    fn get(&mut self, i: usize) -> Option<u32> {
        if i >= self.order.len() {
            return None;
        }
        if i >= self.sorted {
            let logits = self.logits;
            let upto = (self.sorted.max(16) * 8).max(i + 1).min(self.order.len());
            let rest = &mut self.order[self.sorted..];
            let nth = upto - self.sorted - 1;
            if nth + 1 < rest.len() {
                rest.select_nth_unstable_by(nth, |a, b| by_logit(logits, a, b));
            }
            rest[..=nth].sort_unstable_by(|a, b| by_logit(logits, a, b));
            self.sorted = upto;
        }
        Some(self.order[i])
    }
}

fn by_logit(logits: &[f32], a: &u32, b: &u32) -> std::cmp::Ordering {
    logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b))
}
