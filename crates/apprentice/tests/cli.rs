//! The binary refuses a bad configuration at start-up, naming the file, the key and the problem.

use std::process::Command;

fn apprentice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apprentice")).args(args).output().expect("run apprentice")
}

#[test]
fn bad_config_stops_serve_and_check_with_file_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apprentice.toml");
    std::fs::write(
        &path,
        r#"
[models.m]
routing = ["d"]
[models.m.providers.d]
type = "dummy"

[functions.f]
[functions.f.variants.v]
model = "missing"
"#,
    )
    .unwrap();
    let path = path.to_str().unwrap();
    for command in ["serve", "check"] {
        let out = apprentice(&[command, "--config", path]);
        assert!(!out.status.success(), "{command} accepted a bad config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(path), "{command}: no file in {stderr}");
        assert!(stderr.contains("functions.f.variants.v.model"), "{command}: no key in {stderr}");
        assert!(stderr.contains("model `missing`"), "{command}: no problem in {stderr}");
    }
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apprentice.toml");
    std::fs::write(&path, "[models.m]\nrouting = [\"d\"]\n[models.m.providers.d]\ntype = \"dummy\"\n").unwrap();
    let out = apprentice(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (0 functions, 1 models"));
}

#[test]
fn missing_config_file_is_named() {
    let out = apprentice(&["check", "--config", "/nonexistent/apprentice.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/apprentice.toml") && stderr.contains("cannot read config"), "{stderr}");
}
