//! Malformed input at the HTTP API: every bad request gets a 4xx with an
//! OpenAI-style error body (or an Ollama-style one on `/api/*`), slow or
//! oversized request heads and bodies are cut off, and the node keeps
//! serving normal requests afterwards.

use std::time::{Duration, Instant};

use llmesh_tests::{Proc, client, sim_and_agent};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn node() -> (Proc, Proc) {
    sim_and_agent(&[], &["--no-mesh", "--max-body-bytes", "1048576"]).await
}

async fn post(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value, String) {
    let response = client().post(url).header("content-type", content_type).body(body).send().await.expect("answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

/// The node answers a plain request, as before the abuse.
async fn still_serves(agent: &Proc) {
    let body = br#"{"model":"qwen2.5:7b","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let (status, reply, text) = post(&format!("{}/v1/chat/completions", agent.url), "application/json", body).await;
    assert_eq!(status, 200, "{text}");
    assert!(reply["choices"][0]["message"]["content"].is_string(), "{text}");
}

fn nested(depth: usize) -> Vec<u8> {
    let mut body = br#"{"model":"qwen2.5:7b","messages":[{"role":"user","content":"#.to_vec();
    body.extend(std::iter::repeat_n(b'[', depth));
    body.extend(std::iter::repeat_n(b']', depth));
    body.extend_from_slice(b"}]}");
    body
}

fn huge_array(items: usize) -> Vec<u8> {
    let mut body = br#"{"model":"qwen2.5:7b","messages":["#.to_vec();
    for i in 0..items {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"1");
    }
    body.extend_from_slice(b"]}");
    body
}

#[tokio::test]
async fn malformed_bodies_get_openai_errors_and_the_node_keeps_serving() {
    let (_sim, agent) = node().await;
    let chat = format!("{}/v1/chat/completions", agent.url);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("not JSON", b"hello".to_vec()),
        ("truncated JSON", br#"{"model":"qwen2.5:7b","messages":[{"role""#.to_vec()),
        ("JSON null", b"null".to_vec()),
        ("a JSON array", b"[1,2,3]".to_vec()),
        ("a JSON number", b"42".to_vec()),
        ("model is a number", br#"{"model":123,"messages":[]}"#.to_vec()),
        ("model is an object", br#"{"model":{"a":1},"messages":[]}"#.to_vec()),
        ("stream is a string", br#"{"model":"qwen2.5:7b","stream":"yes","messages":[]}"#.to_vec()),
        ("missing model", br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("empty model", br#"{"model":"","messages":[]}"#.to_vec()),
        ("model name of 10 KiB", format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(10_240)).into_bytes()),
        ("invalid UTF-8", b"{\"model\":\"qwen\xff\xfe\",\"messages\":[]}".to_vec()),
        ("lone surrogate escape", br#"{"model":"\ud800","messages":[]}"#.to_vec()),
        ("deep nesting", nested(100_000)),
        ("NUL bytes", b"{\"model\":\"q\0\",\0\"messages\":[]}".to_vec()),
        ("body over the limit", vec![b' '; 2 * 1024 * 1024]),
    ];
    for (what, body) in cases {
        let (status, reply, text) = post(&chat, "application/json", body).await;
        assert!((400..500).contains(&status), "{what}: status {status}: {text}");
        let error = &reply["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: not an OpenAI error: {text}");
        assert!(error["type"].is_string() && error.get("code").is_some(), "{what}: not an OpenAI error: {text}");
    }
    // A huge array that parses: the backend may refuse it, but the answer is
    // still a clean error or a reply, never a crash.
    let (status, _, text) = post(&chat, "application/json", huge_array(200_000)).await;
    assert!(status == 200 || (400..500).contains(&status), "huge array: {status}: {text}");
    // Ollama's API answers in Ollama's error shape.
    let (status, reply, text) = post(&format!("{}/api/chat", agent.url), "application/json", b"{".to_vec()).await;
    assert_eq!(status, 400, "{text}");
    assert!(reply["error"].is_string(), "Ollama-style error expected: {text}");
    still_serves(&agent).await;
}

/// Sends raw bytes on a fresh connection and returns what came back before
/// the server closed it (or `limit` passed).
async fn raw(agent: &Proc, request: &[u8], limit: Duration) -> String {
    let addr = agent.url.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).await.expect("connects");
    tcp.write_all(request).await.expect("writes");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn enormous_or_endless_request_heads_are_refused() {
    let (_sim, agent) = node().await;
    // A 100 KiB header.
    let big = format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let answer = raw(&agent, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "a 100 KiB header must get 431: {answer:.200}");
    // Too many headers: the limit is exactly MAX_HEADERS.
    let head = |fields: usize| {
        let mut head = String::from("GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        for i in 2..fields {
            head.push_str(&format!("x-h{i}: v\r\n"));
        }
        head + "\r\n"
    };
    // The agent's `http_server::MAX_HEADERS`.
    let limit = 100;
    let answer = raw(&agent, head(limit).as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{limit} headers must pass: {answer:.200}");
    for fields in [limit + 1, 500] {
        let answer = raw(&agent, head(fields).as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{fields} headers must get 431: {answer:.200}");
    }
    // Garbage instead of HTTP.
    let answer =
        raw(&agent, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer:.200}");
    // Slowloris: a head that never ends is closed after the head timeout.
    let started = Instant::now();
    let answer = raw(&agent, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: ", Duration::from_secs(30)).await;
    let held = started.elapsed();
    assert!(held < Duration::from_secs(20), "a trickled head must be cut off, held {held:?}");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer:.200}");
    still_serves(&agent).await;
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_frees_the_node() {
    let backend = llmesh_tests::sim(&[]).await;
    let agent = llmesh_tests::agent_in_env(
        &llmesh_tests::data_dir(),
        &backend.url,
        &["--no-mesh"],
        &[("LLMESH_API__BODY_READ_TIMEOUT", "1s")],
    )
    .await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":";
    let started = Instant::now();
    let answer = raw(&agent, head.as_bytes(), Duration::from_secs(15)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:.300}");
    assert!(answer.contains("request_timeout"), "{answer:.300}");
    assert!(started.elapsed() < Duration::from_secs(10));
    still_serves(&agent).await;
}
