//! BabyAI-Text: the BabyAI grid world played through text, as LLM agent benchmarks (BALROG,
//! llmgym) play it. See `shared/reference/babyai.md` for the facts it follows.
//!
//! - [`world`]: the grid, the actions and the agent's view;
//! - [`mission`]: the mission grammar, its text and the success verifier;
//! - [`tasks`]: deterministic task generation by split and index (five families);
//! - [`observation`]: the text the agent reads each turn;
//! - [`parse`]: lenient reading of free-form answers into actions;
//! - [`plan`]: a cost-to-go estimate behind the `progress` metric;
//! - [`expert`]: the scripted solver.
//!
//! One episode is one conversation: the system message states the mission and the actions, each
//! user message is an observation, each assistant message an answer. The function is
//! `babyai::act`; its templates are MiniJinja and its arguments are validated by JSON schemas.

pub mod expert;
pub mod expert_eval;
pub mod mission;
pub mod observation;
pub mod parse;
pub mod plan;
pub mod rng;
pub mod tasks;
pub mod world;

use apprentice_core::config::{MetricType, Optimize};
use apprentice_core::{ContentBlock, FeedbackValue, Input, InputMessage, MetricLevel, Role, SystemInput};
use serde_json::{json, Map, Value};

use crate::{
    Env, EnvError, EnvSpec, Feedback, FunctionSpec, MetricSpec, Observation, PromptStyle, Split, StepOutcome, TaskId,
};
use mission::{Status, Verifier};
use tasks::{Task, TaskConfig, TASKS_PER_SPLIT};
use world::{Action, World};

pub const ENV_NAME: &str = "babyai";
pub const FUNCTION_NAME: &str = "babyai::act";
/// The longest step budget of any family.
pub const HORIZON: u32 = 128;

/// What each offered action does, as the system message lists it.
const ACTION_HELP: [(Action, &str); 6] = [
    (Action::TurnLeft, "turn to face the cell on your left"),
    (Action::TurnRight, "turn to face the cell on your right"),
    (Action::Forward, "step into the cell in front of you"),
    (Action::PickUp, "pick up the key, ball or box in front of you (your hands must be empty)"),
    (Action::Drop, "put what you carry on the empty cell in front of you"),
    (Action::Toggle, "open or close the door in front of you (a locked door needs its key in hand), or open a box"),
];

const SYSTEM_TEMPLATE: &str = "\
You are an agent in a grid world. Your mission: {{ mission }}.

Each turn you are told what you can see: you look up to 6 cells ahead and 3 cells to each side, \
and walls and closed doors block your view. Positions are relative to you, for example \
\"a red ball 1 step right and 2 steps forward\".
To go to an object, stand right in front of it, facing it. \
You can carry one object at a time.

The actions:
{{ actions }}

Answer with exactly one action, written as above, and nothing else.";

const USER_TEMPLATE: &str = "\
{% if feedback is defined and feedback %}{{ feedback }}

{% endif %}Step {{ step }}. You see:
{{ observation }}

Your action?";

/// The `compact` style, for a small student: the mission and the action names, then only the
/// current observation. A step's prompt is about 72 SmolLM2 tokens instead of a conversation that
/// grows by about 40 per step. Nearly all of a training example is its prompt (the answer is two
/// or three tokens), so every word here costs training time: instructions a student learns from
/// its examples anyway are left out (measured: 38% fewer tokens than with them, README, Demo).
const COMPACT_SYSTEM_TEMPLATE: &str = "\
Mission: {{ mission }}.
Actions: turn left, turn right, go forward, pick up, drop, toggle.";

const COMPACT_USER_TEMPLATE: &str = "\
{% if feedback is defined and feedback %}{{ feedback }}
{% endif %}{{ observation }}";

/// The name of the [`COMPACT_SYSTEM_TEMPLATE`] style.
pub const COMPACT_PROMPT: &str = "compact";

fn action_list() -> String {
    ACTION_HELP.iter().map(|(action, help)| format!("{}: {help}", action.name())).collect::<Vec<_>>().join("\n")
}

/// The message that tells the agent its answer was not understood.
pub fn unparseable_feedback() -> String {
    let names: Vec<&str> = Action::OFFERED.iter().map(|a| a.name()).collect();
    format!(
        "I could not understand your answer, so nothing happened (the step still counts). \
         Answer with exactly one of: {}.",
        names.join(", ")
    )
}

fn function_spec() -> FunctionSpec {
    FunctionSpec {
        name: FUNCTION_NAME.to_string(),
        system_schema: json!({
            "type": "object",
            "properties": {
                "mission": {"type": "string"},
                "actions": {"type": "string"}
            },
            "required": ["mission", "actions"],
            "additionalProperties": false
        }),
        user_schema: json!({
            "type": "object",
            "properties": {
                "observation": {"type": "string"},
                "step": {"type": "integer", "minimum": 0},
                "feedback": {"type": "string"}
            },
            "required": ["observation", "step"],
            "additionalProperties": false
        }),
        system_template: SYSTEM_TEMPLATE.to_string(),
        user_template: USER_TEMPLATE.to_string(),
        prompt_styles: vec![PromptStyle {
            name: COMPACT_PROMPT.to_string(),
            description: "the mission, the action names and only the current observation, for small students"
                .to_string(),
            system_template: COMPACT_SYSTEM_TEMPLATE.to_string(),
            user_template: COMPACT_USER_TEMPLATE.to_string(),
            history_turns: Some(1),
        }],
    }
}

fn metric(name: &str, kind: MetricType, level: MetricLevel) -> MetricSpec {
    MetricSpec { name: name.to_string(), kind, level, optimize: Optimize::Max }
}

fn env_spec() -> EnvSpec {
    EnvSpec {
        name: ENV_NAME.to_string(),
        functions: vec![function_spec()],
        tools: Vec::new(),
        metrics: vec![
            metric("reward", MetricType::Float, MetricLevel::Inference),
            metric("progress", MetricType::Boolean, MetricLevel::Inference),
            metric("success", MetricType::Boolean, MetricLevel::Episode),
            metric("return", MetricType::Float, MetricLevel::Episode),
        ],
        horizon: HORIZON,
    }
}

/// The reward for completing a mission after `steps` of `max_steps` (BabyAI's formula).
pub fn success_reward(steps: u32, max_steps: u32) -> f64 {
    1.0 - 0.9 * f64::from(steps) / f64::from(max_steps.max(1))
}

/// One running episode.
struct Episode {
    task: Task,
    world: World,
    verifier: Verifier,
    steps: u32,
    /// The conversation so far, ending with the newest observation.
    input: Input,
    /// The plan's estimate of the actions still needed, for the `progress` metric.
    cost_to_go: Option<u32>,
    finished: bool,
    /// The scripted expert, fed every new state (whoever chose the action) so its map of seen
    /// cells stays whole.
    expert: expert::Expert,
}

/// The BabyAI-Text environment.
pub struct BabyAi {
    spec: EnvSpec,
    config: TaskConfig,
    /// Ends episodes (truncated) after this many steps if the task's budget is larger.
    step_limit: Option<u32>,
    episode: Option<Episode>,
}

impl Default for BabyAi {
    fn default() -> Self {
        BabyAi::new()
    }
}

impl BabyAi {
    /// The benchmark setting: no distractors.
    pub fn new() -> BabyAi {
        BabyAi::with_config(TaskConfig::default())
    }

    pub fn with_config(config: TaskConfig) -> BabyAi {
        BabyAi { spec: env_spec(), config, step_limit: None, episode: None }
    }

    /// Truncates every episode after at most `limit` steps (short smoke runs of slow policies).
    /// Rewards still follow the task's own budget, so a success scores the same either way.
    pub fn with_step_limit(mut self, limit: Option<u32>) -> BabyAi {
        self.step_limit = limit;
        self
    }

    pub fn config(&self) -> &TaskConfig {
        &self.config
    }

    /// The task being played, if any.
    pub fn task(&self) -> Option<&Task> {
        self.episode.as_ref().map(|e| &e.task)
    }

    /// The world as it is now.
    pub fn world(&self) -> Option<&World> {
        self.episode.as_ref().map(|e| &e.world)
    }

    pub fn verifier(&self) -> Option<&Verifier> {
        self.episode.as_ref().map(|e| &e.verifier)
    }

    /// Steps taken in the current episode.
    pub fn steps(&self) -> u32 {
        self.episode.as_ref().map_or(0, |e| e.steps)
    }

    /// The full map with the agent as `>>`, `vv`, `<<` or `^^`, preceded by the mission and the
    /// step count (for play and debugging).
    pub fn render_ascii(&self) -> String {
        match &self.episode {
            None => "(no episode: call reset first)\n".to_string(),
            Some(e) => format!(
                "{} — {}, step {}/{}\n{}",
                e.task.id,
                e.task.mission(),
                e.steps,
                e.task.max_steps,
                e.world.render_ascii()
            ),
        }
    }

    fn observation(&self, input: Input) -> Observation {
        Observation { function_name: FUNCTION_NAME.to_string(), input }
    }
}

/// The user message for the current state.
fn user_message(world: &World, step: u32, feedback: Option<String>) -> InputMessage {
    let mut arguments = Map::new();
    arguments.insert("observation".into(), Value::String(observation::describe(world)));
    arguments.insert("step".into(), Value::from(step));
    if let Some(feedback) = feedback {
        arguments.insert("feedback".into(), Value::String(feedback));
    }
    InputMessage {
        role: Role::User,
        content: vec![ContentBlock::Template { name: "user".into(), arguments: Value::Object(arguments) }],
    }
}

/// The text of an answer: its text blocks, and tool calls as `name arguments` (this env offers no
/// tools, but a model may still call one, and its name often is the action).
pub fn answer_text(action: &[ContentBlock]) -> String {
    let parts: Vec<String> = action
        .iter()
        .filter_map(|block| match block {
            ContentBlock::Text { text } => Some(text.clone()),
            ContentBlock::RawText { value } => Some(value.clone()),
            ContentBlock::ToolCall(call) => Some(format!("{} {}", call.name, call.arguments)),
            ContentBlock::Template { arguments, .. } => Some(arguments.to_string()),
            ContentBlock::ToolResult(_) => None,
        })
        .collect();
    parts.join("\n")
}

impl Env for BabyAi {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn num_tasks(&self, _split: Split) -> u64 {
        TASKS_PER_SPLIT
    }

    fn reset(&mut self, task: TaskId) -> Result<Observation, EnvError> {
        let task = tasks::generate(task, &self.config).map_err(|e| EnvError::BadTask(e.to_string()))?;
        let world = task.world.clone();
        let verifier = Verifier::new(&task.instr);
        let mut system = Map::new();
        system.insert("mission".into(), Value::String(task.mission()));
        system.insert("actions".into(), Value::String(action_list()));
        let input =
            Input { system: Some(SystemInput::Arguments(system)), messages: vec![user_message(&world, 0, None)] };
        let cost_to_go = plan::remaining_cost(&world, verifier.remaining());
        let observation = self.observation(input.clone());
        let expert = expert::Expert::new(&world);
        self.episode = Some(Episode { task, world, verifier, steps: 0, input, cost_to_go, finished: false, expert });
        Ok(observation)
    }

    fn step(&mut self, action: &[ContentBlock]) -> Result<StepOutcome, EnvError> {
        let episode = self.episode.as_mut().filter(|e| !e.finished).ok_or(EnvError::NotRunning)?;
        let answer = answer_text(action);
        // An unreadable answer changes nothing, so the verifier (which only reacts to changes and
        // events) need not look; the step still counts.
        let parsed = parse::parse_action(&answer);
        let status = match parsed {
            Some(action) => {
                let effect = episode.world.step(action);
                episode.expert.observe(&episode.world);
                episode.verifier.update(&episode.world, &effect)
            }
            None => episode.verifier.status(),
        };
        episode.steps += 1;

        let success = status == Status::Success;
        let terminated = status != Status::InProgress;
        let budget = episode.task.max_steps.min(self.step_limit.unwrap_or(u32::MAX));
        let truncated = !terminated && episode.steps >= budget;
        let reward = if success { success_reward(episode.steps, episode.task.max_steps) } else { 0.0 };

        let before = episode.cost_to_go;
        let after = if success { Some(0) } else { plan::remaining_cost(&episode.world, episode.verifier.remaining()) };
        let progress = success
            || match (before, after) {
                (Some(b), Some(a)) => a < b,
                (None, Some(_)) => true,
                (_, None) => false,
            };
        episode.cost_to_go = after;

        let feedback_text = parsed.is_none().then(unparseable_feedback);
        episode
            .input
            .messages
            .push(InputMessage { role: Role::Assistant, content: vec![ContentBlock::Text { text: answer }] });
        episode.input.messages.push(user_message(&episode.world, episode.steps, feedback_text));

        let mut feedback = Feedback {
            inference: vec![
                ("reward".to_string(), FeedbackValue::Float(reward)),
                ("progress".to_string(), FeedbackValue::Boolean(progress)),
            ],
            episode: Vec::new(),
        };
        if terminated || truncated {
            episode.finished = true;
            feedback.episode = vec![
                ("success".to_string(), FeedbackValue::Boolean(success)),
                ("return".to_string(), FeedbackValue::Float(reward)),
            ];
        }
        let input = episode.input.clone();
        Ok(StepOutcome { observation: self.observation(input), feedback, terminated, truncated })
    }

    fn expert_action(&mut self) -> Option<String> {
        let episode = self.episode.as_mut().filter(|e| !e.finished)?;
        Some(episode.expert.action_text(&episode.world, &episode.verifier))
    }

    fn action_space(&self) -> Vec<String> {
        Action::OFFERED.iter().map(|a| a.name().to_string()).collect()
    }

    fn render_map(&self) -> Option<String> {
        self.episode.is_some().then(|| self.render_ascii())
    }
}
