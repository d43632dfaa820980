//! A llama-family decoder (Llama/SmolLM2, Qwen2) that autograd reaches end to end.
//!
//! Every op here has a backward pass. RMSNorm, rotary, attention softmax, SwiGLU and projections
//! through frozen weights use the fused kernels of [`crate::ops`] on the CPU (candle's own fused
//! kernels return tensors detached from the graph). The forward pass returns logits for all positions, and the KV cache
//! lives outside the model, so the same module serves training and generation.
//!
//! Rotary layout: one layout everywhere, the HF "half-split" one (dimension `i` pairs with
//! `i + head_dim/2`). GGUF files of llama architecture store Q/K rows permuted for llama.cpp's
//! interleaved rotary; `load` un-permutes them and `save` permutes them back, so weights in
//! memory always have HF layout and HF names (`model.layers.N.self_attn.q_proj.weight`, ...).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Embedding, Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use crate::attention::{causal_attention, composed_attention, CausalMask};
use crate::config::ModelConfig;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("invalid model config: {0}")]
    Config(#[from] crate::config::ConfigError),
}

pub type Result<T> = std::result::Result<T, LlamaError>;

/// Standard deviation of freshly initialised weights (HF `initializer_range`).
const INIT_STD: f64 = 0.02;

/// A projection `y = x Wᵀ + b`, optionally with a LoRA adapter: `y = x Wᵀ + b + s·B(A(drop(x)))`.
/// Every projection of the model goes through this type, so the adapter lives in one place.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    lora: Option<LoraAdapter>,
}

/// The projections a LoRA adapter may target, by their HF module names.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// LoRA hyperparameters: rank `r`, scale `alpha / r`, dropout on the adapter's input (training
/// only), and the target modules by name (a subset of [`LORA_TARGETS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<String>,
    /// Seeds the initialisation of every `A` matrix.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, targets: LORA_TARGETS.map(String::from).to_vec(), seed: 0 }
    }
}

/// State shared by all adapters of one model: whether dropout is active, and the seed of the
/// current micro-step's dropout masks (set by the trainer, so masks are reproducible on resume).
#[derive(Debug, Default)]
pub struct LoraState {
    training: AtomicBool,
    step_seed: AtomicU64,
}

impl LoraState {
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::SeqCst);
    }

    pub fn training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }

    pub fn set_step_seed(&self, seed: u64) {
        self.step_seed.store(seed, Ordering::SeqCst);
    }
}

/// One adapter: `a: [r, in]` (small random), `b: [out, r]` (zeros, so a fresh adapter changes
/// nothing), scale `alpha / r`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    dropout: f32,
    id: u64,
    state: Arc<LoraState>,
}

impl LoraAdapter {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.dropout > 0.0 && self.state.training() { self.drop(x)? } else { x.clone() };
        let h = candle_nn::Linear::new(self.a.clone(), None).forward(&x)?;
        let h = candle_nn::Linear::new(self.b.clone(), None).forward(&h)?;
        Ok((h * self.scale)?)
    }

    /// Inverted dropout with a mask drawn from (step seed, adapter id): deterministic.
    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        let seed = self.state.step_seed.load(Ordering::SeqCst) ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let p = self.dropout;
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.gen::<f32>() < p { 0.0 } else { keep }).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }

    fn detached(&self) -> Self {
        Self { a: self.a.detach(), b: self.b.detach(), ..self.clone() }
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias), lora: None }
    }

    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let init = Init::Randn { mean: 0.0, stdev: INIT_STD };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self::new(weight, bias))
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A frozen weight gets no gradient: `frozen_matmul` skips the weight's half of the
        // backward pass that candle's matmul would compute and throw away.
        let y = crate::ops::frozen_matmul(x, self.weight())?;
        let y = match self.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(match &self.lora {
            None => y,
            Some(lora) => (y + lora.forward(x)?)?,
        })
    }

    fn detached(&self) -> Self {
        Self {
            inner: candle_nn::Linear::new(self.weight().detach(), self.bias().map(Tensor::detach)),
            lora: self.lora.as_ref().map(LoraAdapter::detached),
        }
    }

    /// Folds the adapter into the weight: `W + s·B·A`; the result has no adapter.
    fn merge(&mut self) -> Result<()> {
        if let Some(lora) = self.lora.take() {
            let delta = (lora.b.matmul(&lora.a)? * lora.scale)?;
            let weight = (self.weight().detach() + delta.detach())?;
            self.inner = candle_nn::Linear::new(weight, self.bias().map(Tensor::detach));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps: eps as f32 })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Rotary embedding angles, computed for exactly the positions a forward pass needs: positions
/// differ per row once batches are left-padded, and computing them on demand has no length limit.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Vec<f64>,
}

impl Rotary {
    fn new(config: &ModelConfig) -> Self {
        let d = config.head_dim;
        let inv_freq = (0..d / 2).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        Self { inv_freq }
    }

    /// `cos, sin` of shape `[rows, 1, T, head_dim/2]` for `positions` given row by row.
    fn angles(&self, positions: &[Vec<usize>], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let rows = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(rows * t * half);
        let mut sin = Vec::with_capacity(rows * t * half);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    let angle = p as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (rows, 1, t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (rows, 1, t, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: &VarBuilder, config: &ModelConfig) -> Result<Self> {
        let (h, kv, d) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim);
        let bias = config.attention_bias;
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), config.hidden_size, h * d, bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), config.hidden_size, kv * d, bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), config.hidden_size, kv * d, bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), h * d, config.hidden_size, false)?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend<'_>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((b, t, h, d))?.transpose(1, 2)?;
        let k = self.k_proj.forward(x)?.reshape((b, t, kv, d))?.transpose(1, 2)?;
        let v = self.v_proj.forward(x)?.reshape((b, t, kv, d))?.transpose(1, 2)?.contiguous()?;
        let q = crate::ops::rotary(&q, cos, sin)?;
        let k = crate::ops::rotary(&k, cos, sin)?;

        let out = match attend {
            Attend::Fused(mask) => causal_attention(&q, &k, &v, mask)?,
            Attend::Composed(bias) => {
                let (k, v) = match cache {
                    None => (k, v),
                    Some(cache) => cache.append(k, v)?,
                };
                composed_attention(&q, &k, &v, bias)?
            }
        };
        self.o_proj.forward(&out.transpose(1, 2)?.reshape((b, t, h * d))?)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn load(vb: &VarBuilder, config: &ModelConfig) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, inter, false)?,
            up_proj: Linear::load(&vb.pp("up_proj"), hidden, inter, false)?,
            down_proj: Linear::load(&vb.pp("down_proj"), inter, hidden, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&crate::ops::swiglu(&gate, &up)?)
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn load(vb: &VarBuilder, config: &ModelConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), config.hidden_size, config.rms_norm_eps)?,
            self_attn: Attention::load(&vb.pp("self_attn"), config)?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            )?,
            mlp: Mlp::load(&vb.pp("mlp"), config)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend<'_>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, attend, cache)?;
        let x = (x + attn)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }
}

/// Keys and values of one layer for every position seen so far: `[B, kv_heads, S, head_dim]`.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        // Cached keys and values are values only: kept attached, each step's K/V would hold that
        // step's whole autograd graph alive, and memory would grow by megabytes per token.
        let (k, v) = (k.detach(), v.detach());
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((past_k, past_v)) => (Tensor::cat(&[&past_k, &k], 2)?, Tensor::cat(&[&past_v, &v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// The KV cache of one batch of sequences, kept outside the model so that training calls the
/// model without one. Besides keys and values it remembers, per row, which cached slots hold
/// real tokens (padding never becomes a key anyone attends to) and the position of the row's
/// next real token. It holds detached values: no gradient flows into cached positions.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    valid: Vec<Vec<bool>>,
    next_position: Vec<usize>,
}

impl KvCache {
    pub fn new(config: &ModelConfig, batch_size: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); config.num_hidden_layers],
            valid: vec![Vec::new(); batch_size],
            next_position: vec![0; batch_size],
        }
    }

    pub fn batch_size(&self) -> usize {
        self.valid.len()
    }

    /// Cached slots per row, padding included.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real (non-padding) tokens cached for each row.
    pub fn positions(&self) -> &[usize] {
        &self.next_position
    }

    /// Keeps the first `len` cached slots of every row, dropping the rest (a shared prefix is
    /// reused, what followed it is not).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.kv.take() {
                layer.kv = Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?));
            }
        }
        for (valid, next) in self.valid.iter_mut().zip(&mut self.next_position) {
            valid.truncate(len);
            *next = valid.iter().filter(|&&v| v).count();
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    rotary: Rotary,
    config: ModelConfig,
    attention: AttentionKernel,
}

/// How training forwards compute causal attention. Forwards with a KV cache or padding masks
/// always compose it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// [`crate::attention`]'s kernel on the CPU in f32 (no `[B, H, T, T]` tensors); composed
    /// elsewhere.
    #[default]
    Fused,
    /// candle ops: `q kᵀ`, bias, softmax, `p v`. The reference the fused kernel is tested against.
    Composed,
}

impl AttentionKernel {
    pub const ALL: [AttentionKernel; 2] = [AttentionKernel::Fused, AttentionKernel::Composed];

    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::Fused => "fused",
            AttentionKernel::Composed => "composed",
        }
    }
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kernel| kernel.name() == s)
            .ok_or_else(|| format!("unknown attention kernel `{s}` (expected `fused` or `composed`)"))
    }
}

/// What the queries of one forward attend to.
#[derive(Clone, Copy)]
enum Attend<'a> {
    /// candle ops with an additive bias `[rows or 1, 1, T, S]`; none where every cached key is
    /// visible (one new token).
    Composed(Option<&'a Tensor>),
    /// Causal, within segments, over this forward's own tokens (no cache): the fused kernel.
    Fused(&'a CausalMask),
}

impl Llama {
    /// Builds the model from `vb`, whose tensors carry HF names. Through
    /// `VarBuilder::from_varmap` missing tensors are created (randomly initialised) as trainable
    /// variables; loaders fill the `VarMap` first so nothing is created.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        config.validate("model config")?;
        let embed_init = Init::Randn { mean: 0.0, stdev: INIT_STD };
        let embed_weight = vb.pp("model.embed_tokens").get_with_hints(
            (config.vocab_size, config.hidden_size),
            "weight",
            embed_init,
        )?;
        let embed_tokens = Embedding::new(embed_weight, config.hidden_size);
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&vb.pp(format!("model.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&vb.pp("model.norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(&vb.pp("lm_head"), config.hidden_size, config.vocab_size, false)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config),
            config: config.clone(),
            attention: AttentionKernel::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The projections of every layer by HF module path (`model.layers.N.self_attn.q_proj`).
    fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut layer.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut layer.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// Adds a LoRA adapter to every targeted projection. The adapters' `A` and `B` are created
    /// as `Var`s in `varmap` (names `<module>.lora_A.weight`, `<module>.lora_B.weight`); the base
    /// weights are not touched — call this on [`Llama::detached`] to freeze them. `A` is drawn
    /// uniformly in ±1/√in (PEFT's kaiming-uniform bound) from `config.seed`, `B` is zero.
    pub fn add_lora(&mut self, config: &LoraConfig, varmap: &VarMap) -> Result<Arc<LoraState>> {
        if config.rank == 0 {
            return Err(LlamaError::Input("LoRA rank must be at least 1".into()));
        }
        for target in &config.targets {
            if !LORA_TARGETS.contains(&target.as_str()) {
                return Err(LlamaError::Input(format!("unknown LoRA target `{target}` (known: {LORA_TARGETS:?})")));
            }
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(LlamaError::Input(format!("LoRA dropout {} outside [0, 1)", config.dropout)));
        }
        let state = Arc::new(LoraState::default());
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        let r = config.rank;
        let scale = config.alpha / r as f64;
        let mut data = varmap.data().lock().expect("varmap lock");
        for (id, (name, linear)) in self.projections_mut().into_iter().enumerate() {
            let module = name.rsplit('.').next().unwrap_or_default();
            if !config.targets.iter().any(|t| t == module) {
                continue;
            }
            let (out_dim, in_dim) = linear.weight().dims2()?;
            let device = linear.weight().device().clone();
            let dtype = linear.weight().dtype();
            let bound = 1.0 / (in_dim as f32).sqrt();
            let a: Vec<f32> = (0..r * in_dim).map(|_| rng.gen_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), &device)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out_dim, r), dtype, &device)?)?;
            data.insert(format!("{name}.lora_A.weight"), a.clone());
            data.insert(format!("{name}.lora_B.weight"), b.clone());
            linear.lora = Some(LoraAdapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale,
                dropout: config.dropout,
                id: id as u64,
                state: state.clone(),
            });
        }
        Ok(state)
    }

    /// Whether any projection carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.layers.iter().any(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .any(|p| p.lora.is_some())
        })
    }

    /// Folds every adapter into its base weight (`W + s·B·A`) and removes the adapters: the
    /// result is a plain model for export. The merged weights are values, outside autograd.
    pub fn merge_lora(&mut self) -> Result<()> {
        for (_, linear) in self.projections_mut() {
            linear.merge()?;
        }
        Ok(())
    }

    /// The same model on the same weight storage, outside the autograd graph: forward passes
    /// record no backward ops and free their intermediates at once. For inference; it follows
    /// in-place updates of the variables (an optimizer step), so it can evaluate during training.
    pub fn detached(&self) -> Self {
        let linear = |l: &Linear| l.detached();
        let norm = |n: &RmsNorm| RmsNorm { weight: n.weight.detach(), eps: n.eps };
        let layers = self
            .layers
            .iter()
            .map(|layer| DecoderLayer {
                input_layernorm: norm(&layer.input_layernorm),
                self_attn: Attention {
                    q_proj: linear(&layer.self_attn.q_proj),
                    k_proj: linear(&layer.self_attn.k_proj),
                    v_proj: linear(&layer.self_attn.v_proj),
                    o_proj: linear(&layer.self_attn.o_proj),
                    ..layer.self_attn.clone()
                },
                post_attention_layernorm: norm(&layer.post_attention_layernorm),
                mlp: Mlp {
                    gate_proj: linear(&layer.mlp.gate_proj),
                    up_proj: linear(&layer.mlp.up_proj),
                    down_proj: linear(&layer.mlp.down_proj),
                },
            })
            .collect();
        Self {
            embed_tokens: Embedding::new(self.embed_tokens.embeddings().detach(), self.config.hidden_size),
            layers,
            norm: norm(&self.norm),
            lm_head: self.lm_head.as_ref().map(linear),
            rotary: self.rotary.clone(),
            config: self.config.clone(),
            attention: self.attention,
        }
    }

    /// Chooses how training forwards compute causal attention (the fused kernel by default).
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.attention = kernel;
    }

    /// Whether a forward of `dtype` on `device` without cache runs the fused attention kernel.
    fn fused_attention(&self, dtype: DType, device: &Device) -> bool {
        self.attention == AttentionKernel::Fused && device.is_cpu() && dtype == DType::F32
    }

    /// Names and shapes of every parameter, in HF naming, in a stable order; the tied output
    /// projection is not a parameter of its own.
    pub fn parameter_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let q_out = config.num_attention_heads * config.head_dim;
        let kv_out = config.num_key_value_heads * config.head_dim;
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, hidden])];
        let linear =
            |shapes: &mut Vec<(String, Vec<usize>)>, name: String, out_dim: usize, in_dim: usize, bias: bool| {
                shapes.push((format!("{name}.weight"), vec![out_dim, in_dim]));
                if bias {
                    shapes.push((format!("{name}.bias"), vec![out_dim]));
                }
            };
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = config.attention_bias;
            linear(&mut shapes, format!("{p}.self_attn.q_proj"), q_out, hidden, bias);
            linear(&mut shapes, format!("{p}.self_attn.k_proj"), kv_out, hidden, bias);
            linear(&mut shapes, format!("{p}.self_attn.v_proj"), kv_out, hidden, bias);
            linear(&mut shapes, format!("{p}.self_attn.o_proj"), hidden, q_out, false);
            linear(&mut shapes, format!("{p}.mlp.gate_proj"), inter, hidden, false);
            linear(&mut shapes, format!("{p}.mlp.up_proj"), inter, hidden, false);
            linear(&mut shapes, format!("{p}.mlp.down_proj"), hidden, inter, false);
            shapes.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        }
        shapes.push(("model.norm.weight".to_string(), vec![hidden]));
        if !config.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![config.vocab_size, hidden]));
        }
        shapes
    }

    /// The tensors the model computes with, by HF name, in `parameter_shapes` order: what
    /// `save` writes.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.embeddings().clone())];
        let linear = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &layer.self_attn;
            linear(&mut out, format!("{p}.self_attn.q_proj"), &a.q_proj);
            linear(&mut out, format!("{p}.self_attn.k_proj"), &a.k_proj);
            linear(&mut out, format!("{p}.self_attn.v_proj"), &a.v_proj);
            linear(&mut out, format!("{p}.self_attn.o_proj"), &a.o_proj);
            linear(&mut out, format!("{p}.mlp.gate_proj"), &layer.mlp.gate_proj);
            linear(&mut out, format!("{p}.mlp.up_proj"), &layer.mlp.up_proj);
            linear(&mut out, format!("{p}.mlp.down_proj"), &layer.mlp.down_proj);
            out.push((format!("{p}.input_layernorm.weight"), layer.input_layernorm.weight.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), layer.post_attention_layernorm.weight.clone()));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.weight().clone()));
        }
        out
    }

    /// Logits `[B, T, vocab]` for every position of `input_ids: [B, T]`, positions `0..T`, causal
    /// attention only. The training forward: right padding needs no mask because no real token
    /// attends to a later position.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.run(input_ids, None, None, false)
    }

    /// Like `forward` for a batch whose rows are padded anywhere: `attention_mask: [B, T]`, non-zero
    /// for real tokens. Padding is never attended to and does not advance positions, so each row's
    /// logits match those of the row alone without its padding.
    pub fn forward_masked(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.run(input_ids, Some(attention_mask), None, false)
    }

    /// Forward over new tokens that continue the sequences in `cache`, which it extends.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.run(input_ids, attention_mask, Some(cache), false)
    }

    /// Like `forward_cached`, returning only the last column's logits `[B, vocab]`: what each
    /// generation step needs, without the output projection of every prompt position.
    pub fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.run(input_ids, attention_mask, Some(cache), true)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        self.run_inner(input_ids, attention_mask, cache.take(), last_only, false)
    }

    /// The final-normed hidden states `[B, T, hidden]` of the training forward (`forward` without
    /// the output projection): a trainer projects only the positions that carry loss with
    /// [`Llama::project`], saving the `[B, T, vocab]` logits.
    pub fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.run_inner(input_ids, None, None, false, true)
    }

    /// Like [`Llama::forward_hidden`] for rows that each pack several sequences sharing a prefix
    /// (see [`PackedRows`]): every slot gets its given position and attends only to what it
    /// would see in its own sequence, so its hidden state is the one that sequence alone gives.
    pub fn forward_hidden_packed(&self, input_ids: &Tensor, packed: &PackedRows) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            LlamaError::Input(format!("input_ids must be [batch, time], got shape {:?}", input_ids.dims()))
        })?;
        let well_shaped = packed.positions.len() == b
            && packed.segments.len() == b
            && packed.positions.iter().all(|row| row.len() == t)
            && packed.segments.iter().all(|row| row.len() == t);
        if !well_shaped {
            return Err(LlamaError::Input(format!(
                "packed rows must give a position and a segment for each of the {b} x {t} slots"
            )));
        }
        let dtype = self.embed_tokens.embeddings().dtype();
        let device = input_ids.device();
        let (cos, sin) = self.rotary.angles(&packed.positions, dtype, device)?;
        let mask = packed.mask();
        let bias;
        let attend = if self.fused_attention(dtype, device) {
            Attend::Fused(&mask)
        } else {
            bias = mask.bias(b, t, dtype, device)?;
            Attend::Composed(Some(&bias))
        };
        let mut x = self.embed_tokens.forward(input_ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, attend, None)?;
        }
        self.norm.forward(&x)
    }

    /// Logits of hidden states `[..., hidden]` (the output projection: `lm_head` or the tied
    /// embeddings).
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => Linear::new(self.embed_tokens.embeddings().clone(), None).forward(hidden)?,
        })
    }

    fn run_inner(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        last_only: bool,
        hidden_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            LlamaError::Input(format!("input_ids must be [batch, time], got shape {:?}", input_ids.dims()))
        })?;
        if t == 0 {
            return Err(LlamaError::Input("input_ids has no positions".into()));
        }
        if input_ids.dtype().is_float() {
            return Err(LlamaError::Input(format!("input_ids must be integer ids, got {:?}", input_ids.dtype())));
        }
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(LlamaError::Input(format!(
                "token id {bad} outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        // Which of the new slots hold real tokens, row by row.
        let new_valid: Vec<Vec<bool>> = match attention_mask {
            None => vec![vec![true; t]; b],
            Some(mask) => {
                if mask.dims() != [b, t] {
                    return Err(LlamaError::Input(format!(
                        "attention_mask shape {:?} differs from input_ids shape {:?}",
                        mask.dims(),
                        [b, t]
                    )));
                }
                let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                rows.into_iter().map(|r| r.into_iter().map(|m| m != 0.0).collect()).collect()
            }
        };
        let (mut valid, past_positions) = match cache.as_deref() {
            Some(c) if c.batch_size() != b => {
                return Err(LlamaError::Input(format!("cache holds {} rows, input_ids has {b}", c.batch_size())));
            }
            Some(c) => (c.valid.clone(), c.next_position.clone()),
            None => (vec![Vec::new(); b], vec![0; b]),
        };
        let past = valid.first().map_or(0, Vec::len);
        for (row, v) in valid.iter_mut().enumerate() {
            v.extend_from_slice(&new_valid[row]);
        }

        // Positions count real tokens only; a padding slot takes its row's current count, which
        // does not matter since nothing attends to it.
        let mut positions = Vec::with_capacity(b);
        let mut next_positions = Vec::with_capacity(b);
        for (row, row_valid) in new_valid.iter().enumerate() {
            let mut p = past_positions[row];
            let mut row_positions = Vec::with_capacity(t);
            for &real in row_valid {
                row_positions.push(p);
                p += usize::from(real);
            }
            positions.push(row_positions);
            next_positions.push(p);
        }
        let dtype = self.embed_tokens.embeddings().dtype();
        let device = input_ids.device();
        let same_positions = positions.iter().all(|p| p == &positions[0]);
        let (cos, sin) =
            self.rotary.angles(if same_positions { &positions[..1] } else { &positions }, dtype, device)?;

        // Without padding one causal mask serves every row, and a single new token needs none.
        // Without a cache either, the fused kernel needs no mask tensor at all.
        let any_padding = valid.iter().flatten().any(|real| !real);
        let fused = !any_padding && t > 1 && cache.is_none() && self.fused_attention(dtype, device);
        let causal = CausalMask::causal();
        let bias = if any_padding {
            Some(attention_bias(&valid, past, t, dtype, device)?)
        } else if t > 1 && !fused {
            Some(attention_bias(&valid[..1], past, t, dtype, device)?)
        } else {
            None
        };
        let attend = if fused { Attend::Fused(&causal) } else { Attend::Composed(bias.as_ref()) };

        let mut x = self.embed_tokens.forward(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &cos, &sin, attend, layer_cache)?;
        }
        let x = self.norm.forward(&x)?;
        let x = if last_only { x.narrow(1, t - 1, 1)?.squeeze(1)? } else { x };
        let logits = if hidden_only { x } else { self.project(&x)? };

        if let Some(c) = cache {
            c.valid = valid;
            c.next_position = next_positions;
        }
        Ok(logits)
    }
}

/// The layout of packed rows: per row and slot, the slot's position in its own sequence and its
/// segment. Segment 0 is the prefix shared by the row's sequences; each other segment continues
/// that prefix as one sequence, so a slot attends to earlier slots of its own segment and of
/// segment 0. [`PackedRows::PADDING`] marks padding, which nothing attends to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PackedRows {
    pub positions: Vec<Vec<usize>>,
    pub segments: Vec<Vec<u32>>,
}

impl PackedRows {
    pub const PADDING: u32 = u32::MAX;

    fn mask(&self) -> CausalMask {
        CausalMask::segmented(self.segments.concat())
    }
}

/// Additive attention bias `[rows, 1, T, past + T]`: 0 where a query may attend, -inf elsewhere.
/// Query `t` sits at slot `past + t`; it sees earlier-or-same slots that hold real tokens, and
/// always itself, so a padding query never has an all-masked row (whose softmax would be NaN
/// and, through `0 * NaN`, poison the real rows too).
fn attention_bias(valid: &[Vec<bool>], past: usize, t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let mut bias = Vec::with_capacity(valid.len() * t * s);
    for row in valid {
        for q in 0..t {
            let q_slot = past + q;
            bias.extend((0..s).map(|k| if k == q_slot || (k < q_slot && row[k]) { 0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Ok(Tensor::from_vec(bias, (valid.len(), 1, t, s), device)?.to_dtype(dtype)?)
}
