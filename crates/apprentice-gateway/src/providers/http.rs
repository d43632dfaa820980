//! What the HTTP providers share: settings, sending a request, and turning reqwest's and the
//! upstream's failures into [`ProviderError`]s.

use std::error::Error as _;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::ProviderError;

/// Upstream error bodies can be whole HTML pages; the first 2 KB say what went wrong.
const MAX_ERROR_BODY: usize = 2048;

/// Connection settings of an HTTP provider, already resolved (the key read from its variable).
#[derive(Clone)]
pub struct HttpSettings {
    /// The model name the upstream knows, e.g. `gpt-4.1-mini`.
    pub model_name: String,
    /// Base URL without the endpoint, e.g. `https://api.openai.com/v1`.
    pub api_base: String,
    pub api_key: Option<String>,
    /// Limit for one whole request, streamed body included.
    pub timeout: Duration,
}

impl std::fmt::Debug for HttpSettings {
    // Hand-written so that logging a provider never prints its key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("model_name", &self.model_name)
            .field("api_base", &self.api_base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpSettings {
    /// Resolves configuration values: reads the key from the environment variable `api_key_env`
    /// names, and checks the timeout, so that a misconfigured provider fails at startup.
    pub fn resolve(
        provider: &str,
        model_name: &str,
        api_base: &str,
        api_key_env: Option<&str>,
        timeout_s: f64,
    ) -> Result<Self, ProviderError> {
        let api_key = api_key_env.map(|var| read_key(provider, var)).transpose()?;
        let timeout = Duration::try_from_secs_f64(timeout_s).map_err(|_| ProviderError::Config {
            provider: provider.to_string(),
            message: format!("timeout_s = {timeout_s} is not a usable duration"),
        })?;
        Ok(Self {
            model_name: model_name.to_string(),
            api_base: api_base.trim_end_matches('/').to_string(),
            api_key,
            timeout,
        })
    }

    pub(crate) fn url(&self, endpoint: &str) -> String {
        format!("{}/{endpoint}", self.api_base)
    }
}

fn read_key(provider: &str, var: &str) -> Result<String, ProviderError> {
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_string()),
        Ok(_) => Err(ProviderError::Config {
            provider: provider.to_string(),
            message: format!("environment variable `{var}` (the API key) is empty"),
        }),
        Err(_) => Err(ProviderError::Config {
            provider: provider.to_string(),
            message: format!("environment variable `{var}` (the API key) is not set"),
        }),
    }
}

/// Sends `request` and returns the response if its status is 2xx; otherwise a `Status` error
/// carrying the (truncated) body, which is where upstreams explain themselves.
pub(crate) async fn send(provider: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ProviderError> {
    let response = request.send().await.map_err(|e| transport(provider, &e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    // The body is only for the message: failing to read it must not hide the status.
    let body = response.text().await.unwrap_or_else(|e| format!("<unreadable body: {e}>"));
    Err(ProviderError::Status {
        provider: provider.to_string(),
        status: status.as_u16(),
        body: truncate(&body, MAX_ERROR_BODY),
    })
}

/// Reads a whole JSON body into `T`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    provider: &str,
    response: reqwest::Response,
) -> Result<T, ProviderError> {
    let bytes = response.bytes().await.map_err(|e| transport(provider, &e))?;
    serde_json::from_slice(&bytes).map_err(|e| ProviderError::Protocol {
        provider: provider.to_string(),
        message: format!("{e}; body: {}", truncate(&String::from_utf8_lossy(&bytes), MAX_ERROR_BODY)),
    })
}

/// reqwest's top-level message ("error sending request") hides the cause; the source chain has it.
pub(crate) fn transport(provider: &str, error: &reqwest::Error) -> ProviderError {
    let mut message = if error.is_timeout() { format!("timed out: {error}") } else { error.to_string() };
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    ProviderError::Transport { provider: provider.to_string(), message }
}

pub(crate) fn protocol(provider: &str, message: impl Into<String>) -> ProviderError {
    ProviderError::Protocol { provider: provider.to_string(), message: message.into() }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_char_boundaries() {
        let text = "é".repeat(10);
        let cut = truncate(&text, 5);
        assert!(cut.starts_with("éé…"), "{cut}");
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn missing_key_variable_is_named() {
        let err = HttpSettings::resolve("p", "m", "http://x/", Some("APPRENTICE_TEST_SURELY_UNSET_VAR"), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("APPRENTICE_TEST_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn infinite_timeout_is_a_config_error() {
        assert!(HttpSettings::resolve("p", "m", "http://x", None, f64::INFINITY).is_err());
        let ok = HttpSettings::resolve("p", "m", "http://x/", None, 2.5).unwrap();
        assert_eq!(ok.url("chat/completions"), "http://x/chat/completions");
    }
}
