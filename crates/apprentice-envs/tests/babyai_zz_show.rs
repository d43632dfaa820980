use apprentice_core::ContentBlock;
use apprentice_envs::babyai::BabyAi;
use apprentice_envs::Env;
#[test]
fn show() {
    let mut env = BabyAi::new();
    env.reset("train/2".parse().unwrap()).unwrap();
    let out = env.step(&[ContentBlock::Text { text: "blah".into() }]).unwrap();
    let out2 = env.step(&[ContentBlock::Text { text: "turn left".into() }]).unwrap();
    let _ = out;
    let r = env.spec().functions[0].render("v", &out2.observation.input).unwrap();
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    println!("{}", env.render_ascii());
}
