//! Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, LiteLLM):
//! inventory from `/v1/models`, OpenAI requests passed through untouched,
//! Ollama-native requests translated (see `translate.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::{ApiKind, InferenceRequest, InferenceResponse, ServeError};
use serde::Deserialize;
use serde_json::{Value, json};

use super::foreign::ForeignApis;
use super::http::HttpBackend;
use super::translate::{self, TextField, collect, json_response, parse_answer};
use super::{Backend, Inventory, LoadedInfo, ModelDetails, ModelEntry};
use crate::config::{BackendConfig, BackendKind};

/// An OpenAI-compatible server.
pub struct OpenAiBackend {
    http: HttpBackend,
    foreign: ForeignApis,
    /// The server answered 404 for `/props`: not llama-server.
    no_props: AtomicBool,
}

#[derive(Deserialize)]
struct ModelList {
    #[serde(default)]
    data: Vec<ModelObject>,
}

#[derive(Deserialize)]
struct ModelObject {
    id: String,
    /// llama-server describes the model it serves here.
    #[serde(default)]
    meta: Option<ModelMeta>,
}

/// llama-server's `meta` of a listed model.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ModelMeta {
    n_params: Option<u64>,
    size: Option<u64>,
    n_ctx: Option<u32>,
    ftype: Option<String>,
}

/// A parameter count as Ollama prints it (`134.52M`, `7.6B`).
fn parameter_size(n: u64) -> String {
    if n >= 1_000_000_000 { format!("{:.1}B", n as f64 / 1e9) } else { format!("{:.2}M", n as f64 / 1e6) }
}

impl OpenAiBackend {
    /// The parallel slots llama-server reports in `/props`; `None` from a
    /// server without it (vLLM, SGLang, cloud APIs), which is then not
    /// asked again.
    async fn slots(&self) -> Option<u32> {
        if self.no_props.load(Ordering::Relaxed) {
            return None;
        }
        let slots = match self.http.get_json::<Value>("/props").await {
            Ok(props) => props.get("total_slots").and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()),
            // Unreachable or slow: ask again at the next refresh.
            Err(ServeError::BackendUnreachable(_) | ServeError::Timeout(_)) => return None,
            // It answered, but not with llama-server's props.
            Err(_) => None,
        };
        if slots.is_none() {
            self.no_props.store(true, Ordering::Relaxed);
        }
        slots
    }

    /// A backend at `config.url` (the base, without `/v1`).
    pub fn new(config: &BackendConfig) -> Result<OpenAiBackend, ServeError> {
        Ok(OpenAiBackend::from_http(HttpBackend::new(config)?))
    }

    /// A backend over an already configured client (cloud providers).
    pub fn from_http(http: HttpBackend) -> OpenAiBackend {
        OpenAiBackend { http, foreign: ForeignApis::default(), no_props: AtomicBool::new(false) }
    }
}

fn to_inventory(list: ModelList) -> Inventory {
    let models = list
        .data
        .into_iter()
        .map(|m| {
            // What the server says about the model (llama-server does);
            // nothing is made up for one that says nothing.
            let meta = m.meta.unwrap_or_default();
            let details = ModelDetails {
                format: if meta.ftype.is_some() { "gguf".into() } else { String::new() },
                parameter_size: meta.n_params.map(parameter_size).unwrap_or_default(),
                quantization_level: meta.ftype.clone().unwrap_or_default(),
                ..ModelDetails::default()
            };
            ModelEntry {
                name: m.id,
                size: meta.size.unwrap_or(0),
                digest: String::new(),
                modified_at: super::first_seen(),
                details,
                // An OpenAI-compatible server lists what it serves now, so
                // every model it lists counts as loaded.
                loaded: Some(LoadedInfo {
                    size_vram: meta.size.unwrap_or(0),
                    context_length: meta.n_ctx.unwrap_or(0),
                    ..LoadedInfo::default()
                }),
            }
        })
        .collect();
    Inventory { models, slots: None }
}

#[async_trait::async_trait]
impl Backend for OpenAiBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Openai
    }

    async fn inventory(&self) -> Result<Inventory, ServeError> {
        let mut inventory = to_inventory(self.http.get_json::<ModelList>("/v1/models").await?);
        inventory.slots = self.slots().await;
        Ok(inventory)
    }

    async fn probe(&self) -> Result<(), ServeError> {
        self.http.probe("/v1/models").await
    }

    async fn serve(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        let path = match req.api {
            ApiKind::OpenaiChat => "/v1/chat/completions",
            ApiKind::OpenaiCompletions => "/v1/completions",
            ApiKind::OpenaiEmbeddings => "/v1/embeddings",
            // llama-server and vLLM serve these natively; translated for
            // servers that do not.
            ApiKind::AnthropicMessages | ApiKind::AnthropicCountTokens | ApiKind::OpenaiResponses => {
                return self.foreign.serve(&self.http, req).await;
            }
            ApiKind::Unspecified => {
                return Err(ServeError::BadRequest("request names no API".into()));
            }
            api if api.is_management() => {
                return Err(ServeError::Unsupported(format!(
                    "this node's backend is an OpenAI-compatible server ({}), which cannot {}; manage its models on that server, or target a node with an Ollama backend",
                    self.http.base(),
                    management_verb(api)
                )));
            }
            _ => return self.serve_native(req).await,
        };
        self.http.post(path, req.body.clone(), &req.request_id, req.meta.stream).await
    }
}

/// What a management API does, for error messages.
fn management_verb(api: ApiKind) -> &'static str {
    match api {
        ApiKind::OllamaPull => "pull models",
        ApiKind::OllamaDelete => "delete models",
        ApiKind::OllamaCopy => "copy models",
        ApiKind::OllamaCreate => "create models",
        _ => "push models",
    }
}

/// What `/api/show` says a model can do. An OpenAI server does not list
/// capabilities; embedding models carry "embed" in their names by a common
/// convention (nomic-embed-text, mxbai-embed-large); one that does not is
/// listed as a completion model.
fn capability(model: &str) -> &'static str {
    if model.to_ascii_lowercase().contains("embed") { "embedding" } else { "completion" }
}

impl OpenAiBackend {
    /// Serves an Ollama-native request by translating it to `/v1/*`.
    async fn serve_native(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        let started = Instant::now();
        let (translated, field) = match req.api {
            // An OpenAI server has nothing to preload; the model is served as
            // listed. Generations always stream from the backend, so the
            // first token's time splits Ollama's durations even when the
            // client wants one answer.
            ApiKind::OllamaChat => match translate::chat_request(&req.body, true)? {
                Some(t) => (t, Some(TextField::Message)),
                None => return Ok(json_response(200, &translate::load_response(&req.meta.model, true))),
            },
            ApiKind::OllamaGenerate => match translate::generate_request(&req.body, true)? {
                Some(t) => (t, Some(TextField::Response)),
                None => return Ok(json_response(200, &translate::load_response(&req.meta.model, false))),
            },
            ApiKind::OllamaEmbed => (translate::embed_request(&req.body, false)?, None),
            ApiKind::OllamaEmbeddings => (translate::embed_request(&req.body, true)?, None),
            ApiKind::OllamaShow => return self.show(&req.meta.model).await,
            _ => return Err(ServeError::BadRequest("not an Ollama API".into())),
        };
        let body = Bytes::from(translated.body.to_string());
        let streamed = field.is_some();
        let upstream = self.http.post(translated.path, body, &req.request_id, streamed).await?;
        if !(200..300).contains(&upstream.status) {
            let bytes = collect(upstream.body).await?;
            let message = translate::error_message(&bytes);
            return Ok(json_response(upstream.status, &json!({ "error": message })));
        }
        let model = req.meta.model.clone();
        let Some(field) = field else {
            let answer = parse_answer(&collect(upstream.body).await?)?;
            let legacy = req.api == ApiKind::OllamaEmbeddings;
            return Ok(json_response(200, &translate::embed_response(&model, &answer, legacy)));
        };
        if !upstream.content_type.starts_with("text/event-stream") {
            // A server that ignored `stream`: one answer, no first-token time.
            let answer = parse_answer(&collect(upstream.body).await?)?;
            let timing = translate::Timing { total: started.elapsed(), first_token: None };
            return Ok(json_response(200, &translate::completion_response(&model, field, &answer, timing)));
        }
        let mut translator = translate::SseToNdjson::new(&model, field);
        let mut body = upstream.body;
        if !req.meta.stream {
            let mut lines = Vec::new();
            while let Some(chunk) = body.next().await {
                let bytes = chunk.map_err(|e| ServeError::BackendUnreachable(e.to_string()))?;
                lines.extend(translator.push(&bytes));
            }
            lines.extend(translator.finish());
            let answer = translate::fold_lines(&lines);
            let status = if answer.get("error").is_some() { 502 } else { 200 };
            return Ok(json_response(status, &answer));
        }
        Ok(InferenceResponse {
            status: 200,
            content_type: "application/x-ndjson".into(),
            body: translate::translated(body, translator),
        })
    }

    /// `/api/show` from what an OpenAI server tells: the model's existence.
    async fn show(&self, model: &str) -> Result<InferenceResponse, ServeError> {
        let inventory = self.inventory().await?;
        let entry = inventory.resolve(model).ok_or_else(|| ServeError::ModelNotFound(model.to_string()))?;
        // llama-server's `/props` has the chat template; other servers
        // have no such endpoint, and the template stays empty.
        let template = match self.http.get_json::<Value>("/props").await {
            Ok(props) => props.get("chat_template").and_then(Value::as_str).unwrap_or_default().to_string(),
            Err(_) => String::new(),
        };
        let mut model_info = serde_json::Map::new();
        if let Some(context) = entry.loaded.as_ref().map(|l| l.context_length).filter(|c| *c > 0) {
            model_info.insert("general.context_length".into(), json!(context));
        }
        Ok(json_response(
            200,
            &json!({
                "modelfile": "", "parameters": "", "template": template,
                "details": entry.details, "model_info": model_info, "capabilities": [capability(model)],
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_models_as_loaded() {
        let list: ModelList = serde_json::from_str(
            r#"{"object":"list","data":[{"id":"SmolLM2-135M-Instruct","object":"model","created":1,"owned_by":"llamacpp"}]}"#,
        )
        .expect("parses");
        let inventory = to_inventory(list);
        assert!(inventory.resolve("SmolLM2-135M-Instruct").is_some_and(|m| m.loaded.is_some()));
    }

    #[test]
    fn llama_servers_model_meta_fills_size_and_details() {
        // As llama-server (b7xxx) lists its model.
        let list: ModelList = serde_json::from_str(
            r#"{"object":"list","data":[{"id":"smol.gguf","object":"model","owned_by":"llamacpp",
                "meta":{"vocab_type":2,"n_vocab":49152,"n_ctx":8192,"n_ctx_train":8192,"n_embd":576,
                "n_params":134515008,"size":96576768,"ftype":"Q4_1"}}]}"#,
        )
        .expect("parses");
        let inventory = to_inventory(list);
        let entry = inventory.resolve("smol.gguf").expect("listed");
        assert_eq!(entry.size, 96_576_768);
        assert_eq!(
            (entry.details.parameter_size.as_str(), entry.details.quantization_level.as_str()),
            ("134.52M", "Q4_1")
        );
        assert_eq!(entry.loaded.as_ref().map(|l| l.context_length), Some(8192));
    }
}
