//! The HTTP client side shared by the Ollama and OpenAI-compatible
//! backends: pooled connections, timeouts, and error classes.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::{InferenceResponse, ServeError};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::de::DeserializeOwned;

use crate::config::BackendConfig;

/// A pooled HTTP client bound to one backend base URL.
pub struct HttpBackend {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
    inventory_timeout: Duration,
}

impl HttpBackend {
    /// A client for `config.url`.
    pub fn new(config: &BackendConfig) -> Result<HttpBackend, ServeError> {
        let client = reqwest::Client::builder()
            // The backend sits beside the agent; a proxy from the
            // environment would only add a hop or break loopback.
            .no_proxy()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .http1_only()
            .build()
            .map_err(|e| ServeError::Internal(format!("building the HTTP client: {e}")))?;
        Ok(HttpBackend {
            client,
            base: config.url.trim_end_matches('/').to_string(),
            api_key: config.api_key.clone(),
            inventory_timeout: config.connect_timeout + Duration::from_secs(5),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn classify(&self, path: &str, err: &reqwest::Error) -> ServeError {
        let what = format!("{}{path}", self.base);
        if err.is_timeout() {
            ServeError::Timeout(format!("{what}: {err}"))
        } else if err.is_connect() {
            ServeError::BackendUnreachable(format!("cannot connect to {what}"))
        } else {
            ServeError::BackendUnreachable(format!("{what}: {err}"))
        }
    }

    /// Sends `body` to `path` and returns once the response head arrives;
    /// the caller bounds how long that may take.
    pub async fn post(
        &self,
        path: &str,
        body: Bytes,
        request_id: &str,
    ) -> Result<InferenceResponse, ServeError> {
        let mut request = self
            .client
            .post(self.url(path))
            .header(CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id)
            .body(body);
        if let Some(key) = &self.api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let response = request.send().await.map_err(|e| self.classify(path, &e))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let body = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(|e| format!("backend stream broke: {e}")));
        Ok(InferenceResponse {
            status,
            content_type,
            body: Box::pin(body),
        })
    }

    /// Fetches and decodes a JSON document (inventory endpoints).
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ServeError> {
        let mut request = self
            .client
            .get(self.url(path))
            .timeout(self.inventory_timeout);
        if let Some(key) = &self.api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let response = request.send().await.map_err(|e| self.classify(path, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(ServeError::BackendUnavailable(format!(
                "{} answered {status}",
                self.url(path)
            )));
        }
        response.json::<T>().await.map_err(|e| {
            ServeError::BackendUnavailable(format!(
                "{} sent an unexpected body: {e}",
                self.url(path)
            ))
        })
    }
}
