//! A backend that freezes (SIGSTOP: its sockets stay open, nothing
//! answers) is found by a probe within seconds, not at the response
//! timeout (300 s by default): a request fails over to another node before
//! its first byte, a stream ends with a clean error event, and the node is
//! marked unhealthy in gossip until it answers again.

use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_tests::{client, eventually, get_json, mesh, sse_events};
use serde_json::json;

/// Far below the 300 s response timeout and the 120 s idle timeout, far
/// above the ~2 s a probe takes: what passes shows stall detection, not speed.
const WELL_BEFORE_THE_TIMEOUTS: Duration = Duration::from_secs(60);

fn chat(max_tokens: u32, stream: bool) -> serde_json::Value {
    json!({ "model": "qwen2.5:7b", "max_tokens": max_tokens, "stream": stream,
            "messages": [{ "role": "user", "content": "hi" }] })
}

#[tokio::test]
async fn a_frozen_backend_fails_requests_over_and_is_marked_unhealthy() {
    let nodes = mesh(&[("node-a", &[]), ("node-b", &[])]).await;
    nodes[0].sim.freeze(true);
    let started = Instant::now();
    // Entering at node-a, whose own backend looks best until it is probed.
    let response = client()
        .post(format!("{}/v1/chat/completions", nodes[0].agent.url))
        .json(&chat(4, false))
        .send()
        .await
        .expect("chat");
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let served_by = response.headers().get("x-llmesh-node").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert_eq!((status, served_by.as_str()), (200, "node-b"), "{}", response.text().await.unwrap_or_default());
    assert!(elapsed < WELL_BEFORE_THE_TIMEOUTS, "failed over after {elapsed:?}");
    eventually("node-b sees node-a's backend as down", || async {
        let listed = get_json(&format!("{}/mesh/v1/nodes", nodes[1].agent.url)).await;
        listed["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["name"] == "node-a" && n["backend"]["healthy"] == false))
    })
    .await;
    nodes[0].sim.freeze(false);
    eventually("node-a's backend is healthy again", || async {
        let listed = get_json(&format!("{}/mesh/v1/nodes", nodes[1].agent.url)).await;
        listed["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["name"] == "node-a" && n["backend"]["healthy"] == true))
    })
    .await;
}

#[tokio::test]
async fn a_backend_that_freezes_mid_stream_ends_the_stream_with_an_error_event() {
    let nodes = mesh(&[("node-a", &["--decode-tps", "20"])]).await;
    let response = client()
        .post(format!("{}/v1/chat/completions", nodes[0].agent.url))
        .json(&chat(400, true))
        .send()
        .await
        .expect("chat");
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while sse_events(&text).len() < 3 {
        let chunk = body.next().await.expect("more").expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    nodes[0].sim.freeze(true);
    let frozen = Instant::now();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let elapsed = frozen.elapsed();
    nodes[0].sim.freeze(false);
    let events = sse_events(&text);
    let last = events.last().cloned().unwrap_or_default();
    assert!(last.contains("\"error\"") && last.contains("stalled"), "ends with an error event: {last}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "not a clean end");
    assert!(elapsed < WELL_BEFORE_THE_TIMEOUTS, "ended {elapsed:?} after the freeze");
}
