//! Backends: what actually runs inference beside this agent. Each kind sits
//! behind [`Backend`]; the rest of the agent never knows which it talks to.

pub mod anthropic;
pub mod foreign;
pub mod http;
mod inline_pool;
mod ollama;
pub mod openai;
pub mod responses;
pub mod translate;

use std::sync::Arc;

use llmesh_mesh::{InferenceRequest, InferenceResponse, ServeError};
use serde::{Deserialize, Serialize};

pub use ollama::OllamaBackend;
pub use openai::OpenAiBackend;

use crate::config::{BackendConfig, BackendKind};

/// Ollama's model details block, kept as Ollama reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelDetails {
    /// Model this one was derived from.
    pub parent_model: String,
    /// File format, e.g. `gguf`.
    pub format: String,
    /// Model family, e.g. `llama`.
    pub family: String,
    /// All families.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub families: Option<Vec<String>>,
    /// Parameter count, e.g. `8.0B`.
    pub parameter_size: String,
    /// Quantization, e.g. `Q4_K_M`.
    pub quantization_level: String,
}

/// What a loaded model occupies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadedInfo {
    /// Bytes of GPU memory in use.
    pub size_vram: u64,
    /// When the backend will unload it (RFC 3339), if known.
    pub expires_at: String,
    /// Context window it was loaded with.
    pub context_length: u32,
}

/// One model a backend can serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Name clients use, e.g. `qwen2.5:7b`.
    pub name: String,
    /// Size on disk in bytes.
    pub size: u64,
    /// Content digest.
    pub digest: String,
    /// Last modification (RFC 3339).
    pub modified_at: String,
    /// Family, format and quantization.
    pub details: ModelDetails,
    /// Present while the model is loaded in memory.
    pub loaded: Option<LoadedInfo>,
}

/// A backend's models at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// Every model the backend can serve, loaded or not.
    pub models: Vec<ModelEntry>,
    /// The requests it serves at once, when it says (llama-server's
    /// `/props` `total_slots`); Ollama and vLLM do not.
    pub slots: Option<u32>,
}

impl Inventory {
    /// Finds a model as Ollama would: exact name, or with the implicit
    /// `:latest` tag added or removed.
    pub fn resolve(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name).or_else(|| {
            let alternative = match name.strip_suffix(":latest") {
                Some(bare) => bare.to_string(),
                None => format!("{name}:latest"),
            };
            self.models.iter().find(|m| m.name == alternative)
        })
    }
}

/// A stable `modified_at` for backends that report none (OpenAI-compatible
/// servers): when this process first saw the model.
/// Clients such as the `ollama` Python package require a timestamp there.
pub(crate) fn first_seen() -> String {
    static STARTED: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    STARTED.clone()
}

/// No backend (`backend.kind = "none"`): serves no model, so the scheduler
/// sends every request to a peer; always reachable, so the node is ready
/// as soon as it is in the mesh.
pub struct NoBackend;

#[async_trait::async_trait]
impl Backend for NoBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::None
    }

    async fn inventory(&self) -> Result<Inventory, ServeError> {
        Ok(Inventory::default())
    }

    async fn serve(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        if req.api.is_management() {
            return Err(ServeError::Unsupported(
                "this node is a pure entry node (backend kind none) and has no models to manage".into(),
            ));
        }
        Err(ServeError::ModelNotFound(req.meta.model.clone()))
    }
}

/// An inference server this agent fronts.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Which kind this is.
    fn kind(&self) -> BackendKind;

    /// The models the backend has now; an error means it is unreachable.
    async fn inventory(&self) -> Result<Inventory, ServeError>;

    /// Runs one request, returning once the response head is known.
    async fn serve(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError>;

    /// The cheapest question the backend answers: whether it is alive at
    /// all (stall detection). By default, its model list.
    async fn probe(&self) -> Result<(), ServeError> {
        self.inventory().await.map(drop)
    }
}

/// Builds the configured backend. The simulator speaks Ollama's API: the
/// `llmesh` binary starts it and points `backend.url` at it.
pub fn build(config: &BackendConfig) -> Result<Arc<dyn Backend>, ServeError> {
    Ok(match config.kind {
        BackendKind::Ollama | BackendKind::Sim => Arc::new(OllamaBackend::new(config)?),
        BackendKind::Openai => Arc::new(OpenAiBackend::new(config)?),
        BackendKind::None => Arc::new(NoBackend),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            size: 1,
            digest: String::new(),
            modified_at: String::new(),
            details: ModelDetails::default(),
            loaded: None,
        }
    }

    #[test]
    fn resolves_the_implicit_latest_tag() {
        let inventory =
            Inventory { models: vec![entry("llama3:latest"), entry("qwen2.5:7b"), entry("phi")], slots: None };
        assert_eq!(inventory.resolve("llama3").map(|m| m.name.as_str()), Some("llama3:latest"));
        assert_eq!(inventory.resolve("phi:latest").map(|m| m.name.as_str()), Some("phi"));
        assert_eq!(inventory.resolve("qwen2.5:7b").map(|m| m.name.as_str()), Some("qwen2.5:7b"));
        assert!(inventory.resolve("qwen2.5").is_none());
    }
}
