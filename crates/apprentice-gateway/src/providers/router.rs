//! Per-model routing: providers tried in the configured order, the first that answers wins.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use apprentice_core::config::{ModelConfig, Price, ProviderConfig};
use apprentice_core::Config;

use super::anthropic::AnthropicProvider;
use super::dummy::DummyProvider;
use super::http::HttpSettings;
use super::local::{LocalProvider, ServingSettings};
use super::openai::OpenAiProvider;
use super::{ChunkStream, ModelRequest, Provider, ProviderError, ProviderResponse};

/// A value from the provider that produced it.
#[derive(Debug)]
pub struct Routed<T> {
    pub provider_name: String,
    pub value: T,
    /// Failures of earlier providers that were skipped, in routing order.
    pub failures: Vec<(String, ProviderError)>,
}

/// Every provider of a model failed; each attempt is listed in routing order.
#[derive(Debug, thiserror::Error)]
#[error("every provider of model `{model}` failed: {}", Attempts(.failures))]
pub struct AllProvidersFailed {
    pub model: String,
    pub failures: Vec<(String, ProviderError)>,
}

struct Attempts<'a>(&'a [(String, ProviderError)]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (provider, error)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "[{provider}] {error}")?;
        }
        Ok(())
    }
}

pub struct ModelRouter {
    model: String,
    providers: Vec<(String, Arc<dyn Provider>)>,
    price: Option<Price>,
}

impl fmt::Debug for ModelRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelRouter")
            .field("model", &self.model)
            .field("providers", &self.provider_names().collect::<Vec<_>>())
            .field("price", &self.price)
            .finish()
    }
}

impl ModelRouter {
    /// A router over ready-made providers (tests, or providers the config cannot describe).
    pub fn new(model: impl Into<String>, providers: Vec<(String, Arc<dyn Provider>)>, price: Option<Price>) -> Self {
        Self { model: model.into(), providers, price }
    }

    /// Builds every provider of the model. A provider that cannot be built (e.g. its key variable
    /// is unset) is an error now rather than a failure on every call later.
    pub fn from_config(
        model_name: &str,
        config: &ModelConfig,
        client: &reqwest::Client,
    ) -> Result<Self, ProviderError> {
        let providers = config
            .providers
            .iter()
            .map(|(name, provider)| {
                build_provider(name, provider, client)
                    .map(|built| (name.clone(), built))
                    .map_err(|e| locate(model_name, name, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Tokens generated in-process cost nothing: a model served only locally is priced at 0.
        let all_local = config.providers.iter().all(|(_, p)| matches!(p, ProviderConfig::Local { .. }));
        let price = config.price.or(all_local.then(Price::default));
        Ok(Self::new(model_name, providers, price))
    }

    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// Provider names in routing order.
    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.providers.iter().map(|(name, _)| name.as_str())
    }

    pub fn price(&self) -> Option<Price> {
        self.price
    }

    pub async fn infer(&self, request: &ModelRequest) -> Result<Routed<ProviderResponse>, AllProvidersFailed> {
        let mut failures = Vec::new();
        for (name, provider) in &self.providers {
            match provider.infer(request).await {
                Ok(value) => return Ok(Routed { provider_name: name.clone(), value, failures }),
                Err(error) => self.skip(name, error, &mut failures),
            }
        }
        Err(AllProvidersFailed { model: self.model.clone(), failures })
    }

    /// Falls back only on errors before the stream starts: once chunks may have reached the
    /// client, switching provider would splice two different answers.
    pub async fn infer_stream(&self, request: &ModelRequest) -> Result<Routed<ChunkStream>, AllProvidersFailed> {
        let mut failures = Vec::new();
        for (name, provider) in &self.providers {
            match provider.infer_stream(request).await {
                Ok(value) => return Ok(Routed { provider_name: name.clone(), value, failures }),
                Err(error) => self.skip(name, error, &mut failures),
            }
        }
        Err(AllProvidersFailed { model: self.model.clone(), failures })
    }

    fn skip(&self, provider: &str, error: ProviderError, failures: &mut Vec<(String, ProviderError)>) {
        tracing::warn!(model = %self.model, provider, %error, "provider failed; trying the next one");
        failures.push((provider.to_string(), error));
    }
}

/// Builds one provider from its configuration; `name` is its name in the model's routing.
pub fn build_provider(
    name: &str,
    config: &ProviderConfig,
    client: &reqwest::Client,
) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match config {
        ProviderConfig::Openai { model_name, api_base, api_key_env, timeout_s } => {
            let settings = HttpSettings::resolve(name, model_name, api_base, api_key_env.as_deref(), *timeout_s)?;
            Arc::new(OpenAiProvider::new(name, settings, client.clone()))
        }
        ProviderConfig::Anthropic { model_name, api_base, api_key_env, timeout_s } => {
            let settings = HttpSettings::resolve(name, model_name, api_base, Some(api_key_env), *timeout_s)?;
            Arc::new(AnthropicProvider::new(name, settings, client.clone()))
        }
        ProviderConfig::Local {
            model,
            max_context_tokens,
            threads,
            weights,
            max_batch,
            prefill_chunk_tokens,
            prefix_cache_mb,
        } => {
            let serving =
                ServingSettings::from_config(*weights, *threads, *max_batch, *prefill_chunk_tokens, *prefix_cache_mb);
            Arc::new(LocalProvider::from_config(name, model, *max_context_tokens, serving)?)
        }
        ProviderConfig::Dummy { behavior, content } => Arc::new(DummyProvider::new(name, *behavior, content.clone())),
    })
}

/// One router per configured model, keyed by model name.
pub fn build_routers(
    config: &Config,
    client: &reqwest::Client,
) -> Result<BTreeMap<String, Arc<ModelRouter>>, ProviderError> {
    config
        .models
        .iter()
        .map(|(name, model)| Ok((name.clone(), Arc::new(ModelRouter::from_config(name, model, client)?))))
        .collect()
}

/// Startup errors name the configuration key, as config errors do, so the user knows where to look.
fn locate(model: &str, provider: &str, error: ProviderError) -> ProviderError {
    match error {
        ProviderError::Config { message, .. } => {
            ProviderError::Config { provider: format!("models.{model}.providers.{provider}"), message }
        }
        other => other,
    }
}
