//! Streams that survive their node: when a streamed chat completion breaks
//! after its first token (the serving node died, or its backend stalled),
//! the entry node asks the mesh again with the text already sent as the
//! assistant's partial reply and `max_tokens` lowered by the tokens sent,
//! and splices the continuation into the same stream: the client sees one
//! answer with one `[DONE]`.
//!
//! A stream that broke before its first token is simply asked for again.
//! Limits: OpenAI chat completions only; the continuation is sampled
//! afresh from the partial text (no sampler state crosses nodes); a stream
//! that broke inside a tool call is not resumed (it ends with the error
//! event as before); tokens are counted as content events (one per token
//! for Ollama, llama-server and vLLM); backends continue a final assistant
//! message (Ollama, llama-server; vLLM needs `continue_final_message`).
//! Only whole SSE events reach the client, so a splice never cuts one.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::route::{CloudPolicy, Router};
use llmesh_mesh::{BodyStream, InferenceRequest};
use serde_json::{Value, json};

/// Header with which a client turns resuming off for one request (`off`).
pub const RESUME_HEADER: &str = "x-llmesh-resume";

/// What a broken stream needs to be asked for again.
pub struct Resume {
    /// Routes the continuation.
    pub router: Arc<Router>,
    /// The original request (its body is the client's).
    pub request: InferenceRequest,
    /// The cloud policy of the original request.
    pub policy: CloudPolicy,
    /// The node that served the stream so far ([`llmesh_mesh::route::Routed::node_id`]).
    pub node_id: String,
}

/// What the client has been sent so far.
#[derive(Default)]
struct Sent {
    text: String,
    tokens: u64,
    in_tool_call: bool,
    /// The stream's `id`, kept by the continuation's events.
    id: Option<String>,
}

impl Sent {
    /// Notes one SSE event's content.
    fn note(&mut self, event: &[u8]) {
        let Some(data) = std::str::from_utf8(event).ok().and_then(|e| e.trim().strip_prefix("data:")) else { return };
        let Ok(value) = serde_json::from_str::<Value>(data.trim()) else { return };
        if self.id.is_none() {
            self.id = value.get("id").and_then(Value::as_str).map(str::to_string);
        }
        let delta = value.pointer("/choices/0/delta");
        if let Some(text) = delta.and_then(|d| d.get("content")).and_then(Value::as_str).filter(|t| !t.is_empty()) {
            self.text.push_str(text);
            self.tokens += 1;
        }
        if delta.and_then(|d| d.get("tool_calls")).is_some() {
            self.in_tool_call = true;
        }
    }
}

/// The continuation's body: the partial reply appended as the assistant's
/// message, the token budget lowered by what was sent.
fn continuation(body: &[u8], sent: &Sent) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    if !sent.text.is_empty() {
        object.get_mut("messages")?.as_array_mut()?.push(json!({ "role": "assistant", "content": sent.text }));
    }
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(limit) = object.get(key).and_then(Value::as_u64) {
            let left = limit.checked_sub(sent.tokens).filter(|n| *n > 0)?;
            object.insert(key.into(), json!(left));
        }
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Whether an event of the continuation is its preamble (the role-only
/// first delta), which the client already had.
fn preamble(event: &[u8]) -> bool {
    let Some(data) = std::str::from_utf8(event).ok().and_then(|e| e.trim().strip_prefix("data:")) else { return false };
    let Ok(value) = serde_json::from_str::<Value>(data.trim()) else { return false };
    let Some(choice) = value.pointer("/choices/0") else { return false };
    let delta = choice.get("delta");
    let content = delta.and_then(|d| d.get("content")).and_then(Value::as_str).unwrap_or_default();
    content.is_empty() && delta.and_then(|d| d.get("tool_calls")).is_none() && choice["finish_reason"].is_null()
}

/// A continuation's event under the original stream's `id`, so the client
/// sees one completion.
fn with_id(event: Vec<u8>, id: Option<&str>) -> Vec<u8> {
    let Some(id) = id else { return event };
    let Some(data) = std::str::from_utf8(&event).ok().and_then(|e| e.trim().strip_prefix("data:")) else {
        return event;
    };
    let Ok(mut value) = serde_json::from_str::<Value>(data.trim()) else { return event };
    let Some(object) = value.as_object_mut().filter(|o| o.contains_key("id")) else { return event };
    object.insert("id".into(), json!(id));
    format!("data: {value}\n\n").into_bytes()
}

/// Splits whole SSE events (ending in a blank line) off `pending`.
fn whole_events(pending: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
        events.push(pending.drain(..end + 2).collect());
    }
    events
}

/// Asks the mesh for the rest of the answer; `None` when it cannot.
async fn resume_body(resume: &Resume, sent: &Sent) -> Option<BodyStream> {
    let body = continuation(&resume.request.body, sent)?;
    let mut request = resume.request.clone();
    request.body = body;
    request.request_id = format!("{}-resumed", resume.request.request_id);
    let routed = resume.router.route_avoiding(request, resume.policy.clone(), Some(&resume.node_id)).await.ok()?;
    tracing::info!(id = %resume.request.request_id, node = %routed.node, tokens = sent.tokens, "resumed a broken stream on another node");
    (routed.response.status == 200).then_some(routed.response.body)
}

/// `body`, resumed once on another node if it breaks after its first token.
pub fn resumable(body: BodyStream, resume: Resume) -> BodyStream {
    Box::pin(async_stream::stream! {
        let mut body = body;
        let mut pending: Vec<u8> = Vec::new();
        let mut sent = Sent::default();
        let mut resumed = false;
        let mut skipping = false;
        loop {
            match body.next().await {
                Some(Ok(bytes)) => {
                    pending.extend_from_slice(&bytes);
                    let mut out = Vec::new();
                    for event in whole_events(&mut pending) {
                        if skipping && preamble(&event) {
                            continue;
                        }
                        skipping = false;
                        let event = if resumed { with_id(event, sent.id.as_deref()) } else { event };
                        sent.note(&event);
                        out.extend_from_slice(&event);
                    }
                    if !out.is_empty() {
                        yield Ok(Bytes::from(out));
                    }
                }
                Some(Err(err)) => {
                    if !resumed && !sent.in_tool_call {
                        // An SSE comment (clients skip it): the client, and
                        // the relay's idle timer, hear that the stream lives.
                        yield Ok(Bytes::from_static(b": resuming on another node\n\n"));
                    }
                    let next = if resumed || sent.in_tool_call { None } else { resume_body(&resume, &sent).await };
                    match next {
                        Some(next) => {
                            body = next;
                            pending.clear();
                            resumed = true;
                            skipping = true;
                        }
                        None => {
                            yield Err(err);
                            return;
                        }
                    }
                }
                None => {
                    if !pending.is_empty() {
                        yield Ok(Bytes::from(std::mem::take(&mut pending)));
                    }
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_continuation_carries_the_partial_reply_and_the_rest_of_the_budget() {
        let mut sent = Sent::default();
        for event in [
            &b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"[..],
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n",
            b"data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n",
        ] {
            sent.note(event);
        }
        assert_eq!((sent.text.as_str(), sent.tokens), ("Hello there", 2));
        let body = br#"{"model":"m","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
        let next: Value = serde_json::from_slice(&continuation(body, &sent).expect("continues")).expect("json");
        assert_eq!(next["messages"][1], json!({ "role": "assistant", "content": "Hello there" }));
        assert_eq!(next["max_tokens"], 8);
        let spent = br#"{"model":"m","max_tokens":2,"messages":[]}"#;
        assert!(continuation(spent, &sent).is_none(), "nothing left to generate");
    }

    #[test]
    fn only_whole_events_pass_and_the_preamble_is_recognised() {
        let mut pending = b"data: {\"a\":1}\n\ndata: {\"b\"".to_vec();
        let events = whole_events(&mut pending);
        assert_eq!(events, vec![b"data: {\"a\":1}\n\n".to_vec()]);
        assert_eq!(pending, b"data: {\"b\"".to_vec());
        assert!(preamble(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n"
        ));
        assert!(!preamble(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"));
        assert!(!preamble(b"data: [DONE]\n\n"));
    }
}
