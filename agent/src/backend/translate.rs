//! Ollama's native API spoken to an OpenAI-compatible server: requests are
//! rewritten into `/v1/*` calls and answers back into Ollama's shapes,
//! streaming SSE turned into NDJSON line by line. Pure functions and a
//! small incremental translator, so all of it is tested without sockets.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::{BodyStream, InferenceResponse, ServeError};
use serde_json::{Map, Value, json};

/// Which Ollama field carries generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    /// `/api/chat`: `message.content`.
    Message,
    /// `/api/generate`: `response`.
    Response,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ServeError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ServeError::BadRequest("request body must be a JSON object".into())),
        Err(e) => Err(ServeError::BadRequest(format!("malformed JSON in request body: {e}"))),
    }
}

/// Copies Ollama `options` and `format` onto an OpenAI request.
fn sampling(src: &Map<String, Value>, out: &mut Map<String, Value>) {
    if let Some(options) = src.get("options").and_then(Value::as_object) {
        for (from, to) in [
            ("num_predict", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("stop", "stop"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
        ] {
            if let Some(value) = options.get(from) {
                // Ollama's -1 / -2 mean "no limit"; OpenAI has no such value.
                if from == "num_predict" && value.as_i64().is_some_and(|n| n <= 0) {
                    continue;
                }
                out.insert(to.into(), value.clone());
            }
        }
    }
    match src.get("format") {
        Some(Value::String(s)) if s == "json" => {
            out.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({ "type": "json_schema", "json_schema": { "name": "response", "schema": schema } }),
            );
        }
        _ => {}
    }
}

/// One Ollama chat message as an OpenAI message.
fn message(m: &Value) -> Value {
    let role = m.get("role").cloned().unwrap_or_else(|| json!("user"));
    let content = m.get("content").cloned().unwrap_or(json!(""));
    let mut out = Map::new();
    out.insert("role".into(), role);
    match m.get("images").and_then(Value::as_array).filter(|i| !i.is_empty()) {
        Some(images) => {
            let mut parts = vec![json!({ "type": "text", "text": content })];
            parts.extend(images.iter().filter_map(Value::as_str).map(
                |b64| json!({ "type": "image_url", "image_url": { "url": format!("data:image/png;base64,{b64}") } }),
            ));
            out.insert("content".into(), Value::Array(parts));
        }
        None => {
            out.insert("content".into(), content);
        }
    }
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let arguments = call.pointer("/function/arguments").cloned().unwrap_or(json!({}));
                json!({
                    "id": format!("call_{i}"), "type": "function",
                    "function": { "name": call.pointer("/function/name").cloned().unwrap_or(json!("")),
                                  "arguments": arguments.to_string() },
                })
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(out)
}

/// A translated request: the OpenAI path and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// `/v1/...` path.
    pub path: &'static str,
    /// The OpenAI request body.
    pub body: Value,
}

fn finish_request(src: &Map<String, Value>, mut out: Map<String, Value>, stream: bool) -> Value {
    out.insert("model".into(), src.get("model").cloned().unwrap_or(json!("")));
    out.insert("stream".into(), json!(stream));
    if stream {
        // Ollama's last line carries token counts; ask for them.
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    sampling(src, &mut out);
    Value::Object(out)
}

/// `/api/chat` → `/v1/chat/completions`. `None` for no messages, which
/// Ollama treats as "load the model".
pub fn chat_request(body: &[u8], stream: bool) -> Result<Option<Translated>, ServeError> {
    let src = object(body)?;
    let messages: Vec<Value> =
        src.get("messages").and_then(Value::as_array).into_iter().flatten().map(message).collect();
    if messages.is_empty() {
        return Ok(None);
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = src.get("tools").filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
        out.insert("tools".into(), tools.clone());
    }
    Ok(Some(Translated { path: "/v1/chat/completions", body: finish_request(&src, out, stream) }))
}

/// `/api/generate` → `/v1/chat/completions` (or `/v1/completions` when
/// `raw`, which skips the chat template). `None` for an empty prompt, which
/// Ollama treats as "load the model".
pub fn generate_request(body: &[u8], stream: bool) -> Result<Option<Translated>, ServeError> {
    let src = object(body)?;
    let prompt = src.get("prompt").and_then(Value::as_str).unwrap_or_default();
    if prompt.is_empty() {
        return Ok(None);
    }
    let mut out = Map::new();
    if src.get("raw").and_then(Value::as_bool) == Some(true) {
        out.insert("prompt".into(), json!(prompt));
        return Ok(Some(Translated { path: "/v1/completions", body: finish_request(&src, out, stream) }));
    }
    let mut messages = Vec::new();
    if let Some(system) = src.get("system").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        messages.push(json!({ "role": "system", "content": system }));
    }
    let images = src.get("images").cloned().unwrap_or(Value::Null);
    messages.push(message(&json!({ "role": "user", "content": prompt, "images": images })));
    out.insert("messages".into(), Value::Array(messages));
    Ok(Some(Translated { path: "/v1/chat/completions", body: finish_request(&src, out, stream) }))
}

/// `/api/embed` and `/api/embeddings` → `/v1/embeddings`.
pub fn embed_request(body: &[u8], legacy: bool) -> Result<Translated, ServeError> {
    let src = object(body)?;
    let input = if legacy { src.get("prompt") } else { src.get("input") }.cloned().unwrap_or(json!(""));
    Ok(Translated {
        path: "/v1/embeddings",
        body: json!({ "model": src.get("model").cloned().unwrap_or(json!("")), "input": input, "encoding_format": "float" }),
    })
}

/// The answer Ollama gives to an empty generate prompt or chat (a preload).
pub fn load_response(model: &str, chat: bool) -> Value {
    let mut answer = json!({ "model": model, "created_at": now_rfc3339(), "done": true, "done_reason": "load" });
    if chat {
        answer["message"] = json!({ "role": "assistant", "content": "" });
    } else {
        answer["response"] = json!("");
    }
    answer
}

/// OpenAI tool calls as Ollama's (arguments as objects, not strings).
fn tool_calls(calls: &[Value]) -> Vec<Value> {
    calls
        .iter()
        .map(|call| {
            let arguments = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .and_then(|a| serde_json::from_str::<Value>(a).ok())
                .unwrap_or(json!({}));
            json!({ "function": { "name": call.pointer("/function/name").cloned().unwrap_or(json!("")), "arguments": arguments } })
        })
        .collect()
}

fn text_line(model: &str, field: TextField, text: &str, done: bool) -> Value {
    let mut line = json!({ "model": model, "created_at": now_rfc3339(), "done": done });
    match field {
        TextField::Message => line["message"] = json!({ "role": "assistant", "content": text }),
        TextField::Response => line["response"] = json!(text),
    }
    line
}

/// When a translated response's parts arrived, for Ollama's durations.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// From sending the request to the end of the answer.
    pub total: Duration,
    /// From sending the request to the first generated token, when one
    /// came (the prompt's evaluation, and any wait and load before it).
    pub first_token: Option<Duration>,
}

/// Ollama's final fields. The durations are the backend's own when it
/// reports them (llama-server's `timings`), else measured here: prompt
/// evaluation until the first token, evaluation from it to the end.
fn final_fields(
    line: &mut Value,
    finish: Option<&str>,
    usage: Option<&Value>,
    reported: Option<&Value>,
    timing: Timing,
) {
    let count = |key: &str| usage.and_then(|u| u.get(key)).and_then(Value::as_u64).unwrap_or(0);
    line["done_reason"] = json!(match finish {
        Some("length") => "length",
        _ => "stop",
    });
    let nanos = |d: Duration| d.as_nanos() as u64;
    let reported_ms = |key: &str| reported.and_then(|t| t.get(key)).and_then(Value::as_f64).map(|ms| (ms * 1e6) as u64);
    let first = timing.first_token.unwrap_or(timing.total);
    line["total_duration"] = json!(nanos(timing.total));
    line["load_duration"] = json!(0);
    line["prompt_eval_count"] = json!(count("prompt_tokens"));
    line["prompt_eval_duration"] = json!(reported_ms("prompt_ms").unwrap_or(nanos(first)));
    line["eval_count"] = json!(count("completion_tokens"));
    line["eval_duration"] = json!(reported_ms("predicted_ms").unwrap_or(nanos(timing.total.saturating_sub(first))));
}

/// A non-streaming OpenAI chat/completions answer in Ollama's shape.
pub fn completion_response(model: &str, field: TextField, answer: &Value, timing: Timing) -> Value {
    let choice = answer.pointer("/choices/0").cloned().unwrap_or(Value::Null);
    let text =
        choice.pointer("/message/content").or_else(|| choice.get("text")).and_then(Value::as_str).unwrap_or_default();
    let mut line = text_line(model, field, text, true);
    if let Some(calls) = choice.pointer("/message/tool_calls").and_then(Value::as_array) {
        line["message"]["tool_calls"] = json!(tool_calls(calls));
    }
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    final_fields(&mut line, finish, answer.get("usage"), answer.get("timings"), timing);
    line
}

/// An OpenAI embeddings answer as `/api/embed` (or legacy `/api/embeddings`).
pub fn embed_response(model: &str, answer: &Value, legacy: bool) -> Value {
    let vectors: Vec<Value> = answer
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|d| d.get("embedding").cloned().unwrap_or(json!([])))
        .collect();
    if legacy {
        return json!({ "embedding": vectors.into_iter().next().unwrap_or(json!([])) });
    }
    let tokens = answer.pointer("/usage/prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    json!({ "model": model, "embeddings": vectors, "prompt_eval_count": tokens })
}

/// An OpenAI error body's message (or the raw text when it is not one).
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message").or_else(|| v.get("error")).and_then(Value::as_str).map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// Splits an SSE stream into its `data:` payloads as bytes arrive, however
/// the bytes are cut.
#[derive(Debug, Default)]
pub struct SseReader {
    buffer: Vec<u8>,
}

impl SseReader {
    /// Feeds bytes; returns the payloads of the `data:` lines they complete.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.buffer.drain(..=end).collect();
            let text = String::from_utf8_lossy(&raw);
            if let Some(data) = text.trim_end_matches(['\r', '\n']).strip_prefix("data:") {
                out.push(data.trim().to_string());
            }
        }
        out
    }
}

/// Turns an OpenAI SSE stream into Ollama NDJSON as bytes arrive.
pub struct SseToNdjson {
    model: String,
    field: TextField,
    reader: SseReader,
    finish: Option<String>,
    usage: Option<Value>,
    /// Streamed tool calls arrive in fragments; collected by index.
    calls: Vec<Value>,
    done: bool,
    started: std::time::Instant,
    first_token: Option<Duration>,
    /// The backend's own timings (llama-server sends them).
    timings: Option<Value>,
}

impl SseToNdjson {
    /// A translator for one response.
    pub fn new(model: &str, field: TextField) -> SseToNdjson {
        SseToNdjson {
            model: model.to_string(),
            field,
            reader: SseReader::default(),
            finish: None,
            usage: None,
            calls: Vec::new(),
            done: false,
            started: std::time::Instant::now(),
            first_token: None,
            timings: None,
        }
    }

    fn line(value: &Value) -> Bytes {
        let mut text = value.to_string();
        text.push('\n');
        Bytes::from(text)
    }

    /// Feeds bytes; returns the NDJSON lines they complete.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        for data in self.reader.push(chunk) {
            out.extend(self.event(&data));
        }
        out
    }

    fn event(&mut self, data: &str) -> Vec<Bytes> {
        if self.done {
            return Vec::new();
        }
        if data == "[DONE]" {
            return self.finish();
        }
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            return Vec::new();
        };
        if let Some(error) = value.get("error") {
            self.done = true;
            let message =
                error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
            return vec![Self::line(&json!({ "error": message }))];
        }
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        if let Some(timings) = value.get("timings").filter(|t| t.is_object()) {
            self.timings = Some(timings.clone());
        }
        let Some(choice) = value.pointer("/choices/0") else {
            return Vec::new();
        };
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(reason.to_string());
        }
        let fragments = choice.pointer("/delta/tool_calls").and_then(Value::as_array);
        let has_text = choice
            .pointer("/delta/content")
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        if self.first_token.is_none() && (has_text || fragments.is_some_and(|f| !f.is_empty())) {
            self.first_token = Some(self.started.elapsed());
        }
        for fragment in fragments.into_iter().flatten() {
            let index = fragment.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            while self.calls.len() <= index {
                self.calls.push(json!({ "function": { "name": "", "arguments": "" } }));
            }
            let call = &mut self.calls[index];
            if let Some(name) = fragment.pointer("/function/name").and_then(Value::as_str) {
                call["function"]["name"] = json!(name);
            }
            if let Some(arguments) = fragment.pointer("/function/arguments").and_then(Value::as_str) {
                let joined = format!("{}{arguments}", call["function"]["arguments"].as_str().unwrap_or_default());
                call["function"]["arguments"] = json!(joined);
            }
        }
        let text =
            choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str).unwrap_or_default();
        if text.is_empty() {
            return Vec::new();
        }
        vec![Self::line(&text_line(&self.model, self.field, text, false))]
    }

    /// Ends the stream: the final `done` line (once).
    pub fn finish(&mut self) -> Vec<Bytes> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut out = Vec::new();
        if !self.calls.is_empty() && self.field == TextField::Message {
            let mut line = text_line(&self.model, self.field, "", false);
            line["message"]["tool_calls"] = json!(tool_calls(&self.calls));
            out.push(Self::line(&line));
        }
        let mut last = text_line(&self.model, self.field, "", true);
        let timing = Timing { total: self.started.elapsed(), first_token: self.first_token };
        final_fields(&mut last, self.finish.as_deref(), self.usage.as_ref(), self.timings.as_ref(), timing);
        out.push(Self::line(&last));
        out
    }
}

/// Folds the NDJSON lines of a translated stream into Ollama's one
/// non-streaming answer: the text joined, tool calls kept, the final
/// line's counts and durations. An error line is the answer.
pub fn fold_lines(lines: &[Bytes]) -> Value {
    let mut text = String::new();
    let mut calls = None;
    let mut last = Value::Null;
    for line in lines {
        let Ok(value) = serde_json::from_slice::<Value>(line) else { continue };
        if value.get("error").is_some() {
            return value;
        }
        if let Some(piece) = value.pointer("/message/content").or_else(|| value.get("response")).and_then(Value::as_str)
        {
            text.push_str(piece);
        }
        if let Some(found) = value.pointer("/message/tool_calls") {
            calls = Some(found.clone());
        }
        last = value;
    }
    if last.get("message").is_some() {
        last["message"]["content"] = json!(text);
        if let Some(calls) = calls {
            last["message"]["tool_calls"] = calls;
        }
    } else if last.is_object() {
        last["response"] = json!(text);
    }
    last
}

/// Largest translated non-streaming answer; these are small JSON documents.
const MAX_TRANSLATED_BYTES: usize = 64 * 1024 * 1024;

/// A whole JSON answer with `status`.
pub(crate) fn json_response(status: u16, value: &Value) -> InferenceResponse {
    let bytes = Bytes::from(value.to_string());
    InferenceResponse {
        status,
        content_type: "application/json".into(),
        body: Box::pin(futures::stream::once(async move { Ok(bytes) })),
    }
}

/// Reads a whole (small) backend answer.
pub(crate) async fn collect(mut body: BodyStream) -> Result<Bytes, ServeError> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ServeError::BackendUnreachable(e.to_string()))?;
        if buffer.len() + chunk.len() > MAX_TRANSLATED_BYTES {
            return Err(ServeError::BackendUnreachable(format!("backend answer exceeds {MAX_TRANSLATED_BYTES} bytes")));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Parses a backend's JSON answer.
pub(crate) fn parse_answer(bytes: &[u8]) -> Result<Value, ServeError> {
    serde_json::from_slice(bytes).map_err(|e| ServeError::BackendUnreachable(format!("backend sent invalid JSON: {e}")))
}

/// A translator of a streamed answer: bytes in as they arrive, the
/// client's format out.
pub(crate) trait StreamTranslator: Send + 'static {
    /// Feeds bytes; returns what they complete.
    fn push(&mut self, chunk: &[u8]) -> Vec<Bytes>;
    /// Ends the answer (the backend's body ended cleanly).
    fn finish(&mut self) -> Vec<Bytes>;
}

impl StreamTranslator for SseToNdjson {
    fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        SseToNdjson::push(self, chunk)
    }
    fn finish(&mut self) -> Vec<Bytes> {
        SseToNdjson::finish(self)
    }
}

/// `body` translated chunk by chunk; a broken body is passed on as broken
/// (the relay turns it into the client format's error event).
pub(crate) fn translated(mut body: BodyStream, mut translator: impl StreamTranslator) -> BodyStream {
    Box::pin(async_stream::stream! {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    for out in translator.push(&bytes) {
                        yield Ok(out);
                    }
                }
                Err(err) => {
                    yield Err(err);
                    return;
                }
            }
        }
        // A cleanly ended HTTP body without [DONE] is still complete.
        for out in translator.finish() {
            yield Ok(out);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[Bytes]) -> Vec<Value> {
        out.iter().map(|b| serde_json::from_slice(b).expect("json line")).collect()
    }

    #[test]
    fn chat_request_maps_options_format_images_and_tools() {
        let body = json!({
            "model": "m", "stream": true, "format": "json",
            "options": { "num_predict": 7, "temperature": 0.2, "num_ctx": 4096 },
            "messages": [{ "role": "user", "content": "what is this", "images": ["AAAA"] }],
            "tools": [{ "type": "function", "function": { "name": "f", "parameters": {} } }],
        });
        let t = chat_request(body.to_string().as_bytes(), true).expect("translates").expect("messages");
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.body["max_tokens"], 7);
        assert_eq!(t.body["temperature"], 0.2);
        assert!(t.body.get("num_ctx").is_none());
        assert_eq!(t.body["response_format"]["type"], "json_object");
        assert_eq!(t.body["stream_options"]["include_usage"], true);
        assert_eq!(t.body["messages"][0]["content"][1]["image_url"]["url"], "data:image/png;base64,AAAA");
        assert_eq!(t.body["tools"][0]["function"]["name"], "f");
    }

    #[test]
    fn generate_request_uses_chat_unless_raw_and_empty_means_load() {
        let t =
            generate_request(br#"{"model":"m","prompt":"hi","system":"be brief"}"#, false).expect("ok").expect("some");
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.body["messages"][0]["role"], "system");
        assert_eq!(t.body["messages"][1]["content"], "hi");
        let raw = generate_request(br#"{"model":"m","prompt":"hi","raw":true}"#, false).expect("ok").expect("some");
        assert_eq!(raw.path, "/v1/completions");
        assert!(generate_request(br#"{"model":"m"}"#, true).expect("ok").is_none());
        assert!(generate_request(b"[]", true).is_err());
    }

    #[test]
    fn sse_becomes_ndjson_with_a_final_line() {
        let mut t = SseToNdjson::new("m", TextField::Message);
        let mut out = t.push(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hel");
        assert!(out.is_empty(), "a partial event yields nothing yet");
        out.extend(t.push(b"lo\"}}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n"));
        out.extend(t.push(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n",
        ));
        let out = lines(&out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["message"]["content"], "Hello");
        assert_eq!(out[0]["done"], false);
        assert_eq!(out[1]["done"], true);
        assert_eq!(out[1]["done_reason"], "length");
        assert_eq!(out[1]["eval_count"], 1);
        assert_eq!(out[1]["prompt_eval_count"], 3);
        assert!(t.finish().is_empty(), "the final line is sent once");
    }

    #[test]
    fn streamed_tool_call_fragments_are_joined() {
        let mut t = SseToNdjson::new("m", TextField::Message);
        t.push(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n");
        t.push(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n");
        let out = lines(&t.push(b"data: [DONE]\n"));
        assert_eq!(out[0]["message"]["tool_calls"][0]["function"]["arguments"]["a"], 1);
        assert_eq!(out[1]["done"], true);
    }

    #[test]
    fn upstream_error_event_becomes_an_error_line() {
        let mut t = SseToNdjson::new("m", TextField::Response);
        let out = lines(&t.push(b"data: {\"error\":{\"message\":\"boom\"}}\n\n"));
        assert_eq!(out[0]["error"], "boom");
        assert!(t.finish().is_empty(), "no done line after an error");
    }

    #[test]
    fn non_streaming_answers_convert() {
        let answer = json!({ "choices": [{ "message": { "content": "hi there" }, "finish_reason": "stop" }],
                             "usage": { "prompt_tokens": 2, "completion_tokens": 2 } });
        let timing = |ms| Timing { total: Duration::from_millis(ms), first_token: None };
        let chat = completion_response("m", TextField::Message, &answer, timing(5));
        assert_eq!(chat["message"]["content"], "hi there");
        assert_eq!(chat["eval_count"], 2);
        let gen_answer = json!({ "choices": [{ "text": "once", "finish_reason": "length" }] });
        let generated = completion_response("m", TextField::Response, &gen_answer, timing(0));
        assert_eq!(generated["response"], "once");
        assert_eq!(generated["done_reason"], "length");
        let embed = json!({ "data": [{ "embedding": [0.5, 0.5] }], "usage": { "prompt_tokens": 1 } });
        assert_eq!(embed_response("m", &embed, false)["embeddings"][0][1], 0.5);
        assert_eq!(embed_response("m", &embed, true)["embedding"][0], 0.5);
        assert_eq!(error_message(br#"{"error":{"message":"nope"}}"#), "nope");
        assert_eq!(error_message(b"plain"), "plain");
    }

    #[test]
    fn durations_split_at_the_first_token_or_come_from_the_backend() {
        let mut t = SseToNdjson::new("m", TextField::Message);
        std::thread::sleep(Duration::from_millis(20));
        let mut lines = t.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        std::thread::sleep(Duration::from_millis(20));
        lines.extend(t.push(b"data: {\"choices\":[{\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"));
        let last: Value = serde_json::from_slice(lines.last().expect("final line")).expect("json");
        let n = |k: &str| last[k].as_u64().expect(k);
        assert!(n("prompt_eval_duration") >= 20_000_000, "{last}");
        assert!(n("eval_duration") >= 20_000_000, "{last}");
        assert!(n("prompt_eval_duration") + n("eval_duration") <= n("total_duration"));
        // Folded into one answer for a client that does not stream.
        let answer = fold_lines(&lines);
        assert_eq!(answer["message"]["content"], "hi there");
        assert_eq!((answer["done"].as_bool(), answer["eval_count"].as_u64()), (Some(true), Some(2)));
        // llama-server's own timings win.
        let mut t = SseToNdjson::new("m", TextField::Response);
        let lines = t.push(b"data: {\"choices\":[{\"text\":\"x\",\"finish_reason\":\"length\"}],\"timings\":{\"prompt_ms\":12.5,\"predicted_ms\":40.0}}\n\ndata: [DONE]\n\n");
        let last: Value = serde_json::from_slice(lines.last().expect("final line")).expect("json");
        assert_eq!(
            (last["prompt_eval_duration"].as_u64(), last["eval_duration"].as_u64()),
            (Some(12_500_000), Some(40_000_000))
        );
    }
}
