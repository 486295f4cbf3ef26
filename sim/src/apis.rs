//! Anthropic's Messages API and OpenAI's Responses API, as Ollama (0.14
//! and 0.13.3 onwards) and llama-server serve them: the same generation
//! engine, the wire shapes those APIs' official SDKs parse.

use axum::Json;
use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::engine::{GenRequest, OutputShape, Prompt, Run};
use crate::server::{
    Family, Sim, body_and_model, content_text, dropped_connection, max_tokens, next_id, parse, sim_error, stream_flag,
    streaming, unix_now,
};

/// One SSE event with a name, as both APIs stream.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The text of Anthropic's `system` (a string or text blocks).
fn system_text(system: Option<&Value>) -> Option<String> {
    match system? {
        Value::String(s) => Some(s.clone()),
        other => Some(content_text(Some(other))),
    }
}

/// An Anthropic message's text: text blocks, and tool results' contents.
fn block_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("tool_result") => block_text(b.get("content")),
                _ => b.get("text").and_then(Value::as_str).unwrap_or_default().to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => content_text(other),
    }
}

fn messages_prompt(body: &Value) -> Prompt {
    let mut prompt = Prompt::default();
    if let Some(system) = system_text(body.get("system")) {
        prompt.push("system", &system);
    }
    for message in body.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("user");
        prompt.push(role, &block_text(message.get("content")));
    }
    prompt
}

/// A tool call when tools are offered and the last turn is not already a
/// tool's result (so a tool round trip ends in text).
fn messages_shape(body: &Value) -> OutputShape {
    let answered = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .is_some_and(|blocks| blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")));
    let none = body.pointer("/tool_choice/type").and_then(Value::as_str) == Some("none");
    match body.get("tools").and_then(Value::as_array).and_then(|t| t.first()) {
        Some(tool) if !answered && !none => {
            OutputShape::ToolCall(tool.get("name").and_then(Value::as_str).unwrap_or("tool").to_string())
        }
        _ => OutputShape::Text,
    }
}

fn stop_reason(run: &Run) -> &'static str {
    match run.shape {
        OutputShape::ToolCall(_) => "tool_use",
        _ if run.truncated => "max_tokens",
        _ => "end_turn",
    }
}

fn anthropic_usage(run: &Run, output_tokens: u32) -> Value {
    json!({
        "input_tokens": run.prompt_tokens - run.cached_tokens,
        "cache_read_input_tokens": run.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": output_tokens,
    })
}

fn tool_use_id(run: &Run) -> String {
    format!("toolu_{:016x}", crate::text::fnv1a(run.prompt_tokens.into(), run.model.as_bytes()))
}

/// `POST /v1/messages`
pub async fn anthropic_messages(State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let family = Family::Anthropic;
    let (body, model) = match body_and_model(family, &uri, &engine, &raw) {
        Ok(parsed) => parsed,
        Err(r) => return r.into_response(),
    };
    let req = GenRequest {
        prompt: messages_prompt(&body),
        max_tokens: max_tokens(&body, family),
        shape: messages_shape(&body),
        model,
    };
    let mut run = match engine.start(req).await {
        Ok(run) => run,
        Err(e) => return sim_error(family, &e).into_response(),
    };
    let id = next_id("msg", &raw);
    if !stream_flag(&body, false) {
        let Ok(text) = run.collect().await else {
            return dropped_connection();
        };
        let content = match &run.shape {
            OutputShape::ToolCall(name) => {
                json!([{ "type": "tool_use", "id": tool_use_id(&run), "name": name, "input": {} }])
            }
            _ => json!([{ "type": "text", "text": text }]),
        };
        let response = json!({
            "id": id, "type": "message", "role": "assistant", "model": run.model, "content": content,
            "stop_reason": stop_reason(&run), "stop_sequence": null,
            "usage": anthropic_usage(&run, run.completion_tokens),
        });
        engine.finish(run);
        return Json(response).into_response();
    }
    let stream = async_stream::stream! {
        yield Ok(event("message_start", &json!({ "type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": run.model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": anthropic_usage(&run, 0),
        }})));
        let block = match &run.shape {
            OutputShape::ToolCall(name) => json!({ "type": "tool_use", "id": tool_use_id(&run), "name": name, "input": {} }),
            _ => json!({ "type": "text", "text": "" }),
        };
        let tool = block["type"] == "tool_use";
        yield Ok(event("content_block_start", &json!({ "type": "content_block_start", "index": 0, "content_block": block })));
        if tool {
            yield Ok(event("content_block_delta", &json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "input_json_delta", "partial_json": "{}" } })));
        }
        loop {
            match run.next_token().await {
                Some(Ok(token)) if !tool => yield Ok(event("content_block_delta", &json!({ "type": "content_block_delta",
                    "index": 0, "delta": { "type": "text_delta", "text": token } }))),
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    crate::server::drop_pause().await;
                    yield Err(std::io::Error::other("connection dropped (injected fault)"));
                    return;
                }
                None => break,
            }
        }
        yield Ok(event("content_block_stop", &json!({ "type": "content_block_stop", "index": 0 })));
        yield Ok(event("message_delta", &json!({ "type": "message_delta",
            "delta": { "stop_reason": stop_reason(&run), "stop_sequence": null },
            "usage": { "output_tokens": run.completion_tokens } })));
        yield Ok(event("message_stop", &json!({ "type": "message_stop" })));
        engine.finish(run);
    };
    streaming("text/event-stream", stream)
}

/// `POST /v1/messages/count_tokens`
pub async fn anthropic_count_tokens(State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    match parse(Family::Anthropic, &uri, &engine, &raw) {
        Ok(body) => Json(json!({ "input_tokens": messages_prompt(&body).tokens() })).into_response(),
        Err(r) => r.into_response(),
    }
}

/// The Responses API's `input` (a string, or messages with text parts)
/// after its `instructions`.
fn responses_prompt(body: &Value) -> Prompt {
    let mut prompt = Prompt::default();
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
        prompt.push("system", instructions);
    }
    match body.get("input") {
        Some(Value::Array(items)) => {
            for item in items {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                prompt.push(role, &content_text(item.get("content")));
            }
        }
        other => prompt.push("user", &content_text(other)),
    }
    prompt
}

fn responses_usage(run: &Run, output_tokens: u32) -> Value {
    json!({
        "input_tokens": run.prompt_tokens, "output_tokens": output_tokens,
        "total_tokens": run.prompt_tokens + output_tokens,
        "input_tokens_details": { "cached_tokens": run.cached_tokens },
        "output_tokens_details": { "reasoning_tokens": 0 },
    })
}

/// A Responses API `response` object around `output`.
fn response_object(id: &str, created: u64, model: &str, status: &str, output: Value, usage: Value) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "usage": usage, "error": null, "incomplete_details": null, "instructions": null,
        "metadata": {}, "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": "auto", "tools": [], "store": false,
    })
}

fn message_item(item_id: &str, status: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(text) => json!([{ "type": "output_text", "text": text, "annotations": [] }]),
        None => json!([]),
    };
    json!({ "type": "message", "id": item_id, "status": status, "role": "assistant", "content": content })
}

/// `POST /v1/responses` (stateless: `previous_response_id` is not kept).
pub async fn openai_responses(State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let family = Family::OpenAi;
    let (body, model) = match body_and_model(family, &uri, &engine, &raw) {
        Ok(parsed) => parsed,
        Err(r) => return r.into_response(),
    };
    let max = body.get("max_output_tokens").and_then(Value::as_u64).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let req = GenRequest { prompt: responses_prompt(&body), max_tokens: max, shape: OutputShape::Text, model };
    let mut run = match engine.start(req).await {
        Ok(run) => run,
        Err(e) => return sim_error(family, &e).into_response(),
    };
    let id = next_id("resp", &raw);
    let item_id = next_id("msg", &raw);
    let created = unix_now();
    if !stream_flag(&body, false) {
        let Ok(text) = run.collect().await else {
            return dropped_connection();
        };
        let output = json!([message_item(&item_id, "completed", Some(&text))]);
        let response = response_object(
            &id,
            created,
            &run.model,
            "completed",
            output,
            responses_usage(&run, run.completion_tokens),
        );
        engine.finish(run);
        return Json(response).into_response();
    }
    let stream = async_stream::stream! {
        let mut seq = 0u64;
        let mut next = |name: &str, mut data: Value| {
            data["type"] = json!(name);
            data["sequence_number"] = json!(seq);
            seq += 1;
            event(name, &data)
        };
        let started = response_object(&id, created, &run.model, "in_progress", json!([]), Value::Null);
        yield Ok(next("response.created", json!({ "response": started.clone() })));
        yield Ok(next("response.in_progress", json!({ "response": started })));
        yield Ok(next("response.output_item.added", json!({ "output_index": 0, "item": message_item(&item_id, "in_progress", None) })));
        let part = |text: &str| json!({ "type": "output_text", "text": text, "annotations": [] });
        yield Ok(next("response.content_part.added", json!({ "item_id": item_id, "output_index": 0, "content_index": 0, "part": part("") })));
        let mut text = String::new();
        loop {
            match run.next_token().await {
                Some(Ok(token)) => {
                    text.push_str(&token);
                    yield Ok(next("response.output_text.delta", json!({ "item_id": item_id, "output_index": 0,
                        "content_index": 0, "delta": token, "logprobs": [] })));
                }
                Some(Err(_)) => {
                    crate::server::drop_pause().await;
                    yield Err(std::io::Error::other("connection dropped (injected fault)"));
                    return;
                }
                None => break,
            }
        }
        yield Ok(next("response.output_text.done", json!({ "item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": [] })));
        yield Ok(next("response.content_part.done", json!({ "item_id": item_id, "output_index": 0, "content_index": 0, "part": part(&text) })));
        let item = message_item(&item_id, "completed", Some(&text));
        yield Ok(next("response.output_item.done", json!({ "output_index": 0, "item": item.clone() })));
        let done = response_object(&id, created, &run.model, "completed", json!([item]), responses_usage(&run, run.completion_tokens));
        yield Ok(next("response.completed", json!({ "response": done })));
        engine.finish(run);
    };
    streaming("text/event-stream", stream)
}
