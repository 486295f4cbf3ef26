//! Streams that survive their node: when a streamed chat breaks after its
//! first token (the serving node died, or its backend stalled), the entry
//! node asks the mesh again with the text already sent as the assistant's
//! partial reply and the output budget lowered by the tokens sent, and
//! splices the continuation into the same stream: the client sees one
//! answer with one terminator (`[DONE]`, or Ollama's `"done":true` line).
//!
//! A stream that broke before its first token is simply asked for again.
//! Covers OpenAI chat completions (SSE) and Ollama's `/api/chat` (NDJSON).
//! Usage counts what both nodes generated: the continuation's usage report
//! (OpenAI `usage`, Ollama `eval_count`) gets the tokens sent before the
//! break added to its output and taken off its prompt (the partial reply
//! was output, not the client's input).
//! Limits: the continuation is sampled afresh from the partial text (no
//! sampler state crosses nodes); a stream that broke inside a tool call is
//! not resumed (it ends with the error event as before); tokens are
//! counted as content events (one per token for Ollama, llama-server and
//! vLLM); backends continue a final assistant message (Ollama,
//! llama-server; vLLM needs `continue_final_message`). Only whole events
//! reach the client, so a splice never cuts one.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::route::{CloudPolicy, Router};
use llmesh_mesh::{ApiKind, BodyStream, InferenceRequest};
use serde_json::{Value, json};

/// Header with which a client turns resuming off for one request (`off`).
pub const RESUME_HEADER: &str = "x-llmesh-resume";

/// Whether a streamed response of `api` can be resumed.
pub fn resumable_api(api: ApiKind) -> bool {
    matches!(api, ApiKind::OpenaiChat | ApiKind::OllamaChat)
}

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

/// How the stream's events look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// OpenAI: `data: {json}` events ending in a blank line.
    Sse,
    /// Ollama: one JSON object per line.
    Ndjson,
}

impl Format {
    fn of(api: ApiKind) -> Format {
        if api.streams_sse() { Format::Sse } else { Format::Ndjson }
    }

    /// The event's JSON, if it is one.
    fn json(self, event: &[u8]) -> Option<Value> {
        let text = std::str::from_utf8(event).ok()?.trim();
        let data = match self {
            Format::Sse => text.strip_prefix("data:")?.trim(),
            Format::Ndjson => text,
        };
        serde_json::from_str(data).ok()
    }

    /// `value` as one event of this format.
    fn event(self, value: &Value) -> Vec<u8> {
        match self {
            Format::Sse => format!("data: {value}\n\n").into_bytes(),
            Format::Ndjson => format!("{value}\n").into_bytes(),
        }
    }

    /// The delta (OpenAI) or message (Ollama) an event carries.
    fn delta(self, value: &Value) -> Option<&Value> {
        match self {
            Format::Sse => value.pointer("/choices/0/delta"),
            Format::Ndjson => value.get("message"),
        }
    }

    /// Splits whole events off `pending`.
    fn whole_events(self, pending: &mut Vec<u8>) -> Vec<Vec<u8>> {
        let end: &[u8] = match self {
            Format::Sse => b"\n\n",
            Format::Ndjson => b"\n",
        };
        let mut events = Vec::new();
        while let Some(at) = pending.windows(end.len()).position(|w| w == end) {
            events.push(pending.drain(..at + end.len()).collect());
        }
        events
    }
}

/// What the client has been sent so far.
struct Sent {
    format: Format,
    text: String,
    tokens: u64,
    in_tool_call: bool,
    /// The stream's `id`, kept by the continuation's events.
    id: Option<String>,
}

impl Sent {
    fn new(format: Format) -> Sent {
        Sent { format, text: String::new(), tokens: 0, in_tool_call: false, id: None }
    }

    /// Notes one event's content.
    fn note(&mut self, event: &[u8]) {
        let Some(value) = self.format.json(event) else { return };
        if self.id.is_none() {
            self.id = value.get("id").and_then(Value::as_str).map(str::to_string);
        }
        let delta = self.format.delta(&value);
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
    let lower = |object: &mut serde_json::Map<String, Value>, key: &str| -> Option<()> {
        if let Some(limit) = object.get(key).and_then(Value::as_u64) {
            let left = limit.checked_sub(sent.tokens).filter(|n| *n > 0)?;
            object.insert(key.into(), json!(left));
        }
        Some(())
    };
    for key in ["max_tokens", "max_completion_tokens"] {
        lower(object, key)?;
    }
    if let Some(options) = object.get_mut("options").and_then(Value::as_object_mut) {
        lower(options, "num_predict")?;
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Whether an event of the continuation is its preamble (a content-less
/// first delta, not the last), which the client already had.
fn preamble(format: Format, event: &[u8]) -> bool {
    let Some(value) = format.json(event) else { return false };
    let delta = format.delta(&value);
    let content = delta.and_then(|d| d.get("content")).and_then(Value::as_str).unwrap_or_default();
    let last = match format {
        Format::Sse => value.pointer("/choices/0").is_none_or(|c| !c["finish_reason"].is_null()),
        Format::Ndjson => value.get("done").and_then(Value::as_bool) != Some(false),
    };
    content.is_empty() && delta.and_then(|d| d.get("tool_calls")).is_none() && !last
}

/// A continuation's event as part of the original stream: under its `id`,
/// and with a usage report that counts the tokens sent before the break as
/// output (they were generated) and not as prompt.
fn spliced(format: Format, event: Vec<u8>, sent: &Sent, before: u64) -> Vec<u8> {
    let Some(mut value) = format.json(&event) else { return event };
    let Some(object) = value.as_object_mut() else { return event };
    let mut changed = false;
    if let Some(id) = &sent.id
        && object.contains_key("id")
    {
        object.insert("id".into(), json!(id));
        changed = true;
    }
    let (usage, output, input) = match format {
        Format::Sse => (object.get_mut("usage").and_then(Value::as_object_mut), "completion_tokens", "prompt_tokens"),
        Format::Ndjson => (Some(&mut *object), "eval_count", "prompt_eval_count"),
    };
    if let Some(usage) = usage
        && let Some(out) = usage.get(output).and_then(Value::as_u64)
    {
        let prompt = usage.get(input).and_then(Value::as_u64).map(|p| p.saturating_sub(before));
        usage.insert(output.into(), json!(out + before));
        if let Some(prompt) = prompt {
            usage.insert(input.into(), json!(prompt));
            if usage.contains_key("total_tokens") {
                usage.insert("total_tokens".into(), json!(prompt + out + before));
            }
        }
        changed = true;
    }
    if changed { format.event(&value) } else { event }
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
    let format = Format::of(resume.request.api);
    Box::pin(async_stream::stream! {
        let mut body = body;
        let mut pending: Vec<u8> = Vec::new();
        let mut sent = Sent::new(format);
        // Tokens sent before the break, once resumed.
        let mut resumed: Option<u64> = None;
        let mut skipping = false;
        loop {
            match body.next().await {
                Some(Ok(bytes)) => {
                    pending.extend_from_slice(&bytes);
                    let mut out = Vec::new();
                    for event in format.whole_events(&mut pending) {
                        if skipping && preamble(format, &event) {
                            continue;
                        }
                        skipping = false;
                        let event = match resumed {
                            Some(before) => spliced(format, event, &sent, before),
                            None => event,
                        };
                        sent.note(&event);
                        out.extend_from_slice(&event);
                    }
                    if !out.is_empty() {
                        yield Ok(Bytes::from(out));
                    }
                }
                Some(Err(err)) => {
                    if resumed.is_none() && !sent.in_tool_call && format == Format::Sse {
                        // An SSE comment (clients skip it): the client, and
                        // the relay's idle timer, hear that the stream lives.
                        yield Ok(Bytes::from_static(b": resuming on another node\n\n"));
                    }
                    let next = if resumed.is_some() || sent.in_tool_call { None } else { resume_body(&resume, &sent).await };
                    match next {
                        Some(next) => {
                            body = next;
                            pending.clear();
                            resumed = Some(sent.tokens);
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
        let mut sent = Sent::new(Format::Sse);
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
        let events = Format::Sse.whole_events(&mut pending);
        assert_eq!(events, vec![b"data: {\"a\":1}\n\n".to_vec()]);
        assert_eq!(pending, b"data: {\"b\"".to_vec());
        assert!(preamble(
            Format::Sse,
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n"
        ));
        assert!(!preamble(Format::Sse, b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"));
        assert!(!preamble(Format::Sse, b"data: [DONE]\n\n"));
        assert!(!preamble(Format::Ndjson, b"{\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true}\n"));
    }

    #[test]
    fn an_ollama_continuation_lowers_num_predict_and_its_final_line_counts_both_nodes() {
        let mut sent = Sent::new(Format::Ndjson);
        for line in [
            &b"{\"message\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"done\":false}\n"[..],
            b"{\"message\":{\"role\":\"assistant\",\"content\":\" there\"},\"done\":false}\n",
        ] {
            sent.note(line);
        }
        let body = br#"{"model":"m","options":{"num_predict":10},"messages":[{"role":"user","content":"hi"}]}"#;
        let next: Value = serde_json::from_slice(&continuation(body, &sent).expect("continues")).expect("json");
        assert_eq!(next["options"]["num_predict"], 8);
        assert_eq!(next["messages"][1]["content"], "Hello there");
        let last = b"{\"done\":true,\"prompt_eval_count\":7,\"eval_count\":8}\n".to_vec();
        let out: Value = serde_json::from_slice(&spliced(Format::Ndjson, last, &sent, 2)).expect("json");
        assert_eq!((out["prompt_eval_count"].as_u64(), out["eval_count"].as_u64()), (Some(5), Some(10)));
    }

    #[test]
    fn an_openai_usage_report_after_a_resume_counts_both_nodes() {
        let sent = Sent { id: Some("chatcmpl-1".into()), ..Sent::new(Format::Sse) };
        let usage = br#"data: {"id":"chatcmpl-2","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}}

"#.to_vec();
        let out = Format::Sse.json(&spliced(Format::Sse, usage, &sent, 4)).expect("json");
        assert_eq!(out["id"], "chatcmpl-1");
        assert_eq!(out["usage"], json!({ "prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15 }));
    }
}
