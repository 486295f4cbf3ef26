//! Anthropic's Messages API and OpenAI's Responses API on any backend:
//! passed through where the backend serves them (Ollama 0.14 / 0.13.3 on,
//! llama-server, vLLM), translated to chat completions where it does not
//! (older Ollama, most cloud aggregators). Whether it does is learnt from
//! its first answer on each route: a 404 or 405 that does not name the
//! model means the route is missing, and from then on that backend's
//! requests are translated.

use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use llmesh_mesh::{ApiKind, InferenceRequest, InferenceResponse, ServeError};
use serde_json::{Value, json};

use super::http::HttpBackend;
use super::translate::{self, StreamTranslator, collect, json_response, parse_answer};
use super::{anthropic, responses};

// Unknown until the first answer: 0.
const NATIVE: u8 = 1;
const MISSING: u8 = 2;

/// What a backend was found to serve natively.
#[derive(Debug, Default)]
pub struct ForeignApis {
    messages: AtomicU8,
    count_tokens: AtomicU8,
    responses: AtomicU8,
}

impl StreamTranslator for anthropic::ChatToMessagesSse {
    fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        anthropic::ChatToMessagesSse::push(self, chunk)
    }
    fn finish(&mut self) -> Vec<Bytes> {
        anthropic::ChatToMessagesSse::finish(self)
    }
}

impl StreamTranslator for responses::ChatToResponsesSse {
    fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        responses::ChatToResponsesSse::push(self, chunk)
    }
    fn finish(&mut self) -> Vec<Bytes> {
        responses::ChatToResponsesSse::finish(self)
    }
}

/// Whether a 404/405 body says the route is missing rather than the model.
fn route_missing(status: u16, body: &[u8], model: &str) -> bool {
    matches!(status, 404 | 405) && !String::from_utf8_lossy(body).contains(model)
}

impl ForeignApis {
    fn flag(&self, api: ApiKind) -> Option<(&AtomicU8, &'static str)> {
        Some(match api {
            ApiKind::AnthropicMessages => (&self.messages, "/v1/messages"),
            ApiKind::AnthropicCountTokens => (&self.count_tokens, "/v1/messages/count_tokens"),
            ApiKind::OpenaiResponses => (&self.responses, "/v1/responses"),
            _ => return None,
        })
    }

    /// Serves a Messages, count-tokens or Responses request on `http`.
    pub async fn serve(&self, http: &HttpBackend, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
        let (flag, path) = self.flag(req.api).ok_or_else(|| ServeError::BadRequest("not a foreign API".into()))?;
        if flag.load(Ordering::Relaxed) != MISSING {
            let response = http.post(path, req.body.clone(), &req.request_id, req.meta.stream).await?;
            if !matches!(response.status, 404 | 405) {
                if (200..300).contains(&response.status) {
                    flag.store(NATIVE, Ordering::Relaxed);
                }
                return Ok(response);
            }
            let (status, content_type) = (response.status, response.content_type.clone());
            let body = collect(response.body).await?;
            if flag.load(Ordering::Relaxed) == NATIVE || !route_missing(status, &body, &req.meta.model) {
                return Ok(InferenceResponse {
                    status,
                    content_type,
                    body: Box::pin(futures::stream::once(async move { Ok(body) })),
                });
            }
            flag.store(MISSING, Ordering::Relaxed);
            tracing::info!(backend = %http.base(), path, "the backend has no such route; translating to /v1/chat/completions");
        }
        match req.api {
            ApiKind::AnthropicMessages => messages(http, req).await,
            ApiKind::AnthropicCountTokens => count_tokens(http, req).await,
            _ => responses(http, req).await,
        }
    }
}

/// A translated request's chat answer, or its error in the client's shape.
async fn chat(
    http: &HttpBackend,
    req: &InferenceRequest,
    body: &Value,
    error: fn(u16, &str) -> Value,
) -> Result<Result<InferenceResponse, InferenceResponse>, ServeError> {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let upstream = http.post("/v1/chat/completions", Bytes::from(body.to_string()), &req.request_id, stream).await?;
    if (200..300).contains(&upstream.status) {
        return Ok(Ok(upstream));
    }
    let status = upstream.status;
    let text = translate::error_message(&collect(upstream.body).await?);
    Ok(Err(json_response(status, &error(status, &text))))
}

fn openai_error(_status: u16, message: &str) -> Value {
    json!({ "error": { "message": message, "type": "api_error", "param": null, "code": null } })
}

async fn messages(http: &HttpBackend, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
    let body = anthropic::to_chat(&req.body)?;
    let upstream = match chat(http, req, &body, anthropic::error_body).await? {
        Ok(upstream) => upstream,
        Err(refused) => return Ok(refused),
    };
    let model = req.meta.model.clone();
    if upstream.content_type.starts_with("text/event-stream") {
        let body = translate::translated(upstream.body, anthropic::ChatToMessagesSse::new(&model));
        return Ok(InferenceResponse { status: 200, content_type: "text/event-stream".into(), body });
    }
    let answer = parse_answer(&collect(upstream.body).await?)?;
    Ok(json_response(200, &anthropic::from_chat(&answer, &model)))
}

/// Anthropic's token count, from the backend itself: the prompt is run
/// for one token and its `prompt_tokens` reported.
async fn count_tokens(http: &HttpBackend, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
    let mut body = anthropic::to_chat(&req.body)?;
    body["max_tokens"] = json!(1);
    body["stream"] = json!(false);
    let upstream = match chat(http, req, &body, anthropic::error_body).await? {
        Ok(upstream) => upstream,
        Err(refused) => return Ok(refused),
    };
    let answer = parse_answer(&collect(upstream.body).await?)?;
    let tokens = answer.pointer("/usage/prompt_tokens").and_then(Value::as_u64).ok_or_else(|| {
        ServeError::Unsupported("the backend reports no prompt_tokens, so tokens cannot be counted".into())
    })?;
    Ok(json_response(200, &json!({ "input_tokens": tokens })))
}

async fn responses(http: &HttpBackend, req: &InferenceRequest) -> Result<InferenceResponse, ServeError> {
    let body = responses::to_chat(&req.body)?;
    let upstream = match chat(http, req, &body, openai_error).await? {
        Ok(upstream) => upstream,
        Err(refused) => return Ok(refused),
    };
    let model = req.meta.model.clone();
    if upstream.content_type.starts_with("text/event-stream") {
        let body = translate::translated(upstream.body, responses::ChatToResponsesSse::new(&model));
        return Ok(InferenceResponse { status: 200, content_type: "text/event-stream".into(), body });
    }
    let answer = parse_answer(&collect(upstream.body).await?)?;
    Ok(json_response(200, &responses::from_chat(&answer, &model)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_route_is_told_from_a_missing_model() {
        assert!(route_missing(404, b"404 page not found", "qwen2.5:7b"));
        assert!(route_missing(404, br#"{"detail":"Not Found"}"#, "qwen2.5:7b"));
        assert!(route_missing(405, b"Method Not Allowed", "m"));
        assert!(!route_missing(404, br#"{"error":"model \"qwen2.5:7b\" not found"}"#, "qwen2.5:7b"));
        assert!(!route_missing(400, b"bad", "m"));
    }
}
