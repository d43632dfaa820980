//! Variant templates (MiniJinja, with Python-compatible string methods so templates written for
//! Jinja2 render the same). Undefined variables are errors: a template that silently renders an
//! empty string for a missing argument would corrupt every recorded prompt.

use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

#[derive(Clone)]
pub struct Templates {
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").field("count", &self.env.templates().count()).finish()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

fn key(function: &str, variant: &str, template: &str) -> String {
    format!("{function}/{variant}/{template}")
}

impl Templates {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        Self { env: Arc::new(env) }
    }

    /// Compiles and registers a template; the error says what does not parse and where.
    pub fn add(&mut self, function: &str, variant: &str, template: &str, source: String) -> Result<(), String> {
        let env = Arc::get_mut(&mut self.env).ok_or("templates are frozen once shared")?;
        env.add_template_owned(key(function, variant, template), source).map_err(describe)
    }

    pub fn has(&self, function: &str, variant: &str, template: &str) -> bool {
        self.env.get_template(&key(function, variant, template)).is_ok()
    }

    pub fn render(&self, function: &str, variant: &str, template: &str, arguments: &Value) -> Result<String, String> {
        let tmpl = self
            .env
            .get_template(&key(function, variant, template))
            .map_err(|_| format!("variant `{variant}` has no `{template}` template"))?;
        tmpl.render(arguments).map_err(describe)
    }
}

fn describe(e: minijinja::Error) -> String {
    let mut text = e.to_string();
    if let Some(line) = e.line() {
        if !text.contains("line") {
            text.push_str(&format!(" (template line {line})"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_with_python_string_methods() {
        let mut t = Templates::new();
        t.add("f", "v", "user", "Mission: {{ mission.upper() }} ({{ steps }} steps)".into()).unwrap();
        let out = t.render("f", "v", "user", &json!({"mission": "go to the ball", "steps": 3})).unwrap();
        assert_eq!(out, "Mission: GO TO THE BALL (3 steps)");
    }

    #[test]
    fn missing_argument_is_an_error_not_an_empty_string() {
        let mut t = Templates::new();
        t.add("f", "v", "user", "Hello {{ name }}".into()).unwrap();
        let err = t.render("f", "v", "user", &json!({})).unwrap_err();
        assert!(err.contains("undefined"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported_at_add_time() {
        let mut t = Templates::new();
        let err = t.add("f", "v", "user", "Hello {{ name ".into()).unwrap_err();
        assert!(err.contains("syntax") || err.contains("expected"), "{err}");
        assert!(!t.has("f", "v", "user"));
    }
}
