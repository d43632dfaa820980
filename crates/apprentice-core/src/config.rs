//! `apprentice.toml`: functions, variants, models with providers, tools and metrics.
//!
//! Loading is two passes. The first deserializes the TOML into plain structs (unknown keys and
//! wrong types are errors with their key path and line). The second resolves references between
//! sections, reads schema and template files, and compiles templates and schemas, so that a
//! gateway that started is a gateway whose configuration is consistent.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::record::{MetricLevel, ToolDefinition};
use crate::templates::Templates;

/// What is wrong with a configuration, and where.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the error comes from the TOML text itself.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `functions.act.variants.teacher.model`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self { bind: default_bind() }
    }
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3000))
}

/// When the gateway acknowledges an inference to the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// After the record is committed and synced to disk (group commit).
    #[default]
    Durable,
    /// After the record is in a bounded in-memory queue, flushed on SIGTERM/SIGINT.
    Async,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file; relative paths are relative to the config file.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    #[serde(default)]
    pub write_mode: WriteMode,
    /// Capacity of the write queue; a full queue slows callers down rather than dropping records.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { path: default_store_path(), write_mode: WriteMode::Durable, queue_capacity: default_queue_capacity() }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("apprentice.db")
}
fn default_queue_capacity() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DummyBehavior {
    /// Replies with the text of the last user message.
    #[default]
    Echo,
    /// Replies with `content`.
    Fixed,
    /// Calls the first tool offered, with `content` (or `{}`) as arguments.
    ToolCall,
    /// Replies with `content` or `{}` as JSON.
    Json,
    /// Always fails, to exercise fallback.
    Error,
}

/// How a local model's projection weights are stored for serving (apprentice-model's kernels
/// implement each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum WeightFormat {
    /// Blocks of 32 weights as 8-bit integers with one f32 scale (llama.cpp's q8_0 layout).
    #[default]
    #[serde(rename = "q8_0", alias = "q8")]
    Q8_0,
    #[serde(rename = "f32")]
    F32,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F32 => "f32",
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(WeightFormat::Q8_0),
            "f32" => Ok(WeightFormat::F32),
            other => Err(format!("unknown weight format `{other}` (expected q8_0 or f32)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Any OpenAI-compatible chat completions API (OpenAI, vLLM, Ollama, llama.cpp server, Together, Fireworks).
    Openai {
        model_name: String,
        #[serde(default = "default_openai_base")]
        api_base: String,
        /// Name of the environment variable holding the API key; none for keyless local servers.
        #[serde(default)]
        api_key_env: Option<String>,
        #[serde(default = "default_timeout_s")]
        timeout_s: f64,
    },
    /// Anthropic messages API.
    Anthropic {
        model_name: String,
        #[serde(default = "default_anthropic_base")]
        api_base: String,
        #[serde(default = "default_anthropic_key_env")]
        api_key_env: String,
        #[serde(default = "default_timeout_s")]
        timeout_s: f64,
    },
    /// A model run in the gateway's own process (candle, CPU): a student checkpoint or a base
    /// model. Name it `local::NAME` under [models] by convention.
    Local {
        /// A cached model name (`apprentice model fetch NAME`), a GGUF file or an HF model folder
        /// (config.json, tokenizer.json, *.safetensors). Relative paths are relative to the config file.
        model: String,
        /// Prompt plus generated tokens at most; default: the model's own context length.
        #[serde(default)]
        max_context_tokens: Option<usize>,
        /// CPU threads for this model's generation; default: rayon's (one per core).
        #[serde(default)]
        threads: Option<usize>,
        /// How the projections are stored for serving: `q8_0` (default: 1.125 bytes a weight,
        /// the fastest measured, README `bench serve`) or `f32`.
        #[serde(default)]
        weights: WeightFormat,
        /// Sequences decoded together at most; further requests queue (default 8).
        #[serde(default)]
        max_batch: Option<usize>,
        /// Prompt tokens fed per decode step, shared by newcomers' prefills (default 128).
        #[serde(default)]
        prefill_chunk_tokens: Option<usize>,
        /// Memory for the keys and values kept for episodes' next turns, in MiB (default 256; 0
        /// keeps none).
        #[serde(default)]
        prefix_cache_mb: Option<usize>,
    },
    /// Deterministic, offline: for tests and demos.
    Dummy {
        #[serde(default)]
        behavior: DummyBehavior,
        #[serde(default)]
        content: Option<String>,
    },
}

fn default_openai_base() -> String {
    "https://api.openai.com/v1".into()
}
fn default_anthropic_base() -> String {
    "https://api.anthropic.com/v1".into()
}
fn default_anthropic_key_env() -> String {
    "ANTHROPIC_API_KEY".into()
}
fn default_timeout_s() -> f64 {
    120.0
}

/// What a model's calls cost, in whatever currency the user keeps books in: per million tokens
/// (hosted APIs), per hour of the machine that computes them (a local model: each call is charged
/// its measured wall time), or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_million: f64,
    #[serde(default)]
    pub output_per_million: f64,
    #[serde(default)]
    pub per_hour: f64,
}

impl Price {
    pub fn cost(&self, input_tokens: u32, output_tokens: u32, compute_ms: f64) -> f64 {
        (input_tokens as f64 * self.input_per_million + output_tokens as f64 * self.output_per_million) / 1e6
            + compute_ms / 3_600_000.0 * self.per_hour
    }

    /// How the cost is computed, for reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.input_per_million > 0.0 || self.output_per_million > 0.0 {
            parts.push(format!(
                "{} per M input tokens, {} per M output tokens",
                self.input_per_million, self.output_per_million
            ));
        }
        if self.per_hour > 0.0 {
            parts.push(format!("{} per hour of measured compute", self.per_hour));
        }
        if parts.is_empty() {
            "free".to_string()
        } else {
            parts.join(" + ")
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    routing: Vec<String>,
    providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    price: Option<Price>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Providers in routing order: the first that answers wins.
    pub providers: Vec<(String, ProviderConfig)>,
    pub price: Option<Price>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    #[default]
    Chat,
    Json,
}

/// A JSON schema given inline as a TOML table, or as a path to a JSON file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SchemaSource {
    Path(String),
    Inline(toml::Table),
}

/// A template given inline as a string, or as `{ path = "..." }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TemplateSource {
    Inline(String),
    File { path: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    #[serde(rename = "type", default)]
    kind: FunctionKind,
    #[serde(default)]
    description: String,
    system_schema: Option<SchemaSource>,
    user_schema: Option<SchemaSource>,
    assistant_schema: Option<SchemaSource>,
    output_schema: Option<SchemaSource>,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    tool_choice: ToolChoice,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    variants: BTreeMap<String, RawVariant>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default)]
    pub num_retries: u32,
    #[serde(default = "default_max_delay_s")]
    pub max_delay_s: f64,
}

fn default_max_delay_s() -> f64 {
    10.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    #[serde(rename = "type", default = "default_variant_type")]
    kind: String,
    model: String,
    #[serde(default = "default_weight")]
    weight: f64,
    system_template: Option<TemplateSource>,
    user_template: Option<TemplateSource>,
    assistant_template: Option<TemplateSource>,
    /// Further named templates, addressed by template content blocks.
    #[serde(default)]
    templates: BTreeMap<String, TemplateSource>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    seed: Option<u64>,
    history_turns: Option<usize>,
    #[serde(default)]
    json_mode: Option<JsonMode>,
    #[serde(default)]
    retries: RetryConfig,
}

fn default_variant_type() -> String {
    "chat_completion".into()
}
fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonMode {
    /// Ask the provider for JSON that follows the output schema.
    #[default]
    Strict,
    /// Ask the provider for any JSON object.
    On,
    /// Rely on the prompt alone.
    Off,
}

#[derive(Debug, Clone)]
pub struct VariantConfig {
    pub model: String,
    pub weight: f64,
    /// Names of the templates this variant defines (`system`, `user`, `assistant`, custom ones).
    pub template_names: Vec<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
    /// Render only the conversation's last N turns (a turn starts at a user message), so a small
    /// model sees a short, bounded context; all of the input is still recorded.
    pub history_turns: Option<usize>,
    pub json_mode: JsonMode,
    pub retries: RetryConfig,
}

/// A compiled JSON schema together with its source, for validation and for providers.
#[derive(Clone)]
pub struct Schema {
    pub value: Value,
    validator: Arc<jsonschema::Validator>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema").field("value", &self.value).finish()
    }
}

impl Schema {
    pub fn compile(value: Value) -> Result<Self, String> {
        let validator = jsonschema::validator_for(&value).map_err(|e| format!("invalid JSON schema: {e}"))?;
        Ok(Self { value, validator: Arc::new(validator) })
    }

    /// Checks `instance`; the error names the failing location inside the instance.
    pub fn validate(&self, instance: &Value) -> Result<(), String> {
        match self.validator.iter_errors(instance).next() {
            None => Ok(()),
            Some(e) => {
                let at = e.instance_path.to_string();
                if at.is_empty() {
                    Err(e.to_string())
                } else {
                    Err(format!("{at}: {e}"))
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct FunctionConfig {
    pub kind: FunctionKind,
    pub description: String,
    pub system_schema: Option<Schema>,
    pub user_schema: Option<Schema>,
    pub assistant_schema: Option<Schema>,
    pub output_schema: Option<Schema>,
    pub tools: Vec<String>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: Option<bool>,
    pub variants: BTreeMap<String, VariantConfig>,
}

impl FunctionConfig {
    /// The schema template arguments for `role` must satisfy, if the function declares one.
    pub fn schema_for(&self, template: &str) -> Option<&Schema> {
        match template {
            "system" => self.system_schema.as_ref(),
            "user" => self.user_schema.as_ref(),
            "assistant" => self.assistant_schema.as_ref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Boolean,
    Float,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimize {
    Max,
    Min,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    #[serde(rename = "type")]
    pub kind: MetricType,
    pub level: MetricLevel,
    pub optimize: Optimize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    #[serde(default)]
    description: String,
    parameters: SchemaSource,
    #[serde(default)]
    strict: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: GatewayConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    functions: BTreeMap<String, RawFunction>,
    #[serde(default)]
    tools: BTreeMap<String, RawTool>,
    #[serde(default)]
    metrics: BTreeMap<String, MetricConfig>,
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (or a label for embedded configs).
    pub source: PathBuf,
    pub gateway: GatewayConfig,
    pub store: StoreConfig,
    pub models: BTreeMap<String, ModelConfig>,
    pub functions: BTreeMap<String, FunctionConfig>,
    pub tools: BTreeMap<String, ToolDefinition>,
    pub metrics: BTreeMap<String, MetricConfig>,
    pub templates: Templates,
}

/// Function name used for inferences that name a model directly instead of a function.
pub const DEFAULT_FUNCTION: &str = "apprentice::default";

impl Config {
    /// Reads and validates a configuration file. Relative paths inside it are relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, path, &base)
    }

    /// Validates configuration text; `file` labels errors, `base` resolves relative paths.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw = parse_raw(text, file)?;
        Resolver { file, base }.resolve(raw)
    }

    pub fn function(&self, name: &str) -> Option<&FunctionConfig> {
        self.functions.get(name)
    }

    /// The tool definitions a function offers, in its declared order.
    pub fn tools_of(&self, function: &FunctionConfig) -> Vec<ToolDefinition> {
        function.tools.iter().filter_map(|name| self.tools.get(name).cloned()).collect()
    }
}

fn parse_raw(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize::<_, RawConfig>(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        // toml's Display repeats the source snippet; the plain message reads better after the key.
        ConfigError {
            file: file.to_path_buf(),
            line,
            key: if key == "." { String::new() } else { key },
            message: inner.message().to_string(),
        }
    })
}

struct Resolver<'a> {
    file: &'a Path,
    base: &'a Path,
}

impl Resolver<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.to_path_buf(), line: None, key: key.into(), message: message.into() }
    }

    fn resolve(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut store = raw.store;
        if store.path.is_relative() {
            store.path = self.base.join(&store.path);
        }
        if store.queue_capacity == 0 {
            return Err(self.err("store.queue_capacity", "must be at least 1"));
        }

        let mut models = BTreeMap::new();
        for (name, model) in raw.models {
            models.insert(name.clone(), self.model(&name, model)?);
        }

        let mut tools = BTreeMap::new();
        for (name, tool) in raw.tools {
            let key = format!("tools.{name}.parameters");
            let parameters = self.schema(&key, &tool.parameters)?.value;
            tools.insert(
                name.clone(),
                ToolDefinition { name, description: tool.description, parameters, strict: tool.strict },
            );
        }

        for name in raw.metrics.keys() {
            if name == "demonstration" || name == "comment" {
                return Err(self.err(format!("metrics.{name}"), "is a built-in feedback kind; choose another name"));
            }
        }

        let mut templates = Templates::new();
        let mut functions = BTreeMap::new();
        for (name, function) in raw.functions {
            let resolved = self.function(&name, function, &models, &tools, &mut templates)?;
            functions.insert(name, resolved);
        }

        Ok(Config {
            source: self.file.to_path_buf(),
            gateway: raw.gateway,
            store,
            models,
            functions,
            tools,
            metrics: raw.metrics,
            templates,
        })
    }

    fn model(&self, name: &str, raw: RawModel) -> Result<ModelConfig, ConfigError> {
        if raw.routing.is_empty() {
            return Err(self.err(format!("models.{name}.routing"), "must name at least one provider"));
        }
        let mut providers = Vec::new();
        for (i, provider) in raw.routing.iter().enumerate() {
            let config = raw.providers.get(provider).ok_or_else(|| {
                self.err(
                    format!("models.{name}.routing[{i}]"),
                    format!("names provider `{provider}`, which is not defined under [models.{name}.providers]"),
                )
            })?;
            if let ProviderConfig::Openai { timeout_s, .. } | ProviderConfig::Anthropic { timeout_s, .. } = config {
                if timeout_s.is_nan() || *timeout_s <= 0.0 {
                    return Err(self.err(format!("models.{name}.providers.{provider}.timeout_s"), "must be positive"));
                }
            }
            let config = match config {
                ProviderConfig::Local { .. } => {
                    self.local_provider(&format!("models.{name}.providers.{provider}"), config)?
                }
                other => other.clone(),
            };
            providers.push((provider.clone(), config));
        }
        for provider in raw.providers.keys() {
            if !raw.routing.contains(provider) {
                return Err(self.err(
                    format!("models.{name}.providers.{provider}"),
                    "is not listed in `routing`, so it would never be used",
                ));
            }
        }
        if let Some(price) = raw.price {
            if price.input_per_million < 0.0 || price.output_per_million < 0.0 || price.per_hour < 0.0 {
                return Err(self.err(format!("models.{name}.price"), "prices must not be negative"));
            }
        }
        Ok(ModelConfig { providers, price: raw.price })
    }

    /// Checks a local provider and resolves a relative model path against the config's folder.
    /// A value is a path when it names something that exists there, or looks like one (a path
    /// separator, a `.gguf` ending); otherwise it is a cached model name, resolved at startup.
    fn local_provider(&self, key: &str, config: &ProviderConfig) -> Result<ProviderConfig, ConfigError> {
        let ProviderConfig::Local { model, max_context_tokens, threads, max_batch, prefill_chunk_tokens, .. } = config
        else {
            return Ok(config.clone());
        };
        if model.trim().is_empty() {
            return Err(self.err(format!("{key}.model"), "must name a cached model, a GGUF file or an HF model folder"));
        }
        if *max_context_tokens == Some(0) {
            return Err(self.err(format!("{key}.max_context_tokens"), "must be at least 1"));
        }
        for (field, value) in
            [("threads", threads), ("max_batch", max_batch), ("prefill_chunk_tokens", prefill_chunk_tokens)]
        {
            if *value == Some(0) {
                return Err(self.err(format!("{key}.{field}"), "must be at least 1"));
            }
        }
        let path = Path::new(model);
        let looks_like_path = model.contains(['/', '\\']) || model.ends_with(".gguf") || model.starts_with('.');
        let model = if path.is_relative() && (looks_like_path || self.base.join(path).exists()) {
            self.base.join(path).to_string_lossy().into_owned()
        } else {
            model.clone()
        };
        let mut resolved = config.clone();
        if let ProviderConfig::Local { model: resolved_model, .. } = &mut resolved {
            *resolved_model = model;
        }
        Ok(resolved)
    }

    fn read_file(&self, key: &str, path: &str) -> Result<String, ConfigError> {
        let full = self.base.join(path);
        std::fs::read_to_string(&full).map_err(|e| self.err(key, format!("cannot read `{}`: {e}", full.display())))
    }

    fn schema(&self, key: &str, source: &SchemaSource) -> Result<Schema, ConfigError> {
        let value = match source {
            SchemaSource::Inline(table) => serde_json::to_value(table).map_err(|e| self.err(key, e.to_string()))?,
            SchemaSource::Path(path) => {
                let text = self.read_file(key, path)?;
                serde_json::from_str(&text).map_err(|e| self.err(key, format!("`{path}` is not valid JSON: {e}")))?
            }
        };
        Schema::compile(value).map_err(|e| self.err(key, e))
    }

    fn function(
        &self,
        name: &str,
        raw: RawFunction,
        models: &BTreeMap<String, ModelConfig>,
        tools: &BTreeMap<String, ToolDefinition>,
        templates: &mut Templates,
    ) -> Result<FunctionConfig, ConfigError> {
        let at = |field: &str| format!("functions.{name}.{field}");
        let schema = |field: &str, source: &Option<SchemaSource>| -> Result<Option<Schema>, ConfigError> {
            source.as_ref().map(|s| self.schema(&at(field), s)).transpose()
        };
        let system_schema = schema("system_schema", &raw.system_schema)?;
        let user_schema = schema("user_schema", &raw.user_schema)?;
        let assistant_schema = schema("assistant_schema", &raw.assistant_schema)?;
        let output_schema = schema("output_schema", &raw.output_schema)?;
        if raw.kind == FunctionKind::Chat && output_schema.is_some() {
            return Err(self.err(at("output_schema"), "only json functions have an output schema"));
        }
        for (i, tool) in raw.tools.iter().enumerate() {
            if !tools.contains_key(tool) {
                return Err(self.err(
                    format!("{}[{i}]", at("tools")),
                    format!("names tool `{tool}`, which is not defined under [tools]"),
                ));
            }
        }
        if raw.variants.is_empty() {
            return Err(self.err(at("variants"), "a function needs at least one variant"));
        }

        let mut variants = BTreeMap::new();
        for (variant_name, variant) in raw.variants {
            let vat = |field: &str| format!("functions.{name}.variants.{variant_name}.{field}");
            if variant.kind != "chat_completion" {
                return Err(self
                    .err(vat("type"), format!("unknown variant type `{}`; expected `chat_completion`", variant.kind)));
            }
            if !models.contains_key(&variant.model) {
                return Err(self.err(
                    vat("model"),
                    format!("names model `{}`, which is not defined under [models]", variant.model),
                ));
            }
            if !variant.weight.is_finite() || variant.weight < 0.0 {
                return Err(self.err(vat("weight"), "must be a finite number >= 0"));
            }
            if let Some(t) = variant.temperature {
                if !(0.0..=2.0).contains(&t) {
                    return Err(self.err(vat("temperature"), "must be between 0 and 2"));
                }
            }
            if variant.history_turns == Some(0) {
                return Err(self.err(vat("history_turns"), "must be at least 1 (the current turn)"));
            }
            let mut sources: Vec<(String, String, TemplateSource)> = Vec::new();
            for (role, source) in [
                ("system", &variant.system_template),
                ("user", &variant.user_template),
                ("assistant", &variant.assistant_template),
            ] {
                if let Some(source) = source {
                    sources.push((role.to_string(), vat(&format!("{role}_template")), source.clone()));
                }
            }
            for (template, source) in &variant.templates {
                sources.push((template.clone(), vat(&format!("templates.{template}")), source.clone()));
            }
            let mut template_names = Vec::new();
            for (template, key, source) in sources {
                let text = match source {
                    TemplateSource::Inline(text) => text,
                    TemplateSource::File { path } => self.read_file(&key, &path)?,
                };
                templates.add(name, &variant_name, &template, text).map_err(|e| self.err(&key, e))?;
                template_names.push(template);
            }
            // Structured arguments can only reach a model through a template.
            for (role, has_schema) in [
                ("system", system_schema.is_some()),
                ("user", user_schema.is_some()),
                ("assistant", assistant_schema.is_some()),
            ] {
                if has_schema && !template_names.iter().any(|t| t == role) {
                    return Err(self.err(
                        vat(&format!("{role}_template")),
                        format!("is required because the function declares `{role}_schema`"),
                    ));
                }
            }
            variants.insert(
                variant_name.clone(),
                VariantConfig {
                    model: variant.model,
                    weight: variant.weight,
                    template_names,
                    temperature: variant.temperature,
                    top_p: variant.top_p,
                    max_tokens: variant.max_tokens,
                    seed: variant.seed,
                    history_turns: variant.history_turns,
                    json_mode: variant.json_mode.unwrap_or_default(),
                    retries: variant.retries,
                },
            );
        }
        if variants.values().all(|v| v.weight == 0.0) {
            return Err(
                self.err(at("variants"), "at least one variant needs a weight above 0, or none could be sampled")
            );
        }

        Ok(FunctionConfig {
            kind: raw.kind,
            description: raw.description,
            system_schema,
            user_schema,
            assistant_schema,
            output_schema,
            tools: raw.tools,
            tool_choice: raw.tool_choice,
            parallel_tool_calls: raw.parallel_tool_calls,
            variants,
        })
    }
}
