//! Anthropic's Messages API on a backend that speaks only OpenAI's chat
//! completions (Ollama before 0.14, older vLLM, most cloud aggregators):
//! the request becomes a `/v1/chat/completions` body, and the answer, one
//! document or an SSE stream, comes back in Anthropic's shapes (the named
//! events its SDKs parse). Text, images, tool definitions, tool calls and
//! tool results are carried; fields chat completions has no place for
//! (`top_k`, `metadata`, cache control) are dropped.

use bytes::Bytes;
use llmesh_mesh::ServeError;
use serde_json::{Map, Value, json};

use super::translate::SseReader;

fn bad(message: impl Into<String>) -> ServeError {
    ServeError::BadRequest(message.into())
}

/// The text of a string or of text blocks.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => {
            blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    }
}

/// An image block as a chat content part (a data URL or a URL).
fn image_part(block: &Value) -> Option<Value> {
    let source = block.get("source")?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source.get("media_type").and_then(Value::as_str).unwrap_or("image/png"),
            source.get("data").and_then(Value::as_str).unwrap_or_default()
        ),
        Some("url") => source.get("url").and_then(Value::as_str)?.to_string(),
        _ => return None,
    };
    Some(json!({ "type": "image_url", "image_url": { "url": url } }))
}

/// One Anthropic message as chat messages: tool results become `tool`
/// messages (before the rest of the turn), tool uses become `tool_calls`.
fn convert_message(message: &Value, out: &mut Vec<Value>) -> Result<(), ServeError> {
    let role = message.get("role").and_then(Value::as_str).ok_or_else(|| bad("messages: each needs a role"))?;
    let blocks = match message.get("content") {
        Some(Value::String(text)) => {
            out.push(json!({ "role": role, "content": text }));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => return Err(bad("messages: content must be a string or an array of blocks")),
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                parts.push(json!({ "type": "text", "text": block.get("text").cloned().unwrap_or_default() }))
            }
            Some("image") => parts.extend(image_part(block)),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or_default(),
                    "arguments": block.get("input").map_or_else(|| "{}".to_string(), Value::to_string),
                },
            })),
            Some("tool_result") => out.push(json!({
                "role": "tool",
                "tool_call_id": block.get("tool_use_id").cloned().unwrap_or_default(),
                "content": text_of(block.get("content")),
            })),
            // Thinking and other blocks have no chat equivalent.
            _ => {}
        }
    }
    let only_text = parts.iter().all(|p| p["type"] == "text");
    let content = if only_text {
        json!(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n"))
    } else {
        json!(parts)
    };
    if !calls.is_empty() {
        out.push(json!({ "role": role, "content": content, "tool_calls": calls }));
    } else if !parts.is_empty() {
        out.push(json!({ "role": role, "content": content }));
    }
    Ok(())
}

fn tool_choice(choice: &Value) -> Option<Value> {
    Some(match choice.get("type").and_then(Value::as_str)? {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => json!({ "type": "function", "function": { "name": choice.get("name")? } }),
        _ => return None,
    })
}

/// A Messages request as a chat completions body.
pub fn to_chat(body: &[u8]) -> Result<Value, ServeError> {
    let src: Map<String, Value> = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let mut messages = Vec::new();
    if let Some(system) = src.get("system") {
        messages.push(json!({ "role": "system", "content": text_of(Some(system)) }));
    }
    for message in src.get("messages").and_then(Value::as_array).ok_or_else(|| bad("messages: field required"))? {
        convert_message(message, &mut messages)?;
    }
    let mut out = Map::new();
    out.insert("model".into(), src.get("model").cloned().unwrap_or_default());
    out.insert("messages".into(), json!(messages));
    for (from, to) in [("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")] {
        if let Some(value) = src.get(from) {
            out.insert(to.into(), value.clone());
        }
    }
    if let Some(stop) = src.get("stop_sequences") {
        out.insert("stop".into(), stop.clone());
    }
    if let Some(tools) = src.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({ "type": "function", "function": {
                    "name": t.get("name"), "description": t.get("description"),
                    "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({ "type": "object" })),
                }})
            })
            .collect();
        out.insert("tools".into(), json!(tools));
    }
    if let Some(choice) = src.get("tool_choice").and_then(tool_choice) {
        out.insert("tool_choice".into(), choice);
    }
    let stream = src.get("stream").and_then(Value::as_bool).unwrap_or(false);
    out.insert("stream".into(), json!(stream));
    if stream {
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    Ok(Value::Object(out))
}

fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        _ => "end_turn",
    }
}

fn usage(usage: Option<&Value>) -> Value {
    let count = |key: &str| usage.and_then(|u| u.get(key)).and_then(Value::as_u64).unwrap_or(0);
    let cached =
        usage.and_then(|u| u.pointer("/prompt_tokens_details/cached_tokens")).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "input_tokens": count("prompt_tokens").saturating_sub(cached),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        "output_tokens": count("completion_tokens"),
    })
}

fn message_id(chat_id: Option<&str>) -> String {
    format!("msg_{}", chat_id.unwrap_or("llmesh").trim_start_matches("chatcmpl-"))
}

/// A tool call's arguments (a JSON string) as the `input` object.
fn input_of(arguments: Option<&Value>) -> Value {
    arguments.and_then(Value::as_str).and_then(|a| serde_json::from_str(a).ok()).unwrap_or_else(|| json!({}))
}

/// A chat completion as a Messages answer for `model`.
pub fn from_chat(answer: &Value, model: &str) -> Value {
    let choice = answer.pointer("/choices/0");
    let message = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    if let Some(text) = message.and_then(|m| m.get("content")).and_then(Value::as_str).filter(|t| !t.is_empty()) {
        content.push(json!({ "type": "text", "text": text }));
    }
    for call in message.and_then(|m| m.get("tool_calls")).and_then(Value::as_array).into_iter().flatten() {
        content.push(json!({
            "type": "tool_use", "id": call.get("id").cloned().unwrap_or_default(),
            "name": call.pointer("/function/name").cloned().unwrap_or_default(),
            "input": input_of(call.pointer("/function/arguments")),
        }));
    }
    json!({
        "id": message_id(answer.get("id").and_then(Value::as_str)), "type": "message", "role": "assistant",
        "model": model, "content": content,
        "stop_reason": stop_reason(choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str)),
        "stop_sequence": null, "usage": usage(answer.get("usage")),
    })
}

/// An error answer in Anthropic's shape.
pub fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    };
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// What the open content block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Tool(u64),
}

/// Turns a chat completions SSE stream into Anthropic's events as bytes
/// arrive: `message_start`, a content block per text run or tool call with
/// its deltas, `message_delta` with the stop reason and usage,
/// `message_stop`. An error in the stream becomes an `error` event.
pub struct ChatToMessagesSse {
    model: String,
    reader: SseReader,
    started: bool,
    open: Option<Block>,
    index: u64,
    finish: Option<String>,
    usage: Option<Value>,
    done: bool,
}

impl ChatToMessagesSse {
    /// A translator for one answer to a request for `model`.
    pub fn new(model: &str) -> ChatToMessagesSse {
        ChatToMessagesSse {
            model: model.to_string(),
            reader: SseReader::default(),
            started: false,
            open: None,
            index: 0,
            finish: None,
            usage: None,
            done: false,
        }
    }

    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        for data in self.reader.push(chunk) {
            if data == "[DONE]" {
                out.extend(self.finish());
            } else if let Ok(value) = serde_json::from_str::<Value>(&data) {
                self.chunk(&value, &mut out);
            }
        }
        out
    }

    fn start(&mut self, id: Option<&str>, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push(event(
            "message_start",
            &json!({ "type": "message_start", "message": {
                "id": message_id(id), "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(None),
            }}),
        ));
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.open.take().is_some() {
            out.push(event("content_block_stop", &json!({ "type": "content_block_stop", "index": self.index })));
            self.index += 1;
        }
    }

    fn open(&mut self, block: Block, content_block: Value, out: &mut Vec<Bytes>) {
        if self.open == Some(block) {
            return;
        }
        self.close(out);
        self.open = Some(block);
        out.push(event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": self.index, "content_block": content_block }),
        ));
    }

    fn delta(&self, delta: Value, out: &mut Vec<Bytes>) {
        out.push(event(
            "content_block_delta",
            &json!({ "type": "content_block_delta", "index": self.index, "delta": delta }),
        ));
    }

    fn chunk(&mut self, value: &Value, out: &mut Vec<Bytes>) {
        if self.done {
            return;
        }
        if let Some(error) = value.get("error") {
            let message =
                error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
            out.push(event("error", &error_body(500, &message)));
            self.done = true;
            return;
        }
        self.start(value.get("id").and_then(Value::as_str), out);
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        let Some(choice) = value.pointer("/choices/0") else { return };
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(reason.to_string());
        }
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            self.open(Block::Text, json!({ "type": "text", "text": "" }), out);
            self.delta(json!({ "type": "text_delta", "text": text }), out);
        }
        for fragment in choice.pointer("/delta/tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let call = fragment.get("index").and_then(Value::as_u64).unwrap_or(0);
            if self.open != Some(Block::Tool(call)) {
                let block = json!({
                    "type": "tool_use", "id": fragment.get("id").cloned().unwrap_or_default(),
                    "name": fragment.pointer("/function/name").cloned().unwrap_or_default(), "input": {},
                });
                self.open(Block::Tool(call), block, out);
            }
            if let Some(arguments) =
                fragment.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty())
            {
                self.delta(json!({ "type": "input_json_delta", "partial_json": arguments }), out);
            }
        }
    }

    /// Ends the answer (once): closes the open block, then the stop reason,
    /// usage and `message_stop`.
    pub fn finish(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.start(None, &mut out);
        self.close(&mut out);
        self.done = true;
        let output_tokens = usage(self.usage.as_ref())["output_tokens"].clone();
        out.push(event(
            "message_delta",
            &json!({ "type": "message_delta",
            "delta": { "stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null },
            "usage": { "output_tokens": output_tokens } }),
        ));
        out.push(event("message_stop", &json!({ "type": "message_stop" })));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_system_images_tools_and_results_becomes_a_chat_body() {
        let body = br#"{"model":"m","max_tokens":9,"system":[{"type":"text","text":"be brief"}],"stop_sequences":["x"],
            "tools":[{"name":"get_time","description":"now","input_schema":{"type":"object","properties":{}}}],
            "tool_choice":{"type":"any"},"stream":true,
            "messages":[{"role":"user","content":[{"type":"text","text":"hi"},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAA"}}]},
              {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"get_time","input":{"tz":"UTC"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"noon"},{"type":"text","text":"thanks"}]}]}"#;
        let chat = to_chat(body).expect("translates");
        assert_eq!(chat["messages"][0], json!({ "role": "system", "content": "be brief" }));
        assert_eq!(chat["messages"][1]["content"][1]["image_url"]["url"], "data:image/png;base64,AAA");
        assert_eq!(chat["messages"][2]["tool_calls"][0]["function"]["arguments"], r#"{"tz":"UTC"}"#);
        assert_eq!(chat["messages"][3], json!({ "role": "tool", "tool_call_id": "t1", "content": "noon" }));
        assert_eq!(chat["messages"][4], json!({ "role": "user", "content": "thanks" }));
        assert_eq!((chat["max_tokens"].clone(), chat["stop"].clone()), (json!(9), json!(["x"])));
        assert_eq!(chat["tools"][0]["function"]["name"], "get_time");
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(chat["stream_options"]["include_usage"], true);
        assert!(to_chat(br#"{"model":"m"}"#).is_err());
        assert!(to_chat(br#"{"model":"m","messages":[{"content":"x"}]}"#).is_err());
    }

    #[test]
    fn a_chat_answer_becomes_a_message() {
        let answer = json!({ "id": "chatcmpl-7", "choices": [{ "finish_reason": "tool_calls", "message": {
            "content": "checking", "tool_calls": [{ "id": "c1", "function": { "name": "get_time", "arguments": "{\"tz\":\"UTC\"}" } }] } }],
            "usage": { "prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": { "cached_tokens": 4 } } });
        let message = from_chat(&answer, "asked");
        assert_eq!((message["id"].as_str(), message["model"].as_str()), (Some("msg_7"), Some("asked")));
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(message["content"][1]["input"], json!({ "tz": "UTC" }));
        assert_eq!(
            (message["usage"]["input_tokens"].clone(), message["usage"]["cache_read_input_tokens"].clone()),
            (json!(6), json!(4))
        );
    }

    fn events(out: &[Bytes]) -> Vec<(String, Value)> {
        out.iter()
            .map(|b| {
                let text = String::from_utf8_lossy(b);
                let name = text.lines().next().and_then(|l| l.strip_prefix("event: ")).unwrap_or_default().to_string();
                let data = text.lines().nth(1).and_then(|l| l.strip_prefix("data: ")).unwrap_or("null");
                (name, serde_json::from_str(data).unwrap_or(Value::Null))
            })
            .collect()
    }

    #[test]
    fn a_chat_stream_becomes_anthropics_events_even_split_anywhere() {
        let stream = concat!(
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        );
        for split in [1, 7, 50, stream.len()] {
            let mut translator = ChatToMessagesSse::new("asked");
            let mut out = Vec::new();
            for piece in stream.as_bytes().chunks(split) {
                out.extend(translator.push(piece));
            }
            out.extend(translator.finish());
            let names: Vec<String> = events(&out).into_iter().map(|(n, _)| n).collect();
            assert_eq!(
                names,
                [
                    "message_start",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_delta",
                    "content_block_stop",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop"
                ],
                "split every {split} bytes"
            );
            let all = events(&out);
            assert_eq!(all[0].1["message"]["model"], "asked");
            assert_eq!(all[5].1["content_block"]["name"], "f");
            assert_eq!(all[9].1["delta"]["stop_reason"], "tool_use");
            assert_eq!(all[9].1["usage"]["output_tokens"], 7);
        }
    }

    #[test]
    fn an_error_in_the_stream_becomes_an_error_event() {
        let mut translator = ChatToMessagesSse::new("m");
        let out = translator.push(b"data: {\"error\":{\"message\":\"boom\"}}\n\n");
        let all = events(&out);
        assert_eq!(all[0].0, "error");
        assert_eq!(all[0].1["error"]["message"], "boom");
        assert!(translator.finish().is_empty());
    }
}
