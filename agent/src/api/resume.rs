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

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::route::{CloudPolicy, Router};
use llmesh_mesh::{ApiKind, BodyStream, InferenceRequest};
use memchr::memmem::Finder;
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

/// What the client has been sent so far. Every streamed token passes
/// here, so it parses no JSON: it finds the content string by its key and
/// keeps it still escaped; only a resume decodes it.
struct Sent {
    format: Format,
    /// The content strings sent, as JSON string bodies (escapes kept).
    raw_text: Vec<u8>,
    tokens: u64,
    in_tool_call: bool,
    /// The stream's `id`, kept by the continuation's events.
    id: Option<String>,
}

// Keys looked for in every streamed event, their searchers built once.
static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"id\""));
static DELTA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"delta\""));
static MESSAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"message\""));
static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"content\""));
static TOOL_CALLS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"tool_calls\""));

/// The body of the JSON string that follows `"key":` after `from` in
/// `event` (escapes kept), or `None` when the value is not a string.
fn string_after<'a>(event: &'a [u8], from: usize, key: &Finder<'_>) -> Option<&'a [u8]> {
    let at = from + key.find(&event[from..])? + key.needle().len();
    let rest = &event[at..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = rest[colon..].strip_prefix(b":")?;
    let quote = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let body = rest[quote..].strip_prefix(b"\"")?;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return Some(&body[..i]),
            _ => i += 1,
        }
    }
    None
}

impl Sent {
    fn new(format: Format) -> Sent {
        Sent { format, raw_text: Vec::new(), tokens: 0, in_tool_call: false, id: None }
    }

    /// Notes one event's content.
    fn note(&mut self, event: &[u8]) {
        if self.id.is_none()
            && self.format == Format::Sse
            && let Some(id) = string_after(event, 0, &ID)
        {
            self.id = serde_json::from_slice::<String>(&[b"\"", id, b"\""].concat()).ok();
        }
        let holder = match self.format {
            Format::Sse => &DELTA,
            Format::Ndjson => &MESSAGE,
        };
        let Some(start) = holder.find(event) else { return };
        if let Some(text) = string_after(event, start, &CONTENT).filter(|t| !t.is_empty()) {
            self.raw_text.extend_from_slice(text);
            self.tokens += 1;
        }
        if TOOL_CALLS.find(&event[start..]).is_some() {
            self.in_tool_call = true;
        }
    }

    /// The text sent so far, decoded.
    fn text(&self) -> Option<String> {
        serde_json::from_slice(&[&b"\""[..], &self.raw_text, b"\""].concat()).ok()
    }
}

/// The continuation's body: the partial reply appended as the assistant's
/// message, the token budget lowered by what was sent.
fn continuation(body: &[u8], sent: &Sent) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    let text = sent.text()?;
    if !text.is_empty() {
        object.get_mut("messages")?.as_array_mut()?.push(json!({ "role": "assistant", "content": text }));
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

static BLANK_LINE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));

/// Notes each event of `buf` that ends at one of `ends` (each `end_len`
/// long); returns where the last whole one ends.
fn note_events(buf: &[u8], ends: impl Iterator<Item = usize>, end_len: usize, sent: &mut Sent) -> usize {
    let mut done = 0;
    for at in ends {
        // Overlapping finds ("\n\n\n") inside an event already ended.
        if at < done {
            continue;
        }
        sent.note(&buf[done..at + end_len]);
        done = at + end_len;
    }
    done
}

/// Before any break: notes the whole events that `bytes` completes and
/// returns them to send, without copying when `bytes` is exactly whole
/// events (the common case: a backend writes one event per write); an
/// unfinished event waits in `pending`.
fn pass_on(format: Format, pending: &mut Vec<u8>, bytes: Bytes, sent: &mut Sent) -> Option<Bytes> {
    let whole = |buf: &[u8], sent: &mut Sent| -> usize {
        match format {
            Format::Sse => note_events(buf, BLANK_LINE.find_iter(buf), 2, sent),
            Format::Ndjson => note_events(buf, memchr::memchr_iter(b'\n', buf), 1, sent),
        }
    };
    if pending.is_empty() {
        let done = whole(&bytes, sent);
        if done < bytes.len() {
            pending.extend_from_slice(&bytes[done..]);
        }
        return (done > 0).then(|| bytes.slice(..done));
    }
    pending.extend_from_slice(&bytes);
    let done = whole(pending, sent);
    (done > 0).then(|| Bytes::from(pending.drain(..done).collect::<Vec<u8>>()))
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
                Some(Ok(bytes)) if resumed.is_none() => {
                    if let Some(out) = pass_on(format, &mut pending, bytes, &mut sent) {
                        yield Ok(out);
                    }
                }
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
        assert_eq!((sent.text().as_deref(), sent.tokens), (Some("Hello there"), 2));
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

    #[test]
    fn whole_events_pass_on_uncopied_and_a_split_one_waits_for_its_end() {
        let mut sent = Sent::new(Format::Sse);
        let mut pending = Vec::new();
        let first = Bytes::from_static(b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"a\\\"b\"}}]}\n\n");
        let out = pass_on(Format::Sse, &mut pending, first.clone(), &mut sent).expect("one event");
        assert_eq!(out.as_ptr(), first.as_ptr(), "passed on without a copy");
        let out = pass_on(
            Format::Sse,
            &mut pending,
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"cont"),
            &mut sent,
        );
        assert!(out.is_none() && !pending.is_empty());
        let out = pass_on(Format::Sse, &mut pending, Bytes::from_static(b"ent\":\"c\"}}]}\n"), &mut sent);
        assert!(out.is_none(), "half of the blank line is not an end");
        let out =
            pass_on(Format::Sse, &mut pending, Bytes::from_static(b"\ndata: [DONE]\n\n"), &mut sent).expect("two");
        assert!(out.ends_with(b"data: [DONE]\n\n") && pending.is_empty());
        assert_eq!((sent.id.as_deref(), sent.text().as_deref(), sent.tokens), (Some("c1"), Some("a\"bc"), 2));
    }

    #[test]
    fn a_tool_call_and_ollama_lines_are_noted_without_parsing() {
        let mut sent = Sent::new(Format::Ndjson);
        let mut pending = Vec::new();
        let lines = Bytes::from_static(b"{\"message\":{\"role\":\"assistant\",\"content\":\"x\"},\"done\":false}\n{\"message\":{\"content\":\"\",\"tool_calls\":[]},\"done\":false}\n");
        assert!(pass_on(Format::Ndjson, &mut pending, lines, &mut sent).is_some());
        assert_eq!((sent.text().as_deref(), sent.tokens, sent.in_tool_call), (Some("x"), 1, true));
    }
}
