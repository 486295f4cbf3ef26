//! A node claims (and gossips) only the conversations its backend still
//! holds in its KV cache, as the backend's own reported cache hits
//! (`usage.prompt_tokens_details.cached_tokens`) say: a box with a small
//! cache stops attracting conversations it has already evicted.

use std::time::Duration;

use llmesh_tests::{Proc, agent, client, eventually, get_json, sim};
use serde_json::{Value, json};

const SYSTEM: &str = "You are a careful assistant.";

/// The first user message of conversation `c`: long, so that a second
/// turn is mostly what the first already was.
fn opening(c: usize) -> String {
    format!("conversation {c}: {}", "please think about this question at length. ".repeat(12))
}

fn first_turn(c: usize) -> Value {
    json!({ "model": "qwen2.5:7b", "max_tokens": 4, "messages": [
        { "role": "system", "content": SYSTEM },
        { "role": "user", "content": opening(c) },
    ]})
}

fn next_turn(c: usize, n: usize) -> Value {
    let mut messages =
        vec![json!({ "role": "system", "content": SYSTEM }), json!({ "role": "user", "content": opening(c) })];
    for i in 0..n {
        messages.push(json!({ "role": "assistant", "content": "ok" }));
        messages.push(json!({ "role": "user", "content": format!("and {i}?") }));
    }
    json!({ "model": "qwen2.5:7b", "max_tokens": 4, "messages": messages })
}

async fn send(agent: &Proc, body: &Value) {
    let response = client().post(format!("{}/v1/chat/completions", agent.url)).json(body).send().await.expect("POST");
    assert_eq!(response.status(), 200);
}

/// The conversations the node says it holds (its own entry in its view).
async fn claimed(agent: &Proc) -> u64 {
    let view = get_json(&format!("{}/mesh/v1/nodes", agent.url)).await;
    view["nodes"][0]["load"]["cached_conversations"].as_u64().expect("cached_conversations")
}

/// Twelve conversations, then six of them taken up again round after
/// round: each time, five others were served since its last turn.
async fn drive(agent: &Proc) {
    for c in 0..12 {
        send(agent, &first_turn(c)).await;
    }
    for round in 1..=4 {
        for c in 0..6 {
            send(agent, &next_turn(c, round)).await;
        }
    }
}

#[tokio::test]
async fn a_backend_that_evicts_conversations_is_not_credited_with_them() {
    // About two cache entries per conversation: the sim keeps three or
    // four conversations, so one last seen six turns ago is gone.
    let small = sim(&["--prefix-cache", "8", "--decode-tps", "1000"]).await;
    let node = agent(&small.url, &[]).await;
    for c in 0..12 {
        send(&node, &first_turn(c)).await;
    }
    eventually("all twelve conversations claimed before any evidence", || async { claimed(&node).await == 12 }).await;
    drive(&node).await;
    eventually("the claim shrinks to what the backend keeps", || async { claimed(&node).await <= 6 }).await;
}

#[tokio::test]
async fn a_backend_that_keeps_every_conversation_is_credited_with_all() {
    let large = sim(&["--decode-tps", "1000"]).await;
    let node = agent(&large.url, &[]).await;
    drive(&node).await;
    // Every second turn hit the cache: nothing lowers the claim.
    eventually("all twelve conversations claimed", || async { claimed(&node).await == 12 }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(claimed(&node).await, 12);
}

#[tokio::test]
async fn a_node_measures_how_fast_its_backend_evaluates_prompts() {
    // 2000 prompt tokens a second: a 400-word prompt takes 0.2 s to read.
    let backend = sim(&["--prompt-tps", "2000", "--decode-tps", "1000"]).await;
    let node = agent(&backend.url, &[]).await;
    let words = "word ".repeat(400);
    let body = json!({ "model": "qwen2.5:7b", "max_tokens": 4, "stream": true,
        "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": words }] });
    let sent = serde_json::to_vec(&body).expect("json").len() as f64;
    let response = client().post(format!("{}/v1/chat/completions", node.url)).json(&body).send().await.expect("POST");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("stream");
    let prompt = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|event| event["usage"]["prompt_tokens"].as_f64())
        .expect("usage in the stream");
    // What the sim's speed is in request bytes: its tokens are words.
    let truth = 2000.0 * sent / prompt;
    let measured = || async {
        let view = get_json(&format!("{}/mesh/v1/nodes", node.url)).await;
        view["nodes"][0]["load"]["models"][0]["prefill_bytes_per_s_ewma"].as_f64().unwrap_or(0.0)
    };
    eventually("a prompt evaluation speed", || async { measured().await > 0.0 }).await;
    let rate = measured().await;
    // The time to first token also holds the request's own overheads.
    assert!(rate > truth * 0.5 && rate < truth * 1.1, "measured {rate:.0} B/s, the sim reads {truth:.0} B/s");
}
