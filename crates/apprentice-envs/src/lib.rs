//! Agentic environments, shaped like llmgym's: an env declares its functions, tools, metrics and
//! horizon; `reset(task)` gives the first observation; `step(action)` gives the next observation,
//! the feedback on that step and on the episode, and whether the episode ended.
//!
//! Task instances are addressed by split and index and are fully determined by them, so a task
//! replays identically on every run and machine.

pub mod babyai;
pub mod rollout;

use std::fmt;
use std::str::FromStr;

use apprentice_core::config::{FunctionConfig, FunctionKind, MetricType, Optimize, Schema, ToolChoice};
use apprentice_core::render::render_input;
use apprentice_core::templates::Templates;
use apprentice_core::{ContentBlock, FeedbackValue, Input, MetricLevel};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl FromStr for Split {
    type Err = EnvError;
    fn from_str(s: &str) -> Result<Self, EnvError> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(EnvError::BadTask(format!("unknown split `{other}`; expected `train` or `test`"))),
        }
    }
}

/// One task instance: `train/17`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    pub split: Split,
    pub index: u64,
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.split.as_str(), self.index)
    }
}

impl FromStr for TaskId {
    type Err = EnvError;
    fn from_str(s: &str) -> Result<Self, EnvError> {
        let (split, index) =
            s.split_once('/').ok_or_else(|| EnvError::BadTask(format!("`{s}` is not SPLIT/INDEX, e.g. train/17")))?;
        let index = index.parse().map_err(|_| EnvError::BadTask(format!("`{index}` in `{s}` is not a task index")))?;
        Ok(TaskId { split: split.parse()?, index })
    }
}

/// A function the env's agent calls, with the argument schemas and templates it expects.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub system_schema: Value,
    pub user_schema: Value,
    pub system_template: String,
    pub user_template: String,
    /// Other ways to prompt for the same inputs, chosen by name (the default is `full`: the
    /// templates above with the whole conversation).
    pub prompt_styles: Vec<PromptStyle>,
}

/// Templates and context length for the same structured inputs: recorded calls can be rendered
/// in any style, so a teacher's history trains a student prompted more briefly.
#[derive(Debug, Clone)]
pub struct PromptStyle {
    pub name: String,
    pub description: String,
    pub system_template: String,
    pub user_template: String,
    /// How many of the conversation's last turns the model sees (`history_turns` of the variant).
    pub history_turns: Option<usize>,
}

impl FunctionSpec {
    /// The function as the gateway would configure it, for validating and rendering its inputs.
    pub fn config(&self, tools: &[apprentice_core::ToolDefinition]) -> Result<FunctionConfig, EnvError> {
        let schema =
            |value: &Value| Schema::compile(value.clone()).map_err(|e| EnvError::Other(format!("{}: {e}", self.name)));
        Ok(FunctionConfig {
            kind: FunctionKind::Chat,
            description: String::new(),
            system_schema: Some(schema(&self.system_schema)?),
            user_schema: Some(schema(&self.user_schema)?),
            assistant_schema: None,
            output_schema: None,
            tools: tools.iter().map(|t| t.name.clone()).collect(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: None,
            variants: Default::default(),
        })
    }

    /// The env's templates registered under `variant`.
    pub fn templates(&self, variant: &str) -> Result<Templates, EnvError> {
        let mut templates = Templates::new();
        for (role, source) in [("system", &self.system_template), ("user", &self.user_template)] {
            templates
                .add(&self.name, variant, role, source.clone())
                .map_err(|e| EnvError::Other(format!("{}: {e}", self.name)))?;
        }
        Ok(templates)
    }

    /// The templates and context length of the style named `name` (`full` for the default).
    pub fn style(&self, name: &str) -> Result<(&str, &str, Option<usize>), EnvError> {
        if name == FULL_PROMPT {
            return Ok((&self.system_template, &self.user_template, None));
        }
        let style = self.prompt_styles.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> =
                std::iter::once(FULL_PROMPT).chain(self.prompt_styles.iter().map(|s| s.name.as_str())).collect();
            EnvError::Other(format!("`{}` has no prompt style `{name}` (it has: {})", self.name, known.join(", ")))
        })?;
        Ok((&style.system_template, &style.user_template, style.history_turns))
    }

    /// Renders an observation's input as the model would be sent it.
    pub fn render(&self, variant: &str, input: &Input) -> Result<apprentice_core::RenderedRequest, EnvError> {
        let config = self.config(&[])?;
        render_input(&self.templates(variant)?, &self.name, Some(&config), variant, input)
            .map_err(|e| EnvError::Other(e.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct MetricSpec {
    pub name: String,
    pub kind: MetricType,
    pub level: MetricLevel,
    pub optimize: Optimize,
}

#[derive(Debug, Clone)]
pub struct EnvSpec {
    pub name: String,
    pub functions: Vec<FunctionSpec>,
    pub tools: Vec<apprentice_core::ToolDefinition>,
    pub metrics: Vec<MetricSpec>,
    /// The most steps any task of this env can take.
    pub horizon: u32,
}

/// What the agent sees before acting: the function to call and its whole structured input
/// (system arguments and the conversation so far, ending with the newest observation).
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub function_name: String,
    pub input: Input,
}

/// Metric values produced by one step: on the inference that chose the action, and (when the
/// episode ends) on the episode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Feedback {
    pub inference: Vec<(String, FeedbackValue)>,
    pub episode: Vec<(String, FeedbackValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    pub observation: Observation,
    pub feedback: Feedback,
    /// The task was completed or failed for good.
    pub terminated: bool,
    /// The step budget ran out.
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("bad task: {0}")]
    BadTask(String),
    #[error("unknown env `{name}`; known envs: {known}")]
    UnknownEnv { name: String, known: String },
    #[error("step called before reset or after the episode ended")]
    NotRunning,
    #[error("{0}")]
    Other(String),
}

pub trait Env: Send {
    fn spec(&self) -> &EnvSpec;
    fn num_tasks(&self, split: Split) -> u64;
    fn reset(&mut self, task: TaskId) -> Result<Observation, EnvError>;
    /// Applies the agent's answer (free-form text and/or tool calls; the env parses it leniently).
    fn step(&mut self, action: &[ContentBlock]) -> Result<StepOutcome, EnvError>;
    /// The scripted expert's next action from the current state, as the text an agent would answer.
    /// The expert re-plans from the state it finds, so it recovers from actions that were not its own.
    fn expert_action(&mut self) -> Option<String>;
    /// The actions a uniformly random (noisy) policy draws from.
    fn action_space(&self) -> Vec<String>;
    /// A picture of the whole state for people (the agent never sees it), if the env has one.
    fn render_map(&self) -> Option<String> {
        None
    }
}

impl EnvSpec {
    /// The gateway configuration (TOML) for this env: its functions with one variant each served by
    /// `model`, with the env's schemas and templates, and its metrics. Append a `[models.MODEL]`
    /// section and the gateway can serve an LLM policy for the env. A local model, `local::NAME`,
    /// needs no URL or key, so its section is included: a provider of `type = "local"` for NAME
    /// (a cached model name, a GGUF file or an HF model folder).
    pub fn gateway_config(&self, model: &str, variant: &str) -> Result<String, EnvError> {
        self.gateway_config_with(model, variant, &VariantParams::default())
    }

    /// [`EnvSpec::gateway_config`] with sampling parameters set on the variant (e.g. a short
    /// `max_tokens` for a small local model, whose untrained answers can run long).
    pub fn gateway_config_with(&self, model: &str, variant: &str, params: &VariantParams) -> Result<String, EnvError> {
        let to_toml = |value: &Value| {
            toml::Value::try_from(value).map_err(|e| EnvError::Other(format!("schema not expressible in TOML: {e}")))
        };
        let mut functions = toml::Table::new();
        for function in &self.functions {
            let (system_template, user_template, history_turns) =
                function.style(params.prompt.as_deref().unwrap_or(FULL_PROMPT))?;
            let mut variant_table = toml::Table::new();
            variant_table.insert("model".into(), model.into());
            variant_table.insert("system_template".into(), system_template.into());
            variant_table.insert("user_template".into(), user_template.into());
            if let Some(turns) = history_turns {
                variant_table.insert("history_turns".into(), i64::try_from(turns).unwrap_or(i64::MAX).into());
            }
            if let Some(temperature) = params.temperature {
                variant_table.insert("temperature".into(), temperature.into());
            }
            if let Some(top_p) = params.top_p {
                variant_table.insert("top_p".into(), top_p.into());
            }
            if let Some(max_tokens) = params.max_tokens {
                variant_table.insert("max_tokens".into(), i64::from(max_tokens).into());
            }
            let mut table = toml::Table::new();
            table.insert("type".into(), "chat".into());
            table.insert("system_schema".into(), to_toml(&function.system_schema)?);
            table.insert("user_schema".into(), to_toml(&function.user_schema)?);
            if !self.tools.is_empty() {
                let names: Vec<toml::Value> = self.tools.iter().map(|t| t.name.clone().into()).collect();
                table.insert("tools".into(), names.into());
            }
            table.insert(
                "variants".into(),
                toml::Table::from_iter([(variant.to_string(), variant_table.into())]).into(),
            );
            functions.insert(function.name.clone(), table.into());
        }
        let mut tools = toml::Table::new();
        for tool in &self.tools {
            let mut table = toml::Table::new();
            table.insert("description".into(), tool.description.clone().into());
            table.insert("parameters".into(), to_toml(&tool.parameters)?);
            tools.insert(tool.name.clone(), table.into());
        }
        let mut metrics = toml::Table::new();
        for metric in &self.metrics {
            let kind = match metric.kind {
                MetricType::Boolean => "boolean",
                MetricType::Float => "float",
            };
            let optimize = match metric.optimize {
                Optimize::Max => "max",
                Optimize::Min => "min",
            };
            let table = toml::Table::from_iter([
                ("type".to_string(), kind.into()),
                ("level".to_string(), metric.level.as_str().into()),
                ("optimize".to_string(), optimize.into()),
            ]);
            metrics.insert(metric.name.clone(), table.into());
        }
        let mut root = toml::Table::new();
        root.insert("functions".into(), functions.into());
        if !tools.is_empty() {
            root.insert("tools".into(), tools.into());
        }
        root.insert("metrics".into(), metrics.into());
        if let Some(local) = model.strip_prefix("local::").filter(|name| !name.is_empty()) {
            let provider =
                toml::Table::from_iter([("type".to_string(), "local".into()), ("model".to_string(), local.into())]);
            let section = toml::Table::from_iter([
                ("routing".to_string(), vec![toml::Value::from("local")].into()),
                ("providers".to_string(), toml::Table::from_iter([("local".to_string(), provider.into())]).into()),
            ]);
            root.insert("models".into(), toml::Table::from_iter([(model.to_string(), section.into())]).into());
        }
        toml::to_string(&root).map_err(|e| EnvError::Other(e.to_string()))
    }
}

/// The name of every function's default prompt style.
pub const FULL_PROMPT: &str = "full";

/// Sampling parameters and prompt style [`EnvSpec::gateway_config_with`] writes into the variant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VariantParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    /// A [`PromptStyle`] of the function (none: `full`).
    pub prompt: Option<String>,
}

impl Env for Box<dyn Env> {
    fn spec(&self) -> &EnvSpec {
        (**self).spec()
    }
    fn num_tasks(&self, split: Split) -> u64 {
        (**self).num_tasks(split)
    }
    fn reset(&mut self, task: TaskId) -> Result<Observation, EnvError> {
        (**self).reset(task)
    }
    fn step(&mut self, action: &[ContentBlock]) -> Result<StepOutcome, EnvError> {
        (**self).step(action)
    }
    fn expert_action(&mut self) -> Option<String> {
        (**self).expert_action()
    }
    fn action_space(&self) -> Vec<String> {
        (**self).action_space()
    }
    fn render_map(&self) -> Option<String> {
        (**self).render_map()
    }
}

/// The envs apprentice ships, by name.
pub const ENVS: &[&str] = &["babyai"];

/// Settings that select a variant of an env.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvOptions {
    /// Extra objects in each task (BabyAI's harder variant); 0 as in the LLM benchmarks.
    pub distractors: usize,
    /// Truncate episodes after this many steps when the task allows more (none: the task's budget).
    pub max_steps: Option<u32>,
}

/// Builds a fresh instance of a shipped env.
pub fn make_env(name: &str, options: EnvOptions) -> Result<Box<dyn Env>, EnvError> {
    match name {
        "babyai" => {
            if options.distractors > babyai::tasks::MAX_DISTRACTORS {
                return Err(EnvError::BadTask(format!(
                    "babyai takes at most {} distractors, not {}",
                    babyai::tasks::MAX_DISTRACTORS,
                    options.distractors
                )));
            }
            if options.max_steps == Some(0) {
                return Err(EnvError::BadTask("max_steps must be at least 1".into()));
            }
            let config = babyai::tasks::TaskConfig { distractors: options.distractors };
            Ok(Box::new(babyai::BabyAi::with_config(config).with_step_limit(options.max_steps)))
        }
        other => Err(EnvError::UnknownEnv { name: other.to_string(), known: ENVS.join(", ") }),
    }
}
