//! Every error a client can meet, in OpenAI's error format on `/v1/*` and
//! Ollama's on `/api/*`, with the documented status codes.

use llmesh_tests::{Proc, agent, client, sim_and_agent};
use serde_json::{Value, json};

async fn send(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = client().post(url).header("content-type", "application/json").body(body).send().await.expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.expect("error body is JSON"))
}

fn openai_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
}

#[tokio::test]
async fn bad_requests_get_400() {
    let (_sim, agent) = sim_and_agent(&[], &[]).await;
    let chat = format!("{}/v1/chat/completions", agent.url);
    let (status, body) = send(&chat, "{\"model\": \"qwen2.5:7b\", ").await;
    assert_eq!(status, 400);
    openai_error(&body, "invalid_request");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("malformed JSON")));
    let (status, body) = send(&chat, json!({ "messages": [] }).to_string()).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("model")));
    let (status, body) = send(&chat, json!({ "model": ["x"] }).to_string()).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = send(&chat, vec![0xff, 0xfe, 0x00]).await;
    assert_eq!(status, 400, "{body}");
    // Ollama routes answer in Ollama's shape.
    let (status, body) = send(&format!("{}/api/chat", agent.url), "not json").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().is_some_and(|m| m.contains("malformed JSON")), "{body}");
}

#[tokio::test]
async fn unknown_model_gets_404() {
    let (_sim, agent) = sim_and_agent(&[], &[]).await;
    let (status, body) =
        send(&format!("{}/v1/chat/completions", agent.url), json!({ "model": "gpt-9", "messages": [] }).to_string())
            .await;
    assert_eq!(status, 404);
    openai_error(&body, "model_not_found");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("gpt-9")));
    let (status, body) =
        send(&format!("{}/api/generate", agent.url), json!({ "model": "gpt-9", "prompt": "x" }).to_string()).await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some_and(|m| m.contains("gpt-9")));
}

#[tokio::test]
async fn oversized_body_gets_413_and_the_node_keeps_serving() {
    let (_sim, agent) = sim_and_agent(&[], &["--max-body-bytes", "4096"]).await;
    let big = json!({ "model": "qwen2.5:7b", "messages": [{ "role": "user", "content": "x".repeat(10_000) }] });
    let (status, body) = send(&format!("{}/v1/chat/completions", agent.url), big.to_string()).await;
    assert_eq!(status, 413);
    openai_error(&body, "request_too_large");
    let small = json!({ "model": "qwen2.5:7b", "messages": [{ "role": "user", "content": "x" }] });
    let (status, _) = send(&format!("{}/v1/chat/completions", agent.url), small.to_string()).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn backend_that_dies_gets_502() {
    let (mut sim, agent) = sim_and_agent(&[], &["--idle-timeout", "60s"]).await;
    sim.kill().await;
    // The model is still known from the last inventory, so the request is
    // tried and the refused connection is reported as such.
    let (status, body) = send(
        &format!("{}/v1/chat/completions", agent.url),
        json!({ "model": "qwen2.5:7b", "messages": [] }).to_string(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    openai_error(&body, "backend_unreachable");
}

#[tokio::test]
async fn backend_never_reached_gets_503() {
    // Nothing listens on the discard port (a port freed by a killed sim
    // could be taken by another test's process meanwhile).
    let agent: Proc = agent("http://127.0.0.1:9", &[]).await;
    let (status, body) = send(
        &format!("{}/v1/chat/completions", agent.url),
        json!({ "model": "qwen2.5:7b", "messages": [] }).to_string(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    openai_error(&body, "backend_unavailable");
    let ready = client().get(format!("{}/readyz", agent.url)).send().await.expect("GET");
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn hanging_backend_gets_504() {
    let (_sim, agent) = sim_and_agent(&["--fault-hang-rate", "1"], &["--response-timeout", "1s"]).await;
    let (status, body) = send(
        &format!("{}/v1/chat/completions", agent.url),
        json!({ "model": "qwen2.5:7b", "messages": [] }).to_string(),
    )
    .await;
    assert_eq!(status, 504);
    openai_error(&body, "backend_timeout");
    // (Without messages, /api/chat only loads the model, as Ollama's does.)
    let chat = json!({ "model": "qwen2.5:7b", "messages": [{ "role": "user", "content": "hi" }] });
    let (status, body) = send(&format!("{}/api/chat", agent.url), chat.to_string()).await;
    assert_eq!(status, 504);
    assert!(body["error"].as_str().is_some_and(|m| m.contains("no response")), "{body}");
}

#[tokio::test]
async fn backend_errors_pass_through_with_their_status() {
    let (_sim, agent) = sim_and_agent(&["--fault-error-rate", "1"], &[]).await;
    let (status, body) = send(
        &format!("{}/v1/chat/completions", agent.url),
        json!({ "model": "qwen2.5:7b", "messages": [] }).to_string(),
    )
    .await;
    assert_eq!(status, 500);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("injected")), "{body}");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let (_sim, agent) = sim_and_agent(&[], &[]).await;
    let response = client().get(format!("{}/v1/nothing", agent.url)).send().await.expect("GET");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    openai_error(&body, "unknown_route");
    let response = client().get(format!("{}/v1/chat/completions", agent.url)).send().await.expect("GET");
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.expect("json");
    openai_error(&body, "method_not_allowed");
}
