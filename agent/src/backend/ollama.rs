//! Ollama: inventory from `/api/tags` and `/api/ps`; OpenAI requests go to
//! its `/v1/*` endpoints and native requests to `/api/*`, bodies untouched.

use llmesh_mesh::{ApiKind, InferenceRequest, InferenceResponse, ServeError};
use serde::Deserialize;

use super::foreign::ForeignApis;
use super::http::HttpBackend;
use super::{Backend, Inventory, LoadedInfo, ModelDetails, ModelEntry};
use crate::config::{BackendConfig, BackendKind};

/// A local (or remote) Ollama server.
pub struct OllamaBackend {
    http: HttpBackend,
    foreign: ForeignApis,
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    models: Vec<Tag>,
}

#[derive(Deserialize)]
struct Tag {
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    modified_at: String,
    #[serde(default)]
    details: ModelDetails,
}

#[derive(Deserialize)]
struct PsList {
    #[serde(default)]
    models: Vec<Running>,
}

#[derive(Deserialize)]
struct Running {
    name: String,
    #[serde(default)]
    size_vram: u64,
    #[serde(default)]
    expires_at: String,
    #[serde(default)]
    context_length: u32,
}

impl OllamaBackend {
    /// An Ollama backend at `config.url`.
    pub fn new(config: &BackendConfig) -> Result<OllamaBackend, ServeError> {
        Ok(OllamaBackend { http: HttpBackend::new(config)?, foreign: ForeignApis::default() })
    }
}

/// The Ollama path serving each API, bodies passed through as they are
/// (the simulated backend serves the same paths).
pub(crate) fn path_for(api: ApiKind) -> Result<&'static str, ServeError> {
    Ok(match api {
        ApiKind::OpenaiChat => "/v1/chat/completions",
        ApiKind::OpenaiCompletions => "/v1/completions",
        ApiKind::OpenaiEmbeddings => "/v1/embeddings",
        ApiKind::OllamaChat => "/api/chat",
        ApiKind::OllamaGenerate => "/api/generate",
        ApiKind::OllamaEmbed => "/api/embed",
        ApiKind::OllamaEmbeddings => "/api/embeddings",
        ApiKind::OllamaShow => "/api/show",
        ApiKind::AnthropicMessages => "/v1/messages",
        ApiKind::AnthropicCountTokens => "/v1/messages/count_tokens",
        ApiKind::OpenaiResponses => "/v1/responses",
        ApiKind::OllamaPull => "/api/pull",
        ApiKind::OllamaDelete => "/api/delete",
        ApiKind::OllamaCopy => "/api/copy",
        ApiKind::OllamaCreate => "/api/create",
        ApiKind::OllamaPush => "/api/push",
        ApiKind::Unspecified => return Err(ServeError::BadRequest("request names no API".into())),
    })
}

fn merge(tags: TagList, ps: PsList) -> Inventory {
    let models = tags
        .models
        .into_iter()
        .map(|tag| {
            let loaded = ps.models.iter().find(|r| r.name == tag.name).map(|r| LoadedInfo {
                size_vram: r.size_vram,
                expires_at: r.expires_at.clone(),
                context_length: r.context_length,
            });
            ModelEntry {
                name: tag.name,
                size: tag.size,
                digest: tag.digest,
                modified_at: tag.modified_at,
                details: tag.details,
                loaded,
            }
        })
        .collect();
    Inventory { models, slots: None }
}

#[async_trait::async_trait]
impl Backend for OllamaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Ollama
    }

    async fn inventory(&self) -> Result<Inventory, ServeError> {
        let (tags, ps) =
            tokio::try_join!(self.http.get_json::<TagList>("/api/tags"), self.http.get_json::<PsList>("/api/ps"))?;
        Ok(merge(tags, ps))
    }

    async fn probe(&self) -> Result<(), ServeError> {
        self.http.probe("/api/version").await
    }

    async fn serve(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        if matches!(req.api, ApiKind::AnthropicMessages | ApiKind::AnthropicCountTokens | ApiKind::OpenaiResponses) {
            // Native since Ollama 0.14 and 0.13.3; translated before.
            return self.foreign.serve(&self.http, req).await;
        }
        // Ollama's only body-carrying DELETE.
        let method = if req.api == ApiKind::OllamaDelete { http::Method::DELETE } else { http::Method::POST };
        self.http.send(method, path_for(req.api)?, req.body.clone(), &req.request_id, req.meta.stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_tags_with_running_models() {
        let tags: TagList = serde_json::from_str(
            r#"{"models":[{"name":"llama3:latest","model":"llama3:latest","modified_at":"2024-05-01T10:00:00Z",
                "size":4661224676,"digest":"365c0bd3c000","details":{"parent_model":"","format":"gguf",
                "family":"llama","families":["llama"],"parameter_size":"8.0B","quantization_level":"Q4_0"}},
               {"name":"nomic-embed-text:latest","size":274302450,"digest":"0a109f422b47"}]}"#,
        )
        .expect("tags parse");
        let ps: PsList = serde_json::from_str(
            r#"{"models":[{"name":"llama3:latest","model":"llama3:latest","size":6654289920,
                "digest":"365c0bd3c000","expires_at":"2024-06-04T14:38:31.83753-07:00","size_vram":6654289920,
                "context_length":8192}]}"#,
        )
        .expect("ps parse");
        let inventory = merge(tags, ps);
        assert_eq!(inventory.models.len(), 2);
        let llama = inventory.resolve("llama3").expect("resolves");
        assert_eq!(llama.details.quantization_level, "Q4_0");
        assert_eq!(llama.loaded.as_ref().map(|l| l.context_length), Some(8192));
        assert!(inventory.resolve("nomic-embed-text").is_some_and(|m| m.loaded.is_none()));
    }

    #[test]
    fn every_api_has_a_path() {
        assert_eq!(path_for(ApiKind::OllamaEmbeddings).ok(), Some("/api/embeddings"));
        assert_eq!(path_for(ApiKind::OpenaiChat).ok(), Some("/v1/chat/completions"));
        assert!(path_for(ApiKind::Unspecified).is_err());
    }
}
