//! The gateway config an env prints for a local model, and the step limit for short runs.

use apprentice_core::{Config, ContentBlock, FeedbackValue};
use apprentice_envs::{make_env, EnvOptions, Split, TaskId, VariantParams};

#[test]
fn a_local_model_gets_its_models_section_and_the_variant_its_params() {
    let env = make_env("babyai", EnvOptions::default()).unwrap();
    let params = VariantParams { temperature: Some(0.0), top_p: Some(0.9), max_tokens: Some(16), prompt: None };
    let text = env.spec().gateway_config_with("local::smollm2-135m", "student", &params).unwrap();
    let config = Config::parse(&text, "env.toml".as_ref(), "/base".as_ref()).unwrap();
    let model = &config.models["local::smollm2-135m"];
    assert_eq!(model.providers.len(), 1);
    assert!(
        matches!(&model.providers[0].1, apprentice_core::config::ProviderConfig::Local { model, max_context_tokens: None, threads: None, .. } if model == "smollm2-135m"),
        "{:?}",
        model.providers
    );
    let variant = &config.function("babyai::act").unwrap().variants["student"];
    assert_eq!(
        (variant.model.as_str(), variant.temperature, variant.top_p, variant.max_tokens),
        ("local::smollm2-135m", Some(0.0), Some(0.9), Some(16))
    );

    assert_eq!(variant.history_turns, None, "the full style shows the whole conversation");

    // Other models still need their section written by hand.
    let text = env.spec().gateway_config("teacher", "teacher").unwrap();
    assert!(!text.contains("[models"), "{text}");
}

#[test]
fn the_compact_style_renders_only_the_current_observation_briefly() {
    let mut env = make_env("babyai", EnvOptions::default()).unwrap();
    let params = VariantParams { prompt: Some("compact".into()), ..VariantParams::default() };
    let text = env.spec().gateway_config_with("local::smollm2-135m", "student", &params).unwrap();
    let config = Config::parse(&text, "env.toml".as_ref(), "/base".as_ref()).unwrap();
    let function = config.function("babyai::act").unwrap();
    assert_eq!(function.variants["student"].history_turns, Some(1));

    // After two steps the recorded input holds the whole conversation; the compact prompt shows
    // the mission and the newest observation only.
    env.reset(TaskId { split: Split::Train, index: 3 }).unwrap();
    env.step(&[ContentBlock::Text { text: "turn left".into() }]).unwrap();
    let outcome = env.step(&[ContentBlock::Text { text: "turn left".into() }]).unwrap();
    let input = &outcome.observation.input;
    assert_eq!(input.messages.len(), 5);
    let rendered =
        apprentice_core::render::render_input(&config.templates, "babyai::act", Some(function), "student", input)
            .unwrap();
    assert_eq!(rendered.messages.len(), 1);
    let system = rendered.system.unwrap();
    assert!(system.starts_with("Mission: ") && system.contains("turn left, turn right, go forward"), "{system}");
    assert!(!system.contains("The actions:"), "the compact style has no action descriptions: {system}");
    let full = env.spec().functions[0].render("v", input).unwrap();
    assert_eq!(full.messages.len(), 5);

    let unknown = VariantParams { prompt: Some("terse".into()), ..VariantParams::default() };
    let err = env.spec().gateway_config_with("m", "v", &unknown).unwrap_err().to_string();
    assert!(err.contains("terse") && err.contains("compact") && err.contains("full"), "{err}");
}

#[test]
fn the_step_limit_truncates_with_episode_feedback() {
    let mut env = make_env("babyai", EnvOptions { max_steps: Some(2), ..EnvOptions::default() }).unwrap();
    env.reset(TaskId { split: Split::Train, index: 3 }).unwrap();
    let noop = [ContentBlock::Text { text: "I am thinking.".into() }];
    let first = env.step(&noop).unwrap();
    assert!(!first.truncated && !first.terminated && first.feedback.episode.is_empty());
    let second = env.step(&noop).unwrap();
    assert!(second.truncated && !second.terminated);
    assert!(second.feedback.episode.iter().any(|(m, v)| m == "success" && *v == FeedbackValue::Boolean(false)));
    assert!(make_env("babyai", EnvOptions { max_steps: Some(0), ..EnvOptions::default() }).is_err());
}
