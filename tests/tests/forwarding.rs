//! Requests forwarded between nodes over the QUIC data plane: every API,
//! failover before the first byte, clean errors after it, cancellation
//! across the hop, byte-identical relaying under concurrency, and drain.

use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_tests::{client, eventually, mesh as cluster, ndjson_lines, patience, sim_stats, sse_events};
use serde_json::{Value, json};

const M: &str = "only-c:1b";

fn only_c() -> [&'static str; 2] {
    ["--models", "qwen2.5:7b,only-c:1b"]
}

async fn post(url: String, body: &Value, request_id: &str) -> reqwest::Response {
    client().post(url).header("x-request-id", request_id).json(body).send().await.expect("POST")
}

#[tokio::test]
async fn every_api_is_served_by_the_node_that_has_the_model() {
    let nodes = cluster(&[("node-a", &[]), ("node-b", &[]), ("node-c", &only_c())]).await;
    let chat = json!({ "model": M, "max_tokens": 4, "messages": [{ "role": "user", "content": "hi" }] });
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let completion = json!({ "model": M, "prompt": "once", "max_tokens": 3 });
    let mut completion_stream = completion.clone();
    completion_stream["stream"] = json!(true);
    let ollama_chat =
        json!({ "model": M, "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 4 } });
    let mut ollama_chat_once = ollama_chat.clone();
    ollama_chat_once["stream"] = json!(false);
    let generate = json!({ "model": M, "prompt": "once", "options": { "num_predict": 3 } });
    let mut generate_once = generate.clone();
    generate_once["stream"] = json!(false);
    let messages = json!({ "model": M, "max_tokens": 4, "messages": [{ "role": "user", "content": "hi" }] });
    let mut messages_stream = messages.clone();
    messages_stream["stream"] = json!(true);
    let responses = json!({ "model": M, "input": "hi", "max_output_tokens": 4 });
    let mut responses_stream = responses.clone();
    responses_stream["stream"] = json!(true);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/v1/messages", messages.clone(), "json"),
        ("/v1/messages", messages_stream, "events"),
        ("/v1/messages/count_tokens", messages, "json"),
        ("/v1/responses", responses, "json"),
        ("/v1/responses", responses_stream, "events"),
        ("/v1/chat/completions", chat, "json"),
        ("/v1/chat/completions", chat_stream, "sse"),
        ("/v1/completions", completion, "json"),
        ("/v1/completions", completion_stream, "sse"),
        ("/v1/embeddings", json!({ "model": M, "input": ["a", "b"] }), "json"),
        ("/api/chat", ollama_chat, "ndjson"),
        ("/api/chat", ollama_chat_once, "json"),
        ("/api/generate", generate, "ndjson"),
        ("/api/generate", generate_once, "json"),
        ("/api/embed", json!({ "model": M, "input": "a" }), "json"),
        ("/api/embeddings", json!({ "model": M, "prompt": "a" }), "json"),
        ("/api/show", json!({ "model": M }), "json"),
    ];
    let mut sent = 0;
    for entry in [&nodes[0], &nodes[1]] {
        for (i, (path, body, kind)) in cases.iter().enumerate() {
            let id = format!("fwd-{}-{i}", entry.agent.url.rsplit(':').next().unwrap_or("x"));
            let response = post(format!("{}{path}", entry.agent.url), body, &id).await;
            assert_eq!(response.status(), 200, "{path} {body}");
            assert_eq!(response.headers()["x-llmesh-route"], "peer:node-c", "{path}");
            assert_eq!(response.headers()["x-llmesh-node"], "node-c", "{path}");
            assert_eq!(response.headers()["x-request-id"], id.as_str());
            let text = response.text().await.expect("body");
            match *kind {
                "sse" => assert_eq!(sse_events(&text).last().map(String::as_str), Some("[DONE]"), "{path}: {text}"),
                "events" => {
                    // Anthropic's and the Responses API's named events end
                    // with message_stop and response.completed.
                    let last: Value = serde_json::from_str(sse_events(&text).last().expect("events")).expect("JSON");
                    assert!(matches!(last["type"].as_str(), Some("message_stop" | "response.completed")), "{text}");
                }
                "ndjson" => {
                    assert_eq!(ndjson_lines(&text).last().map(|l| l["done"].clone()), Some(json!(true)), "{path}")
                }
                _ => {
                    let parsed: Value = serde_json::from_str(&text).expect("JSON");
                    assert!(parsed.get("error").is_none_or(Value::is_null), "{path}: {parsed}");
                }
            }
            if !matches!(*path, "/api/show" | "/v1/messages/count_tokens") {
                sent += 1;
            }
        }
    }
    let stats = sim_stats(&nodes[2].sim).await;
    assert_eq!(stats["requests"], sent, "every request ran on C's backend: {stats}");
    // One request id appears in the logs of both the entry and the serving node.
    let id = format!("fwd-{}-0", nodes[0].agent.url.rsplit(':').next().unwrap_or("x"));
    assert!(nodes[0].agent.logs().contains(&id), "entry node log lacks {id}");
    assert!(nodes[2].agent.logs().contains(&id), "serving node log lacks {id}");
    // No other backend saw any of it.
    assert_eq!(sim_stats(&nodes[0].sim).await["requests"], 0);
    assert_eq!(sim_stats(&nodes[1].sim).await["requests"], 0);
}

#[tokio::test]
async fn a_dead_node_is_skipped_without_a_client_visible_error() {
    let mut nodes = cluster(&[("node-a", &[]), ("node-c", &only_c()), ("node-d", &only_c())]).await;
    nodes[1].agent.kill().await;
    let body = json!({ "model": M, "max_tokens": 2, "messages": [{ "role": "user", "content": "x" }] });
    for i in 0..6 {
        let response =
            post(format!("{}/v1/chat/completions", nodes[0].agent.url), &body, &format!("after-kill-{i}")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-llmesh-node"], "node-d");
    }
}

#[tokio::test]
async fn a_node_killed_mid_stream_ends_the_stream_with_an_error() {
    let mut nodes = cluster(&[("node-a", &[]), ("node-c", &["--models", "only-c:1b", "--decode-tps", "20"])]).await;
    let body =
        json!({ "model": M, "stream": true, "max_tokens": 400, "messages": [{ "role": "user", "content": "x" }] });
    let response = post(format!("{}/v1/chat/completions", nodes[0].agent.url), &body, "mid-stream").await;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    text.push_str(&String::from_utf8_lossy(&stream.next().await.expect("first").expect("readable")));
    nodes[1].agent.kill().await;
    let rest = tokio::time::timeout(patience(), async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream hung after its node died");
    let events = sse_events(&text);
    assert!(!events.contains(&"[DONE]".to_string()));
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["error"]["code"], "stream_interrupted", "{text}");
}

#[tokio::test]
async fn a_client_cancel_at_the_entry_reaches_the_serving_backend() {
    let nodes = cluster(&[("node-a", &[]), ("node-c", &["--models", "only-c:1b", "--decode-tps", "10"])]).await;
    let body =
        json!({ "model": M, "stream": true, "max_tokens": 300, "messages": [{ "role": "user", "content": "x" }] });
    let response = post(format!("{}/v1/chat/completions", nodes[0].agent.url), &body, "cancel-me").await;
    let mut stream = response.bytes_stream();
    stream.next().await.expect("first").expect("readable");
    assert_eq!(sim_stats(&nodes[1].sim).await["in_flight"], 1);
    let dropped = Instant::now();
    drop(stream);
    eventually("C's backend sees the cancel", || async { sim_stats(&nodes[1].sim).await["cancelled"] == 1 }).await;
    let took = dropped.elapsed();
    let limit = Duration::from_secs(1).mul_f64((patience().as_secs_f64() / 15.0).max(1.0));
    assert!(took < limit, "cancel took {took:?}");
}

#[tokio::test]
async fn two_hundred_concurrent_streams_are_relayed_byte_for_byte() {
    let nodes =
        cluster(&[("node-a", &[]), ("node-c", &["--models", "only-c:1b", "--deterministic", "--slots", "16"])]).await;
    let bodies: Vec<Value> = (0..200)
        .map(|i| json!({ "model": M, "stream": true, "max_tokens": 24, "messages": [{ "role": "user", "content": format!("request {i}") }] }))
        .collect();
    let fetch = |url: String, body: Value| async move {
        let response = client().post(url).json(&body).send().await.expect("POST");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body")
    };
    let direct = futures::future::join_all(
        bodies.iter().map(|b| fetch(format!("{}/v1/chat/completions", nodes[1].sim.url), b.clone())),
    )
    .await;
    let forwarded = futures::future::join_all(
        bodies.iter().map(|b| fetch(format!("{}/v1/chat/completions", nodes[0].agent.url), b.clone())),
    )
    .await;
    for (i, (d, f)) in direct.iter().zip(&forwarded).enumerate() {
        assert_eq!(d, f, "request {i} differs");
        assert!(f.ends_with(b"data: [DONE]\n\n"));
    }
}

#[tokio::test]
async fn sigterm_under_load_fails_no_request() {
    let mut nodes = cluster(&[
        ("node-a", &[]),
        ("node-c", &["--models", "only-c:1b", "--decode-tps", "50", "--slots", "8"]),
        ("node-d", &["--models", "only-c:1b", "--decode-tps", "50", "--slots", "8"]),
    ])
    .await;
    let url = format!("{}/v1/chat/completions", nodes[0].agent.url);
    let requests = (0..60).map(|i| {
        let url = url.clone();
        async move {
            // Spread the starts over about 1.5 s.
            tokio::time::sleep(Duration::from_millis(25 * i)).await;
            let body = json!({ "model": M, "stream": true, "max_tokens": 20, "messages": [{ "role": "user", "content": format!("load {i}") }] });
            let response = client().post(url).json(&body).send().await.expect("POST");
            let status = response.status();
            let text = response.text().await.expect("body");
            (status, text)
        }
    });
    let load = tokio::spawn(futures::future::join_all(requests));
    eventually("C is serving", || async { sim_stats(&nodes[1].sim).await["in_flight"].as_u64().unwrap_or(0) > 0 })
        .await;
    let exited_cleanly = nodes[1].agent.terminate().await;
    let results = load.await.expect("joins");
    for (i, (status, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "request {i} did not complete: {text}");
    }
    assert!(exited_cleanly, "C exits 0 after draining");
    assert!(sim_stats(&nodes[2].sim).await["completed"].as_u64().unwrap_or(0) > 0, "D took over");
}

#[tokio::test]
async fn a_client_deadline_bounds_a_forwarded_request_on_both_nodes() {
    let nodes = cluster(&[("node-a", &[]), ("node-c", &["--models", "only-c:1b", "--fault-hang-rate", "1"])]).await;
    let body = json!({ "model": M, "messages": [{ "role": "user", "content": "x" }] });
    let started = Instant::now();
    let response = client()
        .post(format!("{}/v1/chat/completions", nodes[0].agent.url))
        .header("x-llmesh-timeout-ms", "700")
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 504);
    // Without the deadline the request would wait the default five minutes.
    assert!(started.elapsed() < patience(), "took {:?}", started.elapsed());
    let bad = client()
        .post(format!("{}/v1/chat/completions", nodes[0].agent.url))
        .header("x-llmesh-timeout-ms", "soon")
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(bad.status(), 400);
    // The hung request does not linger on C either.
    eventually("C abandons the expired request", || async {
        let stats = sim_stats(&nodes[1].sim).await;
        stats["cancelled"] == 1 && stats["in_flight"] == 0
    })
    .await;
}
