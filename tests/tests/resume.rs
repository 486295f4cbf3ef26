//! A streamed chat whose serving node's backend dies after the first
//! tokens is finished by another node: the client gets exactly the tokens
//! it asked for and one `[DONE]` (or Ollama's one `"done":true` line), with
//! usage that counts both nodes' output, or, with `x-llmesh-resume: off`,
//! the error event as before.

use futures::StreamExt;
use llmesh_tests::{client, mesh, ndjson_lines, sse_events};
use serde_json::{Value, json};

/// Streams a 60-token chat through `entry`, kills the serving node's
/// backend after a few tokens, and returns every event the client got.
async fn stream_through_a_death(nodes: &mut [llmesh_tests::MeshNode], resume: bool) -> Vec<String> {
    let body = json!({ "model": "qwen2.5:7b", "max_tokens": 60, "stream": true,
                       "stream_options": { "include_usage": true },
                       "messages": [{ "role": "user", "content": "tell me a story" }] });
    let text = through_a_death(nodes, "/v1/chat/completions", body, resume, |t| sse_events(t).len()).await;
    sse_events(&text)
}

/// Sends `body` to `path` at node 0, kills the serving node's backend once
/// `count` finds 5 events, and returns the whole body.
async fn through_a_death(
    nodes: &mut [llmesh_tests::MeshNode],
    path: &str,
    body: Value,
    resume: bool,
    count: fn(&str) -> usize,
) -> String {
    let mut request = client().post(format!("{}{path}", nodes[0].agent.url)).json(&body);
    if !resume {
        request = request.header("x-llmesh-resume", "off");
    }
    let response = request.send().await.expect("chat");
    assert_eq!(response.status().as_u16(), 200);
    let served_by = response.headers()["x-llmesh-node"].to_str().expect("node").to_string();
    let victim = match served_by.as_str() {
        "gpu-1" => 1,
        "gpu-2" => 2,
        other => panic!("served by {other}"),
    };
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while count(&text) < 5 {
        text.push_str(&String::from_utf8_lossy(&body.next().await.expect("more").expect("chunk")));
    }
    nodes[victim].sim.kill().await;
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

fn content_events(events: &[String]) -> usize {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v.pointer("/choices/0/delta/content").and_then(Value::as_str).is_some_and(|t| !t.is_empty()))
        .count()
}

#[tokio::test]
async fn a_stream_whose_node_dies_is_finished_by_another_node() {
    let serving: &[&str] = &["--decode-tps", "20"];
    let mut nodes = mesh(&[("entry", &["--models", "other:1b"]), ("gpu-1", serving), ("gpu-2", serving)]).await;
    let events = stream_through_a_death(&mut nodes, true).await;
    assert_eq!(content_events(&events), 60, "exactly the tokens asked for: {events:?}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1, "one terminator");
    assert!(!events.iter().any(|e| e.contains("\"error\"")), "no error event: {events:?}");
    let usage: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .collect();
    assert_eq!(usage.len(), 1, "one usage report: {events:?}");
    // The sim counts one token per word: "tell me a story" is 4.
    assert_eq!((usage[0]["prompt_tokens"].as_u64(), usage[0]["completion_tokens"].as_u64()), (Some(4), Some(60)));
}

#[tokio::test]
async fn an_ollama_chat_whose_node_dies_is_finished_by_another_node() {
    let serving: &[&str] = &["--decode-tps", "20"];
    let mut nodes = mesh(&[("entry", &["--models", "other:1b"]), ("gpu-1", serving), ("gpu-2", serving)]).await;
    let body = json!({ "model": "qwen2.5:7b", "options": { "num_predict": 60 },
                       "messages": [{ "role": "user", "content": "tell me a story" }] });
    let text = through_a_death(&mut nodes, "/api/chat", body, true, |t| t.matches('\n').count()).await;
    let lines = ndjson_lines(&text);
    let content = lines.iter().filter(|l| l["message"]["content"].as_str().is_some_and(|c| !c.is_empty())).count();
    assert_eq!(content, 60, "exactly the tokens asked for: {text}");
    let done: Vec<&Value> = lines.iter().filter(|l| l["done"] == true).collect();
    assert_eq!(done.len(), 1, "one final line: {text}");
    assert!(!lines.iter().any(|l| l.get("error").is_some()), "no error line: {text}");
    assert_eq!((done[0]["prompt_eval_count"].as_u64(), done[0]["eval_count"].as_u64()), (Some(4), Some(60)));
}

#[tokio::test]
async fn with_resume_off_the_stream_ends_with_an_error_event() {
    let serving: &[&str] = &["--decode-tps", "20"];
    let mut nodes = mesh(&[("entry", &["--models", "other:1b"]), ("gpu-1", serving), ("gpu-2", serving)]).await;
    let events = stream_through_a_death(&mut nodes, false).await;
    assert!(content_events(&events) < 60);
    assert!(events.last().is_some_and(|e| e.contains("\"error\"")), "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
}
