//! The llama-family forward pass for serving, over a ragged batch.
//!
//! Every sequence of a step brings its own [`SequenceCache`] and its own new tokens: one while it
//! decodes, a chunk of its prompt while it prefills. All new tokens of the step go through each
//! projection together, so the weights are read once per step however many sequences there are;
//! attention then runs per sequence against that sequence's own keys and values, so nothing is
//! padded and sequences of any length share a step.
//!
//! The same model code as [`crate::llama`] (HF half-split rotary, grouped-query attention, SwiGLU,
//! tied or separate output projection, Qwen2's q/k/v biases), written over plain `f32` slices
//! instead of candle tensors: serving never trains, and owning every loop is what makes a
//! sequence's numbers independent of its batch. Each output row of every product, norm and
//! attention is computed in one fixed order that depends only on that row
//! ([`super::kernels::WeightMatrix::matmul`] guarantees it for the products), so a sequence
//! decoded among seven others produces bit for bit the logits it produces alone, and a prompt
//! prefilled in chunks, or continued from a cached prefix, gives the same keys and values as one
//! prefilled at once.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::kernels::{KernelError, WeightFormat, WeightMatrix};
use crate::config::ModelConfig;
use crate::llama::{Llama, LlamaError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("reading the weights of `{name}`: {source}")]
    Weights {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("the model has no tensor `{0}`")]
    MissingTensor(String),
    #[error("preparing `{name}` for serving: {source}")]
    Kernel {
        name: String,
        #[source]
        source: KernelError,
    },
    #[error("merging the LoRA adapters: {0}")]
    Merge(#[source] LlamaError),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfVocabulary { id: u32, vocab: usize },
    #[error("a chunk has no tokens")]
    EmptyChunk,
}

/// Keys and values of one sequence, for every layer and every token fed so far.
#[derive(Debug, Clone)]
pub struct SequenceCache {
    /// The tokens whose keys and values are cached, in order.
    tokens: Vec<u32>,
    /// Per layer, `[tokens, kv_heads · head_dim]` row-major.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Floats per token per layer (`kv_heads · head_dim`).
    width: usize,
}

impl SequenceCache {
    fn new(layers: usize, width: usize) -> Self {
        Self { tokens: Vec::new(), keys: vec![Vec::new(); layers], values: vec![Vec::new(); layers], width }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Keeps the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        self.tokens.truncate(len);
        for layer in self.keys.iter_mut().chain(&mut self.values) {
            layer.truncate(len * self.width);
        }
    }

    /// A new cache holding a copy of the first `len` tokens.
    pub fn prefix(&self, len: usize) -> Self {
        let len = len.min(self.len());
        let copy = |layers: &[Vec<f32>]| layers.iter().map(|l| l[..len * self.width].to_vec()).collect();
        Self {
            tokens: self.tokens[..len].to_vec(),
            keys: copy(&self.keys),
            values: copy(&self.values),
            width: self.width,
        }
    }

    /// Memory the cached keys and values take.
    pub fn bytes(&self) -> usize {
        2 * self.keys.len() * self.len() * self.width * std::mem::size_of::<f32>()
    }
}

/// One sequence's part of a step: new tokens that continue `cache`, which the step extends.
pub struct Chunk<'a> {
    pub cache: &'a mut SequenceCache,
    pub tokens: &'a [u32],
    /// Whether to compute the logits after the chunk's last token (a prefill chunk that is not
    /// the prompt's last needs none).
    pub logits: bool,
}

struct Layer {
    input_norm: Vec<f32>,
    /// q, k and v projections stacked along the rows: one product for the three.
    qkv: WeightMatrix,
    qkv_bias: Option<Vec<f32>>,
    o: WeightMatrix,
    post_norm: Vec<f32>,
    /// gate and up projections stacked along the rows.
    gate_up: WeightMatrix,
    down: WeightMatrix,
}

/// A llama-family model prepared for serving: projections in a [`WeightFormat`], everything
/// else (embeddings, norms) in f32.
pub struct ServingModel {
    config: ModelConfig,
    format: WeightFormat,
    embeddings: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: WeightMatrix,
    inv_freq: Vec<f64>,
}

impl std::fmt::Debug for ServingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingModel")
            .field("format", &self.format)
            .field("weight_bytes", &self.weight_bytes())
            .finish_non_exhaustive()
    }
}

impl ServingModel {
    /// Copies `model`'s weights into the serving layout; LoRA adapters are merged first.
    pub fn from_llama(model: &Llama, format: WeightFormat) -> Result<Self, EngineError> {
        let merged;
        let model = if model.has_lora() {
            let mut copy = model.detached();
            copy.merge_lora().map_err(EngineError::Merge)?;
            merged = copy;
            &merged
        } else {
            model
        };
        let mut tensors: std::collections::HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
        let mut take = |name: &str| -> Result<(Vec<usize>, Vec<f32>), EngineError> {
            let tensor = tensors.remove(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
            let read = || -> candle_core::Result<Vec<f32>> { tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
            let values = read().map_err(|source| EngineError::Weights { name: name.to_string(), source })?;
            Ok((tensor.dims().to_vec(), values))
        };
        let matrix = |name: &str, (dims, values): (Vec<usize>, Vec<f32>)| {
            WeightMatrix::from_f32(dims[0], dims[1], &values, format)
                .map_err(|source| EngineError::Kernel { name: name.to_string(), source })
        };
        let stack = |name: &str, parts: Vec<WeightMatrix>| {
            WeightMatrix::stack(&parts).map_err(|source| EngineError::Kernel { name: name.to_string(), source })
        };

        let config = model.config().clone();
        let (_, embeddings) = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut projection = |module: &str| -> Result<WeightMatrix, EngineError> {
                let name = format!("{p}.{module}.weight");
                let weight = take(&name)?;
                matrix(&name, weight)
            };
            let q = projection("self_attn.q_proj")?;
            let k = projection("self_attn.k_proj")?;
            let v = projection("self_attn.v_proj")?;
            let o = projection("self_attn.o_proj")?;
            let gate = projection("mlp.gate_proj")?;
            let up = projection("mlp.up_proj")?;
            let down = projection("mlp.down_proj")?;
            let qkv_bias = if config.attention_bias {
                let mut bias = Vec::new();
                for module in ["q_proj", "k_proj", "v_proj"] {
                    bias.extend(take(&format!("{p}.self_attn.{module}.bias"))?.1);
                }
                Some(bias)
            } else {
                None
            };
            layers.push(Layer {
                input_norm: take(&format!("{p}.input_layernorm.weight"))?.1,
                qkv: stack(&format!("{p}.self_attn.qkv"), vec![q, k, v])?,
                qkv_bias,
                o,
                post_norm: take(&format!("{p}.post_attention_layernorm.weight"))?.1,
                gate_up: stack(&format!("{p}.mlp.gate_up"), vec![gate, up])?,
                down,
            });
        }
        let norm = take("model.norm.weight")?.1;
        let lm_head = if config.tie_word_embeddings {
            matrix("model.embed_tokens.weight", (vec![config.vocab_size, config.hidden_size], embeddings.clone()))?
        } else {
            let head = take("lm_head.weight")?;
            matrix("lm_head.weight", head)?
        };
        let d = config.head_dim;
        let inv_freq = (0..d / 2).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        Ok(Self { config, format, embeddings, layers, norm, lm_head, inv_freq })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes of weights one decode step reads (projections and the output projection).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        layers + self.lm_head.bytes()
    }

    /// Bytes of keys and values one cached token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.num_hidden_layers * self.kv_width() * std::mem::size_of::<f32>()
    }

    fn kv_width(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(self.config.num_hidden_layers, self.kv_width())
    }

    /// Runs one step over `chunks` and returns, for each chunk that asked, the logits after its
    /// last token. Each cache is extended by its chunk's tokens.
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> Result<Vec<Option<Vec<f32>>>, EngineError> {
        let c = &self.config;
        let (hidden, heads, kv_heads, d) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_width, kv_width) = (heads * d, kv_heads * d);
        for chunk in chunks.iter() {
            if chunk.tokens.is_empty() {
                return Err(EngineError::EmptyChunk);
            }
            if let Some(&id) = chunk.tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(EngineError::TokenOutOfVocabulary { id, vocab: c.vocab_size });
            }
        }
        // Where each chunk's rows start among the step's rows, and each row's position.
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut positions = Vec::new();
        for chunk in chunks.iter() {
            starts.push(positions.len());
            positions.extend((0..chunk.tokens.len()).map(|i| chunk.cache.len() + i));
        }
        starts.push(positions.len());
        let rows = positions.len();
        let (cos, sin) = self.angles(&positions);

        let mut x = Vec::with_capacity(rows * hidden);
        for chunk in chunks.iter() {
            for &id in chunk.tokens {
                x.extend_from_slice(&self.embeddings[id as usize * hidden..(id as usize + 1) * hidden]);
            }
        }
        let mut normed = vec![0f32; rows * hidden];
        let mut qkv = vec![0f32; rows * (q_width + 2 * kv_width)];
        let mut attended = vec![0f32; rows * q_width];
        let mut projected = vec![0f32; rows * hidden];
        let mut gate_up = vec![0f32; rows * 2 * c.intermediate_size];
        let mut activated = vec![0f32; rows * c.intermediate_size];
        let eps = c.rms_norm_eps as f32;

        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.input_norm, eps, &mut normed);
            layer.qkv.matmul(&normed, &mut qkv);
            let qkv_row = q_width + 2 * kv_width;
            for (row, values) in qkv.chunks_exact_mut(qkv_row).enumerate() {
                if let Some(bias) = &layer.qkv_bias {
                    values.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
                let (cos, sin) = (&cos[row * d / 2..(row + 1) * d / 2], &sin[row * d / 2..(row + 1) * d / 2]);
                for head in values[..q_width + kv_width].chunks_exact_mut(d) {
                    rotate_half_split(head, cos, sin);
                }
            }
            for (i, chunk) in chunks.iter_mut().enumerate() {
                let cache = &mut *chunk.cache;
                for row in starts[i]..starts[i + 1] {
                    let values = &qkv[row * qkv_row..(row + 1) * qkv_row];
                    cache.keys[l].extend_from_slice(&values[q_width..q_width + kv_width]);
                    cache.values[l].extend_from_slice(&values[q_width + kv_width..]);
                }
            }
            self.attend(l, chunks, &starts, &positions, &qkv, &mut attended);
            layer.o.matmul(&attended, &mut projected);
            x.iter_mut().zip(&projected).for_each(|(x, p)| *x += p);

            rms_norm_rows(&x, &layer.post_norm, eps, &mut normed);
            layer.gate_up.matmul(&normed, &mut gate_up);
            let inter = c.intermediate_size;
            for (out, both) in activated.chunks_exact_mut(inter).zip(gate_up.chunks_exact(2 * inter)) {
                let (gate, up) = both.split_at(inter);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
            layer.down.matmul(&activated, &mut projected);
            x.iter_mut().zip(&projected).for_each(|(x, p)| *x += p);
        }
        for chunk in chunks.iter_mut() {
            chunk.cache.tokens.extend_from_slice(chunk.tokens);
        }

        // The output projection only for the last row of the chunks that want logits.
        let wanted: Vec<usize> = chunks.iter().enumerate().filter(|(_, c)| c.logits).map(|(i, _)| i).collect();
        let mut last = Vec::with_capacity(wanted.len() * hidden);
        for &i in &wanted {
            let row = starts[i + 1] - 1;
            last.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let mut last_normed = vec![0f32; last.len()];
        rms_norm_rows(&last, &self.norm, eps, &mut last_normed);
        let vocab = c.vocab_size;
        let mut logits = vec![0f32; wanted.len() * vocab];
        self.lm_head.matmul(&last_normed, &mut logits);
        let mut out: Vec<Option<Vec<f32>>> = (0..chunks.len()).map(|_| None).collect();
        for (k, &i) in wanted.iter().enumerate() {
            out[i] = Some(logits[k * vocab..(k + 1) * vocab].to_vec());
        }
        Ok(out)
    }

    /// `cos, sin` of every row's position, `[rows, head_dim / 2]`, computed as
    /// [`crate::llama`]'s rotary computes them.
    fn angles(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Causal attention of every row's query heads over its own sequence's cached keys and
    /// values (which already include the step's tokens), into `out: [rows, heads · head_dim]`.
    fn attend(
        &self,
        layer: usize,
        chunks: &[Chunk<'_>],
        starts: &[usize],
        positions: &[usize],
        qkv: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_width, kv_width) = (heads * d, kv_heads * d);
        let qkv_row = q_width + 2 * kv_width;
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        // Which chunk each row belongs to.
        let mut owner = Vec::with_capacity(positions.len());
        for i in 0..chunks.len() {
            owner.extend(std::iter::repeat_n(i, starts[i + 1] - starts[i]));
        }
        let work: usize = positions.iter().map(|p| (p + 1) * q_width).sum();
        let row = |(r, out): (usize, &mut [f32])| {
            let cache = &*chunks[owner[r]].cache;
            let (keys, values) = (&cache.keys[layer], &cache.values[layer]);
            // Row r sees its own position and every earlier one.
            let seen = positions[r] + 1;
            let mut scores = vec![0f32; seen];
            for h in 0..heads {
                let kv = h / group;
                let q = &qkv[r * qkv_row + h * d..r * qkv_row + (h + 1) * d];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &keys[j * kv_width + kv * d..j * kv_width + (kv + 1) * d];
                    *s = dot(q, k) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let o = &mut out[h * d..(h + 1) * d];
                o.fill(0.0);
                for (j, &s) in scores.iter().enumerate() {
                    let p = s * inv;
                    let v = &values[j * kv_width + kv * d..j * kv_width + (kv + 1) * d];
                    o.iter_mut().zip(v).for_each(|(o, &v)| *o += p * v);
                }
            }
        };
        // Rows are independent and each is computed the same way on any thread.
        if work >= 1 << 16 {
            out.par_chunks_mut(q_width).enumerate().for_each(row);
        } else {
            out.chunks_mut(q_width).enumerate().for_each(row);
        }
    }
}

/// Dot product in eight interleaved partial sums (a fixed order the compiler vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// RMSNorm of every row of `x` into `out`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * r * w;
        }
    }
}

/// Half-split rotary of one head in place: dimension `i` pairs with `i + d/2`.
fn rotate_half_split(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (x1, x2) = head.split_at_mut(half);
    for j in 0..half {
        let (a, b) = (x1[j], x2[j]);
        x1[j] = a * cos[j] - b * sin[j];
        x2[j] = b * cos[j] + a * sin[j];
    }
}
