//! Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, LiteLLM):
//! inventory from `/v1/models`, OpenAI requests passed through untouched.

use llmesh_mesh::{ApiKind, InferenceRequest, InferenceResponse, ServeError};
use serde::Deserialize;

use super::http::HttpBackend;
use super::{Backend, Inventory, LoadedInfo, ModelDetails, ModelEntry};
use crate::config::{BackendConfig, BackendKind};

/// An OpenAI-compatible server.
pub struct OpenAiBackend {
    http: HttpBackend,
}

#[derive(Deserialize)]
struct ModelList {
    #[serde(default)]
    data: Vec<ModelObject>,
}

#[derive(Deserialize)]
struct ModelObject {
    id: String,
}

impl OpenAiBackend {
    /// A backend at `config.url` (the base, without `/v1`).
    pub fn new(config: &BackendConfig) -> Result<OpenAiBackend, ServeError> {
        Ok(OpenAiBackend {
            http: HttpBackend::new(config)?,
        })
    }
}

fn to_inventory(list: ModelList) -> Inventory {
    let models = list
        .data
        .into_iter()
        .map(|m| ModelEntry {
            name: m.id,
            size: 0,
            digest: String::new(),
            modified_at: String::new(),
            details: ModelDetails::default(),
            // An OpenAI-compatible server lists what it serves now, so every
            // model it lists counts as loaded.
            loaded: Some(LoadedInfo::default()),
        })
        .collect();
    Inventory { models }
}

#[async_trait::async_trait]
impl Backend for OpenAiBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Openai
    }

    async fn inventory(&self) -> Result<Inventory, ServeError> {
        Ok(to_inventory(
            self.http.get_json::<ModelList>("/v1/models").await?,
        ))
    }

    async fn serve(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        let path = match req.api {
            ApiKind::OpenaiChat => "/v1/chat/completions",
            ApiKind::OpenaiCompletions => "/v1/completions",
            ApiKind::OpenaiEmbeddings => "/v1/embeddings",
            other => {
                return Err(ServeError::Unsupported(format!(
                    "the OpenAI-compatible backend does not serve Ollama's {} API; use the /v1 endpoints",
                    other.as_str_name()
                )));
            }
        };
        self.http
            .post(path, req.body.clone(), &req.request_id)
            .await
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
        assert!(
            inventory
                .resolve("SmolLM2-135M-Instruct")
                .is_some_and(|m| m.loaded.is_some())
        );
    }
}
