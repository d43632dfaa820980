//! Runs the real `apprentice serve` binary as a child process on a loopback port.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct ServedGateway {
    pub child: Child,
    pub url: String,
    pub db: PathBuf,
}

pub fn config(write_mode: &str) -> String {
    format!(
        r#"
[gateway]
bind = "127.0.0.1:0"

[store]
path = "apprentice.db"
write_mode = "{write_mode}"

[models.echo]
routing = ["dummy"]
price = {{ input_per_million = 1.0, output_per_million = 4.0 }}
[models.echo.providers.dummy]
type = "dummy"
behavior = "echo"

[functions.act]
type = "chat"
user_schema = {{ type = "object", required = ["observation"], properties = {{ observation = {{ type = "string" }} }} }}
[functions.act.variants.only]
model = "echo"
user_template = "You see {{{{ observation }}}}."

[metrics.success]
type = "boolean"
level = "episode"
optimize = "max"
"#
    )
}

/// Starts `apprentice serve` in `dir` and waits until it says where it listens.
pub fn serve(dir: &Path, config_text: &str) -> ServedGateway {
    let config_path = dir.join("apprentice.toml");
    std::fs::write(&config_path, config_text).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_apprentice"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("APPRENTICE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start apprentice serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    ServedGateway { child, url: format!("http://{addr}"), db: dir.join("apprentice.db") }
}
