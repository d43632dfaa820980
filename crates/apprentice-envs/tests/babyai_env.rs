//! The BabyAI-Text env through the `Env` trait: spec, observations, the conversation, rewards,
//! metrics, truncation and unreadable answers.

use apprentice_core::config::{MetricType, Optimize};
use apprentice_core::{ContentBlock, FeedbackValue, Input, MetricLevel, Role, SystemInput, ToolCall};
use apprentice_envs::babyai::mission::Status;
use apprentice_envs::babyai::observation::describe;
use apprentice_envs::babyai::plan::remaining_cost;
use apprentice_envs::babyai::tasks::{generate, TaskConfig, TASKS_PER_SPLIT};
use apprentice_envs::babyai::world::Action;
use apprentice_envs::babyai::{success_reward, BabyAi, FUNCTION_NAME};
use apprentice_envs::{Env, EnvError, Split, StepOutcome, TaskId};
use serde_json::{json, Value};

fn id(s: &str) -> TaskId {
    s.parse().expect("task id")
}

fn text(s: &str) -> Vec<ContentBlock> {
    vec![ContentBlock::Text { text: s.to_string() }]
}

fn feedback<'a>(values: &'a [(String, FeedbackValue)], name: &str) -> Option<&'a FeedbackValue> {
    values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// The template arguments of the last user message.
fn last_user_arguments(input: &Input) -> &Value {
    let message = input.messages.last().expect("a message");
    assert_eq!(message.role, Role::User);
    match &message.content[..] {
        [ContentBlock::Template { name, arguments }] => {
            assert_eq!(name, "user");
            arguments
        }
        other => panic!("expected one user template block, got {other:?}"),
    }
}

/// The action that finishes the mission or lowers the plan's cost-to-go most.
fn best_action(env: &BabyAi) -> Action {
    let (world, verifier) = (env.world().expect("running"), env.verifier().expect("running"));
    let mut best = (u32::MAX, Action::Done);
    for action in Action::OFFERED {
        let (mut w, mut v) = (world.clone(), verifier.clone());
        let effect = w.step(action);
        let cost = match v.update(&w, &effect) {
            Status::Success => 0,
            Status::Failure => continue,
            Status::InProgress => remaining_cost(&w, v.remaining()).map_or(u32::MAX, |c| c + 1),
        };
        if cost < best.0 {
            best = (cost, action);
        }
    }
    best.1
}

#[test]
fn the_spec_declares_the_function_metrics_and_horizon() {
    let env = BabyAi::new();
    let spec = env.spec();
    assert_eq!(spec.name, "babyai");
    assert_eq!(spec.horizon, 128);
    assert!(spec.tools.is_empty());
    let [function] = &spec.functions[..] else { panic!("one function") };
    assert_eq!(function.name, FUNCTION_NAME);
    assert_eq!(function.name, "babyai::act");
    let metrics: Vec<(&str, MetricType, MetricLevel, Optimize)> =
        spec.metrics.iter().map(|m| (m.name.as_str(), m.kind, m.level, m.optimize)).collect();
    assert_eq!(
        metrics,
        [
            ("reward", MetricType::Float, MetricLevel::Inference, Optimize::Max),
            ("progress", MetricType::Boolean, MetricLevel::Inference, Optimize::Max),
            ("success", MetricType::Boolean, MetricLevel::Episode, Optimize::Max),
            ("return", MetricType::Float, MetricLevel::Episode, Optimize::Max),
        ]
    );
    assert_eq!(env.num_tasks(Split::Train), TASKS_PER_SPLIT);
    assert_eq!(env.num_tasks(Split::Test), TASKS_PER_SPLIT);
    assert_eq!(env.action_space(), ["turn left", "turn right", "go forward", "pick up", "drop", "toggle"]);
    // The schemas compile and the templates parse.
    function.config(&spec.tools).expect("schemas compile");
    function.templates("v").expect("templates parse");
}

#[test]
fn reset_gives_the_mission_the_actions_and_the_first_observation() {
    let mut env = BabyAi::new();
    let obs = env.reset(id("train/0")).unwrap();
    let task = generate(id("train/0"), &TaskConfig::default()).unwrap();
    assert_eq!(obs.function_name, "babyai::act");
    let Some(SystemInput::Arguments(system)) = &obs.input.system else { panic!("system arguments") };
    assert_eq!(system["mission"], json!(task.mission()));
    let actions = system["actions"].as_str().unwrap();
    for action in env.action_space() {
        assert!(actions.contains(&format!("{action}: ")), "{action} listed in {actions}");
    }
    assert_eq!(obs.input.messages.len(), 1);
    let args = last_user_arguments(&obs.input);
    assert_eq!(args, &json!({"observation": describe(&task.world), "step": 0}));
    assert_eq!(env.task().unwrap().id, id("train/0"));
    assert_eq!(env.steps(), 0);
}

#[test]
fn observations_render_with_the_env_templates() {
    let mut env = BabyAi::new();
    let obs = env.reset(id("train/1")).unwrap();
    let function = env.spec().functions[0].clone();
    let rendered = function.render("v", &obs.input).expect("renders");
    let json = serde_json::to_string(&rendered).unwrap();
    assert!(json.contains("pick up the red key"), "{json}");
    assert!(json.contains("Answer with exactly one action"), "{json}");
    assert!(json.contains("Step 0. You see:"), "{json}");
    // With feedback, an assistant turn and a second observation.
    let out = env.step(&text("fly away")).unwrap();
    let rendered = function.render("v", &out.observation.input).expect("renders");
    let json = serde_json::to_string(&rendered).unwrap();
    assert!(json.contains("I could not understand your answer"), "{json}");
    assert!(json.contains("fly away"), "{json}");
    assert!(json.contains("Step 1. You see:"), "{json}");
}

#[test]
fn solving_a_task_pays_the_babyai_reward_and_ends_the_episode() {
    for task in ["train/0", "train/1", "train/2", "train/3", "train/4", "test/2", "test/9"] {
        let mut env = BabyAi::new();
        env.reset(id(task)).unwrap();
        let max_steps = env.task().unwrap().max_steps;
        let mut last: Option<StepOutcome> = None;
        for _ in 0..max_steps {
            let action = best_action(&env);
            let out = env.step(&text(action.name())).unwrap();
            let done = out.terminated || out.truncated;
            if !done {
                assert_eq!(feedback(&out.feedback.inference, "reward"), Some(&FeedbackValue::Float(0.0)));
                assert_eq!(
                    feedback(&out.feedback.inference, "progress"),
                    Some(&FeedbackValue::Boolean(true)),
                    "{task}"
                );
                assert!(out.feedback.episode.is_empty());
            }
            last = Some(out);
            if done {
                break;
            }
        }
        let out = last.unwrap();
        assert!(out.terminated && !out.truncated, "{task}");
        let steps = env.steps();
        let reward = 1.0 - 0.9 * f64::from(steps) / f64::from(max_steps);
        assert_eq!(success_reward(steps, max_steps), reward);
        assert_eq!(feedback(&out.feedback.inference, "reward"), Some(&FeedbackValue::Float(reward)), "{task}");
        assert_eq!(feedback(&out.feedback.episode, "success"), Some(&FeedbackValue::Boolean(true)));
        assert_eq!(feedback(&out.feedback.episode, "return"), Some(&FeedbackValue::Float(reward)));
        assert!(matches!(env.step(&text("turn left")), Err(EnvError::NotRunning)), "no steps after the end");
    }
}

#[test]
fn the_episode_is_truncated_at_max_steps_without_reward() {
    let mut env = BabyAi::new();
    env.reset(id("train/5")).unwrap(); // a go-to task: 64 steps
    let max_steps = env.task().unwrap().max_steps;
    assert_eq!(max_steps, 64);
    for step in 1..=max_steps {
        let out = env.step(&text("done")).unwrap();
        assert!(!out.terminated);
        assert_eq!(out.truncated, step == max_steps, "step {step}");
        assert_eq!(feedback(&out.feedback.inference, "reward"), Some(&FeedbackValue::Float(0.0)));
        if step == max_steps {
            assert_eq!(feedback(&out.feedback.episode, "success"), Some(&FeedbackValue::Boolean(false)));
            assert_eq!(feedback(&out.feedback.episode, "return"), Some(&FeedbackValue::Float(0.0)));
        } else {
            assert!(out.feedback.episode.is_empty());
        }
    }
    assert!(matches!(env.step(&text("done")), Err(EnvError::NotRunning)));
    // A reset starts afresh.
    env.reset(id("train/5")).unwrap();
    assert_eq!(env.steps(), 0);
    assert!(env.step(&text("turn left")).is_ok());
}

#[test]
fn an_unreadable_answer_is_a_no_op_that_costs_a_step_and_is_explained() {
    let mut env = BabyAi::new();
    env.reset(id("train/3")).unwrap();
    let before = env.world().unwrap().clone();
    let out = env.step(&text("I need to think about this some more")).unwrap();
    assert_eq!(env.world().unwrap(), &before, "nothing happened");
    assert_eq!(env.steps(), 1);
    assert_eq!(feedback(&out.feedback.inference, "progress"), Some(&FeedbackValue::Boolean(false)));
    let args = last_user_arguments(&out.observation.input);
    assert_eq!(args["step"], json!(1));
    let said = args["feedback"].as_str().unwrap();
    assert!(said.contains("could not understand"), "{said}");
    assert!(said.contains("turn left, turn right, go forward, pick up, drop, toggle"), "{said}");
    // A readable answer next: no feedback line.
    let out = env.step(&text("Action: turn left")).unwrap();
    assert!(last_user_arguments(&out.observation.input).get("feedback").is_none());
}

#[test]
fn the_conversation_grows_by_the_answer_and_the_next_observation() {
    let mut env = BabyAi::new();
    env.reset(id("test/0")).unwrap();
    env.step(&text("turn left")).unwrap();
    let out = env.step(&text("I will go forward.")).unwrap();
    let messages = &out.observation.input.messages;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::User, Role::Assistant, Role::User]);
    assert_eq!(messages[3].content, text("I will go forward."), "the answer is kept as written");
    assert_eq!(last_user_arguments(&out.observation.input)["step"], json!(2));
    assert_eq!(
        last_user_arguments(&out.observation.input)["observation"],
        json!(describe(env.world().unwrap())),
        "the newest observation describes the current state"
    );
    assert!(matches!(out.observation.input.system, Some(SystemInput::Arguments(_))), "system kept");
}

#[test]
fn progress_is_true_only_for_steps_that_shorten_the_plan() {
    let mut env = BabyAi::new();
    env.reset(id("train/1")).unwrap();
    let good = best_action(&env);
    // The opposite turn of a good turn, or a useless drop, does not shorten the plan.
    let bad = match good {
        Action::TurnLeft => Action::TurnRight,
        Action::TurnRight => Action::TurnLeft,
        _ => Action::Drop,
    };
    let out = env.step(&text(bad.name())).unwrap();
    assert_eq!(feedback(&out.feedback.inference, "progress"), Some(&FeedbackValue::Boolean(false)), "{bad}");
    let good = best_action(&env);
    let out = env.step(&text(good.name())).unwrap();
    assert_eq!(feedback(&out.feedback.inference, "progress"), Some(&FeedbackValue::Boolean(true)), "{good}");
}

#[test]
fn tool_calls_are_read_as_answers_too() {
    let mut env = BabyAi::new();
    env.reset(id("train/0")).unwrap();
    let dir = env.world().unwrap().agent_dir();
    let call = ContentBlock::ToolCall(ToolCall { id: "c1".into(), name: "turn_left".into(), arguments: "{}".into() });
    let out = env.step(&[call]).unwrap();
    assert_eq!(env.world().unwrap().agent_dir(), dir.left());
    assert!(last_user_arguments(&out.observation.input).get("feedback").is_none());
}

#[test]
fn misuse_is_reported() {
    let mut env = BabyAi::new();
    assert!(matches!(env.step(&text("turn left")), Err(EnvError::NotRunning)), "step before reset");
    assert!(matches!(
        env.reset(TaskId { split: Split::Test, index: TASKS_PER_SPLIT }),
        Err(EnvError::BadTask(m)) if m.contains("out of range")
    ));
    assert!(env.expert_action().is_none(), "no expert move before reset");
    assert!(env.render_ascii().contains("reset"));
}

#[test]
fn render_ascii_shows_the_task_and_the_map() {
    let mut env = BabyAi::new();
    env.reset(id("train/3")).unwrap();
    let map = env.render_ascii();
    assert!(map.starts_with("train/3 — put the red ball next to the green ball, step 0/128\n"), "{map}");
    assert!(map.contains("WW........<<..WW"), "{map}");
}

#[test]
fn a_harder_variant_adds_distractors() {
    let mut env = BabyAi::with_config(TaskConfig { distractors: 4 });
    env.reset(id("train/0")).unwrap();
    let w = env.world().unwrap();
    let objects = w.positions().filter(|&p| w.cell(p).object().is_some()).count();
    assert_eq!(objects, 5);
}
