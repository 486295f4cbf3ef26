//! OpenAI's Responses API on a backend that speaks only chat completions:
//! the request (`instructions`, `input` as text or items, function tools
//! and their outputs) becomes a `/v1/chat/completions` body, and the answer
//! comes back as a `response` object or its event stream. Stateless: a
//! request that continues a stored response (`previous_response_id`) is
//! refused, since nothing stores responses.

use bytes::Bytes;
use llmesh_mesh::ServeError;
use serde_json::{Map, Value, json};

use super::translate::SseReader;

fn bad(message: impl Into<String>) -> ServeError {
    ServeError::BadRequest(message.into())
}

/// Content parts of an input message as chat content.
fn content(value: Option<&Value>) -> Value {
    let Some(Value::Array(parts)) = value else {
        return value.cloned().unwrap_or_else(|| json!(""));
    };
    let converted: Vec<Value> = parts
        .iter()
        .filter_map(|part| match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => Some(json!({ "type": "text", "text": part.get("text") })),
            Some("input_image") => {
                let url = part.get("image_url").and_then(Value::as_str)?;
                Some(json!({ "type": "image_url", "image_url": { "url": url } }))
            }
            _ => None,
        })
        .collect();
    if converted.iter().all(|p| p["type"] == "text") {
        json!(converted.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n"))
    } else {
        json!(converted)
    }
}

/// One input item as chat messages.
fn convert_item(item: &Value, out: &mut Vec<Value>) {
    match item.get("type").and_then(Value::as_str) {
        Some("function_call") => out.push(json!({ "role": "assistant", "content": null, "tool_calls": [{
            "id": item.get("call_id"), "type": "function",
            "function": { "name": item.get("name"), "arguments": item.get("arguments").cloned().unwrap_or_else(|| json!("{}")) },
        }]})),
        Some("function_call_output") => out.push(json!({
            "role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output").cloned().unwrap_or_default(),
        })),
        // A message item, typed or not.
        _ => {
            let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
            let role = if role == "developer" { "system" } else { role };
            out.push(json!({ "role": role, "content": content(item.get("content")) }));
        }
    }
}

fn tool_choice(choice: &Value) -> Value {
    match choice {
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            json!({ "type": "function", "function": { "name": o.get("name") } })
        }
        other => other.clone(),
    }
}

/// A Responses request as a chat completions body.
pub fn to_chat(body: &[u8]) -> Result<Value, ServeError> {
    let src: Map<String, Value> = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    if src.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "previous_response_id is not supported: this backend has no Responses API and llmesh stores no responses; send the whole conversation in `input`",
        ));
    }
    let mut messages = Vec::new();
    if let Some(instructions) = src.get("instructions").and_then(Value::as_str) {
        messages.push(json!({ "role": "system", "content": instructions }));
    }
    match src.get("input") {
        Some(Value::String(text)) => messages.push(json!({ "role": "user", "content": text })),
        Some(Value::Array(items)) => items.iter().for_each(|item| convert_item(item, &mut messages)),
        _ => return Err(bad("input: field required (a string or a list of items)")),
    }
    let mut out = Map::new();
    out.insert("model".into(), src.get("model").cloned().unwrap_or_default());
    out.insert("messages".into(), json!(messages));
    for (from, to) in [("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")] {
        if let Some(value) = src.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), value.clone());
        }
    }
    let tools: Vec<Value> = src
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|t| {
            json!({ "type": "function", "function": {
                "name": t.get("name"), "description": t.get("description"),
                "parameters": t.get("parameters").cloned().unwrap_or_else(|| json!({ "type": "object" })),
            }})
        })
        .collect();
    if !tools.is_empty() {
        out.insert("tools".into(), json!(tools));
        if let Some(choice) = src.get("tool_choice") {
            out.insert("tool_choice".into(), tool_choice(choice));
        }
    }
    let stream = src.get("stream").and_then(Value::as_bool).unwrap_or(false);
    out.insert("stream".into(), json!(stream));
    if stream {
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    Ok(Value::Object(out))
}

fn usage(usage: Option<&Value>) -> Value {
    let count = |key: &str| usage.and_then(|u| u.get(key)).and_then(Value::as_u64).unwrap_or(0);
    let cached =
        usage.and_then(|u| u.pointer("/prompt_tokens_details/cached_tokens")).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "input_tokens": count("prompt_tokens"), "output_tokens": count("completion_tokens"),
        "total_tokens": count("prompt_tokens") + count("completion_tokens"),
        "input_tokens_details": { "cached_tokens": cached },
        "output_tokens_details": { "reasoning_tokens": 0 },
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A `response` object around `output`.
fn response_object(id: &str, model: &str, status: &str, output: Value, usage: Value) -> Value {
    json!({
        "id": id, "object": "response", "created_at": unix_now(), "status": status, "model": model,
        "output": output, "usage": usage, "error": null, "incomplete_details": null, "instructions": null,
        "metadata": {}, "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": "auto", "tools": [], "store": false,
    })
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(text) => json!([{ "type": "output_text", "text": text, "annotations": [] }]),
        None => json!([]),
    };
    json!({ "type": "message", "id": id, "status": status, "role": "assistant", "content": content })
}

fn call_item(call: &Value) -> Value {
    let call_id = call.get("id").and_then(Value::as_str).unwrap_or_default();
    json!({
        "type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id, "status": "completed",
        "name": call.pointer("/function/name").cloned().unwrap_or_default(),
        "arguments": call.pointer("/function/arguments").cloned().unwrap_or_else(|| json!("{}")),
    })
}

fn ids(chat_id: Option<&str>) -> (String, String) {
    let base = chat_id.unwrap_or("llmesh").trim_start_matches("chatcmpl-");
    (format!("resp_{base}"), format!("msg_{base}"))
}

/// A chat completion as a `response` object for `model`.
pub fn from_chat(answer: &Value, model: &str) -> Value {
    let (id, item_id) = ids(answer.get("id").and_then(Value::as_str));
    let message = answer.pointer("/choices/0/message");
    let mut output = Vec::new();
    if let Some(text) = message.and_then(|m| m.get("content")).and_then(Value::as_str).filter(|t| !t.is_empty()) {
        output.push(message_item(&item_id, "completed", Some(text)));
    }
    for call in message.and_then(|m| m.get("tool_calls")).and_then(Value::as_array).into_iter().flatten() {
        output.push(call_item(call));
    }
    response_object(&id, model, "completed", json!(output), usage(answer.get("usage")))
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Turns a chat completions SSE stream into the Responses API's events:
/// `response.created`, the message item with its text deltas, function
/// call items once complete, `response.completed` with usage.
pub struct ChatToResponsesSse {
    model: String,
    reader: SseReader,
    id: String,
    item_id: String,
    started: bool,
    text: Option<String>,
    calls: Vec<Value>,
    usage: Option<Value>,
    seq: u64,
    done: bool,
}

impl ChatToResponsesSse {
    /// A translator for one answer to a request for `model`.
    pub fn new(model: &str) -> ChatToResponsesSse {
        ChatToResponsesSse {
            model: model.to_string(),
            reader: SseReader::default(),
            id: String::new(),
            item_id: String::new(),
            started: false,
            text: None,
            calls: Vec::new(),
            usage: None,
            seq: 0,
            done: false,
        }
    }

    fn next(&mut self, name: &str, mut data: Value) -> Bytes {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        event(name, &data)
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

    fn start(&mut self, chat_id: Option<&str>, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        (self.id, self.item_id) = ids(chat_id);
        let started = response_object(&self.id, &self.model, "in_progress", json!([]), Value::Null);
        out.push(self.next("response.created", json!({ "response": started.clone() })));
        out.push(self.next("response.in_progress", json!({ "response": started })));
    }

    fn chunk(&mut self, value: &Value, out: &mut Vec<Bytes>) {
        if self.done {
            return;
        }
        if let Some(error) = value.get("error") {
            let message =
                error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
            out.push(self.next("error", json!({ "code": "server_error", "message": message, "param": null })));
            self.done = true;
            return;
        }
        self.start(value.get("id").and_then(Value::as_str), out);
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        let Some(delta) = value.pointer("/choices/0/delta") else { return };
        if let Some(text) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            if self.text.is_none() {
                self.text = Some(String::new());
                let item = message_item(&self.item_id, "in_progress", None);
                out.push(self.next("response.output_item.added", json!({ "output_index": 0, "item": item })));
                let part = json!({ "type": "output_text", "text": "", "annotations": [] });
                let added = json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0, "part": part });
                out.push(self.next("response.content_part.added", added));
            }
            if let Some(all) = self.text.as_mut() {
                all.push_str(text);
            }
            let delta = json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0, "delta": text, "logprobs": [] });
            out.push(self.next("response.output_text.delta", delta));
        }
        for fragment in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let index = fragment.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            while self.calls.len() <= index {
                self.calls.push(json!({ "id": "", "function": { "name": "", "arguments": "" } }));
            }
            let call = &mut self.calls[index];
            if let Some(id) = fragment.get("id").and_then(Value::as_str) {
                call["id"] = json!(id);
            }
            if let Some(name) = fragment.pointer("/function/name").and_then(Value::as_str) {
                call["function"]["name"] = json!(name);
            }
            if let Some(arguments) = fragment.pointer("/function/arguments").and_then(Value::as_str) {
                let joined = format!("{}{arguments}", call["function"]["arguments"].as_str().unwrap_or_default());
                call["function"]["arguments"] = json!(joined);
            }
        }
    }

    /// Ends the answer (once): the text item's closing events, function
    /// call items, `response.completed`.
    pub fn finish(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.start(None, &mut out);
        self.done = true;
        let mut output = Vec::new();
        if let Some(text) = self.text.clone() {
            let part = json!({ "type": "output_text", "text": text, "annotations": [] });
            let ids = json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0 });
            let mut done = ids.clone();
            done["text"] = json!(text);
            done["logprobs"] = json!([]);
            out.push(self.next("response.output_text.done", done));
            let mut part_done = ids;
            part_done["part"] = part;
            out.push(self.next("response.content_part.done", part_done));
            let item = message_item(&self.item_id, "completed", Some(&text));
            out.push(self.next("response.output_item.done", json!({ "output_index": 0, "item": item.clone() })));
            output.push(item);
        }
        for call in self.calls.clone() {
            let item = call_item(&call);
            let index = output.len();
            out.push(self.next("response.output_item.added", json!({ "output_index": index, "item": item.clone() })));
            out.push(self.next("response.output_item.done", json!({ "output_index": index, "item": item.clone() })));
            output.push(item);
        }
        let done = response_object(&self.id, &self.model, "completed", json!(output), usage(self.usage.as_ref()));
        out.push(self.next("response.completed", json!({ "response": done })));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_items_and_tools_become_a_chat_body() {
        let body = br#"{"model":"m","instructions":"be brief","max_output_tokens":5,"stream":true,
            "tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],"tool_choice":{"type":"function","name":"f"},
            "input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]},
                     {"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},
                     {"type":"function_call_output","call_id":"c1","output":"42"}]}"#;
        let chat = to_chat(body).expect("translates");
        assert_eq!(chat["messages"][0], json!({ "role": "system", "content": "be brief" }));
        assert_eq!(chat["messages"][1], json!({ "role": "user", "content": "hi" }));
        assert_eq!(chat["messages"][2]["tool_calls"][0]["id"], "c1");
        assert_eq!(chat["messages"][3], json!({ "role": "tool", "tool_call_id": "c1", "content": "42" }));
        assert_eq!(chat["max_tokens"], 5);
        assert_eq!(chat["tool_choice"]["function"]["name"], "f");
        assert_eq!(to_chat(br#"{"model":"m","input":"x"}"#).expect("a string")["messages"][0]["content"], "x");
        let stored = to_chat(br#"{"model":"m","input":"x","previous_response_id":"resp_1"}"#);
        assert!(matches!(stored, Err(ServeError::BadRequest(m)) if m.contains("previous_response_id")));
    }

    #[test]
    fn a_chat_answer_becomes_a_response() {
        let answer = json!({ "id": "chatcmpl-3", "choices": [{ "message": { "content": "hello",
            "tool_calls": [{ "id": "c1", "function": { "name": "f", "arguments": "{}" } }] } }],
            "usage": { "prompt_tokens": 4, "completion_tokens": 2 } });
        let response = from_chat(&answer, "asked");
        assert_eq!((response["id"].as_str(), response["model"].as_str()), (Some("resp_3"), Some("asked")));
        assert_eq!(response["output"][0]["content"][0]["text"], "hello");
        assert_eq!(response["output"][1]["call_id"], "c1");
        assert_eq!(response["usage"]["total_tokens"], 6);
    }

    #[test]
    fn a_chat_stream_becomes_response_events() {
        let stream = concat!(
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        for split in [3, stream.len()] {
            let mut translator = ChatToResponsesSse::new("asked");
            let mut out = Vec::new();
            for piece in stream.as_bytes().chunks(split) {
                out.extend(translator.push(piece));
            }
            out.extend(translator.finish());
            let names: Vec<String> = out
                .iter()
                .map(|b| {
                    String::from_utf8_lossy(b)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("event: ")
                        .to_string()
                })
                .collect();
            assert_eq!(names.first().map(String::as_str), Some("response.created"));
            assert_eq!(names.iter().filter(|n| *n == "response.output_text.delta").count(), 2);
            assert_eq!(names.last().map(String::as_str), Some("response.completed"));
            let last = String::from_utf8_lossy(&out[out.len() - 1]).into_owned();
            assert!(last.contains("\"text\":\"Hi there\"") && last.contains("\"total_tokens\":5"), "{last}");
        }
    }
}
