//! Cloud fallback: OpenAI-compatible aggregators (OpenRouter, LiteLLM, any
//! `/v1` URL) for requests the mesh cannot serve, where the request's
//! policy allows it. Providers are tried in order; each has a circuit
//! breaker and bounded retries before the first byte; bodies stream
//! through untouched (Ollama-native requests are translated as for an
//! OpenAI-compatible backend); usage and spend are recorded per API key and
//! provider.

pub mod breaker;
pub use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::{InferenceRequest, InferenceResponse, ServeError};
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::backend::http::{HttpBackend, HttpTarget};
use crate::backend::openai::OpenAiBackend;
use crate::config::{CloudConfig, Price, ProviderConfig};
use crate::usage::{Tokens, UsageMeter};
use breaker::Breaker;

/// Why the cloud layer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// A provider's API key could not be read.
    #[error("cloud provider {provider}: {reason}")]
    ApiKey {
        /// Which provider.
        provider: String,
        /// What went wrong (never the key itself).
        reason: String,
    },
    /// A provider's client could not be built.
    #[error("cloud provider {provider}: {source}")]
    Client {
        /// Which provider.
        provider: String,
        /// Why.
        source: ServeError,
    },
}

struct Provider {
    name: String,
    backend: OpenAiBackend,
    models: BTreeMap<String, String>,
    prices: BTreeMap<String, Price>,
    response_timeout: Duration,
    breaker: Mutex<Breaker>,
}

/// Spend of one API key at one provider.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spend {
    /// Requests served.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Requests whose tokens were estimated (no usage report).
    pub estimated: u64,
    /// US dollars at the configured prices.
    pub cost_usd: f64,
}

/// The configured providers and what they have served.
pub struct Cloud {
    providers: Vec<Provider>,
    config: CloudConfig,
    ledger: Arc<Mutex<Ledger>>,
}

/// Spend by (API key, provider).
type Ledger = BTreeMap<(String, String), Spend>;

fn api_key(provider: &ProviderConfig) -> Result<Option<String>, CloudError> {
    let fail = |reason: String| CloudError::ApiKey { provider: provider.name.clone(), reason };
    if let Some(var) = &provider.api_key_env {
        return match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
            _ => Err(fail(format!("environment variable {var} (api_key_env) is not set"))),
        };
    }
    if let Some(path) = &provider.api_key_file {
        let key = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        return Ok(Some(key.trim().to_string()).filter(|k| !k.is_empty()));
    }
    Ok(None)
}

/// Rewrites the body's `model` for the provider.
fn with_model(body: &Bytes, model: &str) -> Result<Bytes, ServeError> {
    let mut value: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| ServeError::BadRequest(format!("invalid request body: {e}")))?;
    value.insert("model".into(), Value::String(model.to_string()));
    serde_json::to_vec(&value).map(Bytes::from).map_err(|e| ServeError::Internal(e.to_string()))
}

async fn error_text(response: InferenceResponse) -> String {
    let mut body = response.body;
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.extend_from_slice(&chunk);
        if text.len() > 4096 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message").or_else(|| v.get("error")).and_then(Value::as_str).map(str::to_string)
        })
        .unwrap_or(text)
        .chars()
        .take(300)
        .collect()
}

/// What one attempt at one provider came to.
enum Attempt {
    /// A response to relay (success, or the client's own mistake).
    Relay(InferenceResponse),
    /// Worth retrying here (connect error, timeout, 429, 5xx).
    Retry(String),
    /// Not this provider (bad key, unknown model): try the next.
    Next(String),
    /// The request itself is at fault: no provider would take it.
    Fail(ServeError),
}

impl Cloud {
    /// The cloud layer, or `None` when no provider is configured.
    pub fn from_config(config: &CloudConfig) -> Result<Option<Arc<Cloud>>, CloudError> {
        if config.providers.is_empty() {
            return Ok(None);
        }
        let mut providers = Vec::new();
        for p in &config.providers {
            let base = p.base_url.trim_end_matches('/');
            let base = base.strip_suffix("/v1").unwrap_or(base).to_string();
            let http = HttpBackend::for_target(HttpTarget {
                base,
                api_key: api_key(p)?,
                headers: p.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                connect_timeout: p.connect_timeout,
                allow_https: true,
            })
            .map_err(|source| CloudError::Client { provider: p.name.clone(), source })?;
            providers.push(Provider {
                name: p.name.clone(),
                backend: OpenAiBackend::from_http(http),
                models: p.models.clone(),
                prices: p.prices.clone(),
                response_timeout: p.response_timeout,
                breaker: Mutex::new(Breaker::new(config.breaker_failures, config.breaker_cooldown)),
            });
        }
        Ok(Some(Arc::new(Cloud { providers, config: config.clone(), ledger: Arc::default() })))
    }

    /// Whether some provider serves `model`.
    pub fn maps(&self, model: &str) -> bool {
        self.providers.iter().any(|p| p.models.contains_key(model))
    }

    /// Every mapped model with the first provider that serves it.
    pub fn models(&self) -> Vec<(String, String)> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for p in &self.providers {
            for model in p.models.keys() {
                out.entry(model.clone()).or_insert_with(|| p.name.clone());
            }
        }
        out.into_iter().collect()
    }

    /// Expected mesh wait beyond which overflow may go to the cloud.
    pub fn overflow_after(&self) -> Duration {
        self.config.overflow_after
    }

    /// Serves `req` at the first provider that can: returns the response
    /// and the provider's name. Only fails before the first byte.
    pub async fn serve(&self, req: &InferenceRequest) -> Result<(InferenceResponse, String), ServeError> {
        let tenant = req.meta.tenant.as_str();
        let mut tried = Vec::new();
        for provider in self.providers.iter().filter(|p| p.models.contains_key(&req.meta.model)) {
            if !provider.breaker.lock().unwrap_or_else(PoisonError::into_inner).allow(Instant::now()) {
                tried.push(format!("{}: circuit open after repeated failures", provider.name));
                continue;
            }
            let target = &provider.models[&req.meta.model];
            let mut upstream = req.clone();
            upstream.body = with_model(&req.body, target)?;
            let mut backoff = self.config.retry_backoff;
            let attempts = self.config.attempts.max(1);
            for attempt in 1..=attempts {
                match self.attempt(provider, &upstream).await {
                    Attempt::Relay(mut response) => {
                        provider.breaker.lock().unwrap_or_else(PoisonError::into_inner).success();
                        // The answer names the mesh's model, not the provider's id.
                        response.body =
                            crate::api::model_name::rename(response.body, target.clone(), req.meta.model.clone());
                        tracing::info!(provider = %provider.name, model = %req.meta.model, upstream = %target, "served by the cloud");
                        let response = self.metered(response, provider, &req.meta.model, tenant, req.body.len());
                        return Ok((response, provider.name.clone()));
                    }
                    Attempt::Retry(why) => {
                        provider.breaker.lock().unwrap_or_else(PoisonError::into_inner).failure(Instant::now());
                        tracing::warn!(provider = %provider.name, attempt, error = %why, "cloud provider failed");
                        if attempt == attempts {
                            tried.push(format!("{}: {why}", provider.name));
                        } else {
                            tokio::time::sleep(backoff).await;
                            backoff *= 2;
                        }
                    }
                    Attempt::Fail(err) => return Err(err),
                    Attempt::Next(why) => {
                        provider.breaker.lock().unwrap_or_else(PoisonError::into_inner).failure(Instant::now());
                        tracing::warn!(provider = %provider.name, error = %why, "cloud provider refused");
                        tried.push(format!("{}: {why}", provider.name));
                        break;
                    }
                }
            }
        }
        if tried.is_empty() {
            return Err(ServeError::ModelNotFound(req.meta.model.clone()));
        }
        Err(ServeError::BackendUnavailable(format!(
            "no cloud provider could serve '{}' ({})",
            req.meta.model,
            tried.join("; ")
        )))
    }

    async fn attempt(&self, provider: &Provider, req: &InferenceRequest) -> Attempt {
        let outcome = tokio::time::timeout(provider.response_timeout, provider.backend.serve(req)).await;
        match outcome {
            Err(_) => Attempt::Retry(format!("no response within {:?}", provider.response_timeout)),
            Ok(Err(err)) if err.is_retryable() => Attempt::Retry(err.message().to_string()),
            Ok(Err(err)) => Attempt::Fail(err),
            Ok(Ok(response)) => match response.status {
                200..=399 => Attempt::Relay(response),
                401 | 403 => Attempt::Next(format!("refused our API key ({})", error_text(response).await)),
                404 => Attempt::Next(format!("does not know the model ({})", error_text(response).await)),
                408 | 429 | 500..=599 => {
                    let status = response.status;
                    Attempt::Retry(format!("answered {status} ({})", error_text(response).await))
                }
                // The client's own mistake (400, 413, 422): relay it as is.
                _ => Attempt::Relay(response),
            },
        }
    }

    /// Wraps the body so that its usage lands in the ledger when it ends.
    fn metered(
        &self,
        response: InferenceResponse,
        provider: &Provider,
        model: &str,
        tenant: &str,
        prompt_bytes: usize,
    ) -> InferenceResponse {
        let price = provider.prices.get(model).copied().unwrap_or_default();
        let key = (tenant.to_string(), provider.name.clone());
        let ledger = self.ledger.clone();
        let mut body = response.body;
        let stream = async_stream::stream! {
            let mut meter = UsageMeter::new(prompt_bytes);
            while let Some(chunk) = body.next().await {
                if let Ok(bytes) = &chunk {
                    meter.push(bytes);
                }
                yield chunk;
            }
            record(&ledger, key, meter.finish(), price);
        };
        InferenceResponse { status: response.status, content_type: response.content_type, body: Box::pin(stream) }
    }

    /// Providers with their breaker state, and spend per key and provider.
    pub fn status(&self) -> Value {
        let now = Instant::now();
        let providers: Vec<Value> = self
            .providers
            .iter()
            .map(|p| {
                let breaker = p.breaker.lock().unwrap_or_else(PoisonError::into_inner);
                json!({
                    "name": p.name,
                    "models": p.models,
                    "breaker": breaker.state(now).as_str(),
                    "breaker_opened": breaker.times_opened(),
                })
            })
            .collect();
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let spend: Vec<Value> = ledger
            .iter()
            .map(|((tenant, provider), s)| {
                json!({
                    "key": tenant, "provider": provider, "requests": s.requests,
                    "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                    "estimated_requests": s.estimated, "cost_usd": s.cost_usd,
                })
            })
            .collect();
        json!({
            "providers": providers,
            "overflow_after_ms": self.config.overflow_after.as_millis() as u64,
            "default_policy": self.config.default_policy,
            "spend": spend,
        })
    }

    /// The default policy for requests that set none.
    pub fn default_policy(&self) -> crate::config::CloudPolicyName {
        self.config.default_policy
    }
}

fn record(ledger: &Mutex<Ledger>, key: (String, String), tokens: Tokens, price: Price) {
    let mut ledger = ledger.lock().unwrap_or_else(PoisonError::into_inner);
    let spend = ledger.entry(key.clone()).or_default();
    spend.requests += 1;
    spend.prompt_tokens += tokens.prompt;
    spend.completion_tokens += tokens.completion;
    spend.estimated += u64::from(!tokens.exact);
    let cost =
        (tokens.prompt as f64 * price.input_per_mtok + tokens.completion as f64 * price.output_per_mtok) / 1_000_000.0;
    spend.cost_usd += cost;
    crate::metrics::cloud_spend(&key.1, &key.0, cost, tokens.prompt + tokens.completion);
}

#[async_trait::async_trait]
impl llmesh_mesh::route::Fallback for Cloud {
    fn maps(&self, model: &str) -> bool {
        Cloud::maps(self, model)
    }

    fn overflow_after(&self) -> Duration {
        Cloud::overflow_after(self)
    }

    async fn serve(&self, req: &InferenceRequest) -> Result<(InferenceResponse, String), ServeError> {
        Cloud::serve(self, req).await
    }
}
