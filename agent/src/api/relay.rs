//! Relays a backend response to the client. Streams pass through chunk by
//! chunk as they arrive; a stream that breaks or stalls ends with an error
//! event in the API's own format, never a silent truncation. Non-streaming
//! bodies are collected first (they are small) so a backend that breaks
//! mid-body yields a clean 502 instead of half a JSON document.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use llmesh_mesh::{BodyStream, InferenceResponse, ServeError, StreamError};
use serde_json::json;

use crate::error::{ApiError, ErrorFormat};

/// How a response body is framed, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`: OpenAI streaming.
    Sse,
    /// `text/event-stream` of Anthropic's Messages API (named events).
    AnthropicSse,
    /// `application/x-ndjson`: Ollama streaming.
    Ndjson,
    /// Anything else: one document.
    Document,
}

impl Framing {
    /// Framing of a body with `content_type`.
    pub fn of(content_type: &str) -> Framing {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        match essence {
            "text/event-stream" => Framing::Sse,
            "application/x-ndjson" | "application/jsonl" => Framing::Ndjson,
            _ => Framing::Document,
        }
    }
}

/// The event that ends a broken stream, in the stream's own format: OpenAI
/// SDKs raise on an SSE event with an `error` key, Ollama clients on an
/// NDJSON line with one.
pub fn stream_error_event(framing: Framing, message: &str) -> Bytes {
    match framing {
        Framing::Sse => {
            let event = json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "stream_interrupted" } });
            Bytes::from(format!("data: {event}\n\n"))
        }
        Framing::AnthropicSse => {
            let event = json!({ "type": "error", "error": { "type": "api_error", "message": message } });
            Bytes::from(format!("event: error\ndata: {event}\n\n"))
        }
        _ => Bytes::from(format!("{}\n", json!({ "error": message }))),
    }
}

/// A backend stream on its way to the client: each chunk must come within
/// `idle`, and a failure becomes a final error event. The idle timer is
/// armed only while the backend is silent, so a busy stream costs no timer
/// operations per chunk.
struct Guarded {
    body: BodyStream,
    framing: Framing,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    finished: bool,
    /// How the backend stream ended while chunks were being combined; it
    /// is reported on the next poll, after the combined chunk.
    ended: Option<Option<StreamError>>,
}

/// Chunks already waiting are sent as one write, up to this size: a burst
/// of tiny SSE events costs one syscall instead of hundreds, and nothing is
/// ever held back waiting for more.
const COALESCE_BYTES: usize = 64 * 1024;

impl Guarded {
    fn new(body: BodyStream, framing: Framing, idle: Duration) -> Guarded {
        Guarded {
            body,
            framing,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
            finished: false,
            ended: None,
        }
    }
}

impl futures::Stream for Guarded {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let next = match this.ended.take() {
            Some(None) => Poll::Ready(None),
            Some(Some(message)) => Poll::Ready(Some(Err(message))),
            None => this.body.poll_next_unpin(cx),
        };
        match next {
            Poll::Ready(Some(Ok(chunk))) => {
                this.armed = false;
                let mut combined: Option<BytesMut> = None;
                while combined.as_ref().map_or(chunk.len(), BytesMut::len) < COALESCE_BYTES {
                    match this.body.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(more))) => {
                            combined.get_or_insert_with(|| BytesMut::from(&chunk[..])).extend_from_slice(&more);
                        }
                        Poll::Ready(Some(Err(message))) => {
                            this.ended = Some(Some(message));
                            break;
                        }
                        Poll::Ready(None) => {
                            this.ended = Some(None);
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                Poll::Ready(Some(Ok(combined.map_or(chunk, BytesMut::freeze))))
            }
            Poll::Ready(None) => {
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.finished = true;
                tracing::warn!(error = %err, "backend stream broke; ending it with an error event");
                Poll::Ready(Some(Ok(stream_error_event(this.framing, &err.to_string()))))
            }
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    this.timer.as_mut().reset(tokio::time::Instant::now() + this.idle);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.finished = true;
                    let err = StreamError::Idle(this.idle);
                    tracing::warn!(error = %err, "stream abandoned");
                    return Poll::Ready(Some(Ok(stream_error_event(this.framing, &err.to_string()))));
                }
                Poll::Pending
            }
        }
    }
}

/// Collects a non-streaming body, bounded in size and in silence.
async fn collect(mut body: BodyStream, idle: Duration, limit: usize) -> Result<Bytes, ServeError> {
    // The first chunk is kept as it came: a small document is usually one
    // chunk, and is then relayed without a copy.
    let mut first: Option<Bytes> = None;
    let mut buffer = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => {
                let held = first.as_ref().map_or(0, Bytes::len) + buffer.len();
                if held + chunk.len() > limit {
                    return Err(ServeError::BackendUnreachable(format!(
                        "backend response exceeds {limit} bytes (api.max_response_bytes)"
                    )));
                }
                match first.take() {
                    None if buffer.is_empty() => first = Some(chunk),
                    None => buffer.extend_from_slice(&chunk),
                    Some(held) => {
                        buffer.reserve(held.len() + chunk.len());
                        buffer.extend_from_slice(&held);
                        buffer.extend_from_slice(&chunk);
                    }
                }
            }
            Ok(None) => return Ok(first.unwrap_or_else(|| buffer.freeze())),
            Ok(Some(Err(err))) => return Err(ServeError::BackendUnreachable(err.to_string())),
            Err(_) => {
                return Err(ServeError::Timeout(format!("backend sent nothing for {idle:?} mid-response")));
            }
        }
    }
}

/// Builds the client response from a backend response.
pub async fn relay(
    response: InferenceResponse,
    idle: Duration,
    max_response_bytes: usize,
    error_format: ErrorFormat,
) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type =
        HeaderValue::from_str(&response.content_type).unwrap_or_else(|_| HeaderValue::from_static("application/json"));
    let framing = match Framing::of(&response.content_type) {
        Framing::Sse if error_format == ErrorFormat::Anthropic => Framing::AnthropicSse,
        framing => framing,
    };
    let body = match framing {
        Framing::Sse | Framing::AnthropicSse | Framing::Ndjson => {
            Body::from_stream(Guarded::new(response.body, framing, idle))
        }
        Framing::Document => match collect(response.body, idle, max_response_bytes).await {
            Ok(bytes) => Body::from(bytes),
            Err(err) => {
                return ApiError::from(err).with_format(error_format).into_response();
            }
        },
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    if framing != Framing::Document {
        out.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Tell buffering proxies in front of us (nginx) to pass chunks on.
        out.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn response(content_type: &str, chunks: Vec<Result<&'static str, &'static str>>) -> InferenceResponse {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| c.map(|s| Bytes::from_static(s.as_bytes())).map_err(|e| StreamError::Backend(e.to_string()))),
        );
        InferenceResponse { status: 200, content_type: content_type.into(), body: Box::pin(stream) }
    }

    async fn text(response: Response) -> String {
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf8")
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(Framing::of("text/event-stream; charset=utf-8"), Framing::Sse);
        assert_eq!(Framing::of("application/x-ndjson"), Framing::Ndjson);
        assert_eq!(Framing::of("application/json"), Framing::Document);
    }

    #[tokio::test]
    async fn broken_sse_stream_ends_with_an_error_event() {
        let r = response("text/event-stream", vec![Ok("data: {\"a\":1}\n\n"), Err("reset")]);
        let out = text(relay(r, Duration::from_secs(5), 1024, ErrorFormat::OpenAi).await).await;
        assert!(out.starts_with("data: {\"a\":1}\n\n"));
        let last: serde_json::Value =
            serde_json::from_str(out.trim_end().rsplit("data: ").next().expect("event")).expect("json");
        assert_eq!(last["error"]["code"], "stream_interrupted");
    }

    #[tokio::test]
    async fn broken_ndjson_stream_ends_with_an_error_line() {
        let r = response("application/x-ndjson", vec![Ok("{\"done\":false}\n"), Err("reset")]);
        let out = text(relay(r, Duration::from_secs(5), 1024, ErrorFormat::Ollama).await).await;
        let last: serde_json::Value = serde_json::from_str(out.lines().last().expect("line")).expect("json");
        assert!(last["error"].as_str().is_some_and(|m| m.contains("reset")));
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_stream_is_abandoned_after_the_idle_timeout() {
        let stalled =
            futures::stream::iter(vec![Ok(Bytes::from_static(b"{\"x\":1}\n"))]).chain(futures::stream::pending());
        let r = InferenceResponse { status: 200, content_type: "application/x-ndjson".into(), body: Box::pin(stalled) };
        let out = text(relay(r, Duration::from_secs(3), 1024, ErrorFormat::Ollama).await).await;
        assert!(out.lines().last().is_some_and(|l| l.contains("sent nothing")), "{out}");
    }

    #[tokio::test]
    async fn ready_chunks_are_combined_and_order_is_kept() {
        let r = response("text/event-stream", vec![Ok("data: 1\n\n"), Ok("data: 2\n\n"), Ok("data: 3\n\n")]);
        let body = relay(r, Duration::from_secs(5), 1024, ErrorFormat::OpenAi).await.into_body();
        let frames: Vec<Bytes> = body.into_data_stream().map(|f| f.expect("frame")).collect().await;
        assert_eq!(frames, vec![Bytes::from_static(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")]);
    }

    #[tokio::test]
    async fn an_error_after_combined_chunks_still_ends_the_stream() {
        let r = response("text/event-stream", vec![Ok("data: 1\n\n"), Ok("data: 2\n\n"), Err("reset")]);
        let out = text(relay(r, Duration::from_secs(5), 1024, ErrorFormat::OpenAi).await).await;
        assert!(out.starts_with("data: 1\n\ndata: 2\n\n"), "{out}");
        assert!(out.contains("stream_interrupted"), "{out}");
    }

    #[tokio::test]
    async fn broken_document_becomes_a_502() {
        let r = response("application/json", vec![Ok("{\"half\":"), Err("reset")]);
        let out = relay(r, Duration::from_secs(5), 1024, ErrorFormat::OpenAi).await;
        assert_eq!(out.status(), StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn a_document_in_one_chunk_or_in_several_arrives_whole() {
        for chunks in [vec![Ok("{\"a\":1}")], vec![Ok("{\"a\""), Ok(":"), Ok(""), Ok("1}")]] {
            let r = response("application/json", chunks);
            let out = relay(r, Duration::from_secs(5), 1024, ErrorFormat::OpenAi).await;
            assert_eq!(out.status(), StatusCode::OK);
            assert_eq!(text(out).await, "{\"a\":1}");
        }
    }

    #[tokio::test]
    async fn oversized_document_becomes_a_502() {
        let r = response("application/json", vec![Ok("0123456789"), Ok("0123456789")]);
        let out = relay(r, Duration::from_secs(5), 15, ErrorFormat::OpenAi).await;
        assert_eq!(out.status(), StatusCode::BAD_GATEWAY);
    }
}
