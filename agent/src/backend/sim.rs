//! The simulated backend run inside the agent process: the same engine and
//! HTTP handlers as `llmesh sim-backend`, called without a socket.

use std::sync::Arc;

use axum::body::Body;
use futures::StreamExt;
use llmesh_mesh::{InferenceRequest, InferenceResponse, ServeError};
use tower::ServiceExt;

use super::{Backend, Inventory, LoadedInfo, ModelDetails, ModelEntry};
use crate::config::BackendKind;
use crate::sim::{SimConfig, SimEngine, router};

/// An in-process simulated Ollama.
pub struct SimBackend {
    engine: Arc<SimEngine>,
    router: axum::Router,
}

impl SimBackend {
    /// A sim built from `config`; fails on a bad model spec.
    pub fn new(config: SimConfig) -> Result<SimBackend, String> {
        let engine = Arc::new(SimEngine::new(config)?);
        Ok(SimBackend { router: router(engine.clone()), engine })
    }
}

#[async_trait::async_trait]
impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    async fn inventory(&self) -> Result<Inventory, ServeError> {
        let loaded = self.engine.loaded();
        let models = self
            .engine
            .models()
            .iter()
            .map(|m| ModelEntry {
                name: m.name.clone(),
                size: m.size_bytes,
                digest: String::new(),
                modified_at: super::first_seen(),
                details: ModelDetails {
                    parent_model: String::new(),
                    format: "gguf".into(),
                    family: m.family.clone(),
                    families: Some(vec![m.family.clone()]),
                    parameter_size: m.parameter_size.clone(),
                    quantization_level: m.quantization.clone(),
                },
                loaded: loaded.contains(&m.name).then(|| LoadedInfo {
                    size_vram: m.size_bytes,
                    expires_at: String::new(),
                    context_length: 4096,
                }),
            })
            .collect();
        Ok(Inventory { models })
    }

    async fn serve(&self, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        let path = super::ollama::path_for(req.api)?;
        let request = http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(req.body.clone()))
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        let response = self.router.clone().oneshot(request).await.map_err(|e| ServeError::Internal(e.to_string()))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let body = response.into_body().into_data_stream().map(|chunk| chunk.map_err(|e| e.to_string()));
        Ok(InferenceResponse { status, content_type, body: Box::pin(body) })
    }
}
