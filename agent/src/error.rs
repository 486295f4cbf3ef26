//! Errors as clients see them: OpenAI's `{"error":{message,type,code}}` on
//! the OpenAI and llmesh routes, Ollama's `{"error":"message"}` on `/api/*`
//! (what Ollama's own clients parse), with the same status codes.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llmesh_mesh::ServeError;
use serde_json::json;

/// Which error body a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFormat {
    /// OpenAI-style nested object.
    OpenAi,
    /// Ollama-style string.
    Ollama,
    /// Anthropic's `{"type":"error","error":{type,message}}`.
    Anthropic,
}

impl ErrorFormat {
    /// The error format of `api`'s clients.
    pub fn of(api: llmesh_mesh::ApiKind) -> ErrorFormat {
        if api.is_ollama_native() {
            ErrorFormat::Ollama
        } else if api.is_anthropic() {
            ErrorFormat::Anthropic
        } else {
            ErrorFormat::OpenAi
        }
    }
}

/// Anthropic's error type for an HTTP status (what its SDKs map to
/// exception classes).
pub fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// An error response waiting to be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// Machine-readable code.
    pub code: &'static str,
    /// Body format.
    pub format: ErrorFormat,
    /// Extra response headers (rate-limit state, Retry-After).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), code, format: ErrorFormat::OpenAi, headers: Vec::new() }
    }

    /// 400 for a request that cannot be understood.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 413 for a body over the configured limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body exceeds the limit of {limit} bytes (api.max_body_bytes)"),
        )
    }

    /// 404 for a path this server does not have.
    pub fn no_route(method: &str, path: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_route", format!("no route for {method} {path}"))
    }

    /// Adds response headers (they replace defaults such as Retry-After).
    pub fn with_headers(mut self, headers: Vec<(&'static str, String)>) -> ApiError {
        self.headers.extend(headers);
        self
    }

    /// Renders in `format`.
    pub fn with_format(mut self, format: ErrorFormat) -> ApiError {
        self.format = format;
        self
    }

    /// OpenAI's `type` field for this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl From<ServeError> for ApiError {
    fn from(err: ServeError) -> ApiError {
        let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, err.code(), err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.format {
            ErrorFormat::OpenAi => json!({
                "error": { "message": self.message, "type": self.kind(), "param": null, "code": self.code }
            }),
            ErrorFormat::Ollama => json!({ "error": self.message }),
            ErrorFormat::Anthropic => json!({
                "type": "error", "error": { "type": anthropic_type(self.status), "message": self.message }
            }),
        };
        let mut response = (self.status, Json(body)).into_response();
        let operator_state = matches!(self.code, "model_drained" | "node_revoked");
        if self.status == StatusCode::SERVICE_UNAVAILABLE && !operator_state {
            // Backends usually come back within seconds (restart, model load).
            response.headers_mut().insert("retry-after", HeaderValue::from_static("5"));
        } else if self.status == StatusCode::TOO_MANY_REQUESTS {
            // A full mesh queue drains at the speed of generation.
            response.headers_mut().insert("retry-after", HeaderValue::from_static("2"));
        }
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(err: ApiError) -> (StatusCode, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).expect("json"))
    }

    #[tokio::test]
    async fn openai_shape() {
        let (status, body) = body_of(ServeError::ModelNotFound("m".into()).into()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("'m'")));
    }

    #[tokio::test]
    async fn ollama_shape() {
        let err = ApiError::from(ServeError::Timeout("slow".into())).with_format(ErrorFormat::Ollama);
        let (status, body) = body_of(err).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(body["error"].as_str().is_some_and(|m| m.contains("slow")));
    }
}
