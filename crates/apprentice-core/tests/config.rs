//! Invalid configuration fails at load time with the file, the key path and what is wrong.

use std::path::Path;

use apprentice_core::config::{FunctionKind, ProviderConfig, WriteMode};
use apprentice_core::Config;
use serde_json::json;

const VALID: &str = r#"
[store]
path = "data/apprentice.db"
write_mode = "async"

[models.teacher]
routing = ["openai", "backup"]
price = { input_per_million = 0.4, output_per_million = 1.6 }
[models.teacher.providers.openai]
type = "openai"
model_name = "gpt-4.1-mini"
api_key_env = "OPENAI_API_KEY"
[models.teacher.providers.backup]
type = "anthropic"
model_name = "claude-sonnet"

[tools.move]
description = "Move"
parameters = { type = "object", properties = { to = { type = "string" } } }

[functions."babyai::act"]
type = "chat"
tools = ["move"]
system_schema = { type = "object", required = ["mission"], properties = { mission = { type = "string" } } }
[functions."babyai::act".variants.teacher]
model = "teacher"
system_template = "Mission: {{ mission }}"
temperature = 0.7
max_tokens = 64
seed = 7
retries = { num_retries = 2, max_delay_s = 1.0 }

[functions.extract]
type = "json"
output_schema = { type = "object" }
[functions.extract.variants.v]
model = "teacher"

[metrics.success]
type = "boolean"
level = "episode"
optimize = "max"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("apprentice.toml"), Path::new("/base")).map_err(|e| e.to_string())
}

fn replace(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "test fixture lacks {from:?}");
    VALID.replacen(from, to, 1)
}

#[test]
fn valid_config_loads_with_everything_resolved() {
    let config = parse(VALID).unwrap();
    assert_eq!(config.store.path, Path::new("/base/data/apprentice.db"));
    assert_eq!(config.store.write_mode, WriteMode::Async);
    let teacher = &config.models["teacher"];
    assert_eq!(teacher.providers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["openai", "backup"]);
    assert!(
        matches!(&teacher.providers[1].1, ProviderConfig::Anthropic { api_key_env, .. } if api_key_env == "ANTHROPIC_API_KEY")
    );
    assert!((teacher.price.unwrap().cost(1_000_000, 1_000_000, 0.0) - 2.0).abs() < 1e-12);
    // A local model is charged its measured compute time: 30 minutes at 0.5 per hour.
    let local = apprentice_core::config::Price { per_hour: 0.5, ..Default::default() };
    assert!((local.cost(1000, 1000, 1_800_000.0) - 0.25).abs() < 1e-12);
    let act = config.function("babyai::act").unwrap();
    assert_eq!(act.kind, FunctionKind::Chat);
    assert_eq!(config.tools_of(act)[0].name, "move");
    let variant = &act.variants["teacher"];
    assert_eq!(
        (variant.temperature, variant.max_tokens, variant.seed, variant.retries.num_retries),
        (Some(0.7), Some(64), Some(7), 2)
    );
    let rendered =
        config.templates.render("babyai::act", "teacher", "system", &json!({"mission": "open the door"})).unwrap();
    assert_eq!(rendered, "Mission: open the door");
    assert_eq!(config.function("extract").unwrap().kind, FunctionKind::Json);
}

#[test]
fn errors_name_file_key_and_problem() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            replace("model = \"teacher\"\nsystem_template", "model = \"nobody\"\nsystem_template"),
            "`functions.babyai::act.variants.teacher.model`",
            "model `nobody`",
        ),
        (
            replace("routing = [\"openai\", \"backup\"]", "routing = [\"openai\", \"missing\"]"),
            "`models.teacher.routing[1]`",
            "provider `missing`",
        ),
        (replace("tools = [\"move\"]", "tools = [\"jump\"]"), "`functions.babyai::act.tools[0]`", "tool `jump`"),
        (replace("temperature = 0.7", "temperature = 7.0"), "temperature", "between 0 and 2"),
        (replace("temperature = 0.7", "temprature = 0.7"), "temprature", "unknown field"),
        (replace("type = \"boolean\"", "type = \"bool\""), "metrics.success", "unknown variant"),
        (replace("level = \"episode\"", "level = \"session\""), "metrics.success.level", "unknown variant"),
        (
            replace("system_template = \"Mission: {{ mission }}\"", "system_template = \"Mission: {{ mission \""),
            "system_template",
            "syntax",
        ),
        (
            replace("system_template = \"Mission: {{ mission }}\"\n", ""),
            "system_template",
            "required because the function declares `system_schema`",
        ),
        (
            replace("output_schema = { type = \"object\" }", "output_schema = { type = 12 }"),
            "functions.extract.output_schema",
            "invalid JSON schema",
        ),
        (replace("max_tokens = 64", "max_tokens = \"many\""), "max_tokens", "invalid type"),
        (replace("seed = 7", "seed = 7\nhistory_turns = 0"), "history_turns", "at least 1"),
        (replace("type = \"openai\"", "type = \"openia\""), "models.teacher.providers.openai", "unknown variant"),
        (replace("write_mode = \"async\"", "write_mode = \"eventually\""), "store.write_mode", "unknown variant"),
        (replace("[metrics.success]", "[metrics.comment]"), "`metrics.comment`", "built-in"),
    ];
    for (text, key, problem) in cases {
        let err = parse(&text).expect_err(&format!("should fail: {key}"));
        assert!(err.starts_with("apprentice.toml"), "no file in: {err}");
        assert!(err.contains(key), "expected key {key} in: {err}");
        assert!(err.contains(problem), "expected {problem:?} in: {err}");
    }
}

#[test]
fn toml_syntax_errors_carry_the_line() {
    let err = parse("[models.x]\nrouting = [\"a\"\n").unwrap_err();
    assert!(err.starts_with("apprentice.toml:2"), "{err}");
    let err = parse(&replace("max_tokens = 64", "max_tokens = \"many\"")).unwrap_err();
    let line = VALID.lines().position(|l| l.starts_with("max_tokens")).unwrap() + 1;
    assert!(err.starts_with(&format!("apprentice.toml:{line}")), "expected line {line}: {err}");
}

#[test]
fn templates_and_schemas_load_from_files_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    std::fs::write(dir.path().join("t/user.jinja"), "Observation: {{ obs }}").unwrap();
    std::fs::write(dir.path().join("t/user.json"), r#"{"type": "object", "required": ["obs"]}"#).unwrap();
    let text = r#"
[models.m]
routing = ["d"]
[models.m.providers.d]
type = "dummy"
[functions.f]
user_schema = "t/user.json"
[functions.f.variants.v]
model = "m"
user_template = { path = "t/user.jinja" }
"#;
    let path = dir.path().join("apprentice.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let f = config.function("f").unwrap();
    assert!(f.user_schema.as_ref().unwrap().validate(&json!({})).is_err());
    assert_eq!(config.templates.render("f", "v", "user", &json!({"obs": "wall"})).unwrap(), "Observation: wall");

    std::fs::write(&path, text.replace("t/user.jinja", "t/missing.jinja")).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("functions.f.variants.v.user_template") && err.contains("missing.jinja"), "{err}");
}

#[test]
fn local_providers_resolve_paths_and_name_bad_keys() {
    let local = |settings: &str| {
        parse(&format!(
            "[models.\"local::s\"]\nrouting = [\"l\"]\n[models.\"local::s\".providers.l]\ntype = \"local\"\n{settings}\n"
        ))
    };
    let model_of = |config: Config| match &config.models["local::s"].providers[0].1 {
        ProviderConfig::Local { model, .. } => model.clone(),
        other => panic!("not local: {other:?}"),
    };
    // A cached model name stays a name; a relative path is relative to the config's folder.
    assert_eq!(model_of(local("model = \"smollm2-135m\"").unwrap()), "smollm2-135m");
    assert_eq!(model_of(local("model = \"runs/7/student.gguf\"").unwrap()), "/base/runs/7/student.gguf");
    assert_eq!(model_of(local("model = \"/abs/student\"").unwrap()), "/abs/student");
    let config = local("model = \"m\"\nmax_context_tokens = 512\nthreads = 2").unwrap();
    assert!(matches!(
        config.models["local::s"].providers[0].1,
        ProviderConfig::Local { max_context_tokens: Some(512), threads: Some(2), .. }
    ));
    for (settings, key, problem) in [
        ("model = \"\"", "models.local::s.providers.l.model", "must name a cached model"),
        ("model = \"m\"\nmax_context_tokens = 0", "models.local::s.providers.l.max_context_tokens", "at least 1"),
        ("model = \"m\"\nthreads = 0", "models.local::s.providers.l.threads", "at least 1"),
        ("model = \"m\"\ntemperature = 1", "models.local::s.providers.l", "unknown field"),
        ("", "models.local::s.providers.l", "missing field `model`"),
    ] {
        let err = local(settings).expect_err(settings);
        assert!(err.starts_with("apprentice.toml") && err.contains(key) && err.contains(problem), "{settings}: {err}");
    }
}

#[test]
fn history_turns_renders_only_the_last_turns() {
    use apprentice_core::content::{ContentBlock, Input, InputMessage, Role, SystemInput};
    use apprentice_core::record::RenderedBlock;
    use apprentice_core::render::render_input;
    use apprentice_core::ToolResult;

    let config = parse(&replace("seed = 7", "seed = 7\nhistory_turns = 2")).unwrap();
    let act = config.function("babyai::act").unwrap();
    let text = |role, text: &str| InputMessage { role, content: vec![ContentBlock::Text { text: text.into() }] };
    let tool_result = InputMessage {
        role: Role::User,
        content: vec![ContentBlock::ToolResult(ToolResult {
            id: "1".into(),
            name: "move".into(),
            result: "ok".into(),
        })],
    };
    let mut system = serde_json::Map::new();
    system.insert("mission".into(), json!("open the door"));
    let input = Input {
        system: Some(SystemInput::Arguments(system)),
        messages: vec![
            text(Role::User, "u0"),
            text(Role::Assistant, "a0"),
            text(Role::User, "u1"),
            text(Role::Assistant, "a1"),
            // A tool result continues the turn that called the tool; it does not start one.
            tool_result,
            text(Role::Assistant, "a2"),
            text(Role::User, "u3"),
        ],
    };
    let texts = |variant: &str, function: Option<&apprentice_core::config::FunctionConfig>| {
        let rendered = render_input(&config.templates, "babyai::act", function, variant, &input).unwrap();
        assert_eq!(rendered.system.as_deref(), Some("Mission: open the door"));
        rendered
            .messages
            .iter()
            .map(|m| match &m.content[0] {
                RenderedBlock::Text { text } => text.clone(),
                other => format!("{other:?}").chars().take(10).collect(),
            })
            .collect::<Vec<_>>()
    };
    let last_two = texts("teacher", Some(act));
    assert_eq!(last_two.len(), 5, "{last_two:?}");
    assert_eq!((last_two[0].as_str(), last_two[4].as_str()), ("u1", "u3"));

    let mut whole = act.clone();
    whole.variants.get_mut("teacher").unwrap().history_turns = None;
    assert_eq!(texts("teacher", Some(&whole)).len(), 7);
    whole.variants.get_mut("teacher").unwrap().history_turns = Some(10);
    assert_eq!(texts("teacher", Some(&whole)).len(), 7, "more turns than the conversation has keep it all");
}
