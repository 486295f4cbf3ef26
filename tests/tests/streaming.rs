//! Streams are relayed as they are produced, a client that leaves cancels
//! the backend's work, and a stream that breaks ends with an error event.

use futures::StreamExt;
use llmesh_tests::{client, eventually, ndjson_lines, sim_and_agent, sim_stats, sse_events};
use serde_json::{Value, json};

async fn first_chunk(response: reqwest::Response) -> (bytes::Bytes, impl futures::Stream) {
    let mut body = response.bytes_stream();
    let chunk = body.next().await.expect("a first chunk").expect("readable");
    (chunk, body)
}

#[tokio::test]
async fn chunks_arrive_while_the_backend_is_still_generating_and_leaving_cancels() {
    // 10 tokens/s for 200 tokens: twenty seconds of work if not cancelled.
    let (sim, agent) = sim_and_agent(&["--decode-tps", "10"], &[]).await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({ "model": "qwen2.5:7b", "stream": true, "max_tokens": 200, "messages": [{ "role": "user", "content": "long" }] }),
        ),
        ("/api/generate", json!({ "model": "qwen2.5:7b", "prompt": "long", "options": { "num_predict": 200 } })),
    ] {
        let before = sim_stats(&sim).await;
        let response = client().post(format!("{}{path}", agent.url)).json(&body).send().await.expect("POST");
        assert_eq!(response.status(), 200);
        let (chunk, rest) = first_chunk(response).await;
        assert!(!chunk.is_empty());
        // The first chunk is here and the backend has not finished: the
        // agent relays as it goes instead of buffering the whole stream.
        let during = sim_stats(&sim).await;
        assert_eq!(during["in_flight"], 1, "{path}: {during}");
        assert_eq!(during["completed"], before["completed"], "{path}");
        drop(rest);
        let cancelled_before = before["cancelled"].as_u64().unwrap_or(0);
        eventually(&format!("{path}: the sim sees the cancel"), || async {
            let stats = sim_stats(&sim).await;
            stats["cancelled"].as_u64() == Some(cancelled_before + 1) && stats["in_flight"] == 0
        })
        .await;
    }
}

#[tokio::test]
async fn non_streaming_client_that_leaves_cancels_too() {
    let (sim, agent) = sim_and_agent(&["--decode-tps", "10"], &[]).await;
    let request = client()
        .post(format!("{}/v1/chat/completions", agent.url))
        .json(&json!({ "model": "qwen2.5:7b", "max_tokens": 200, "messages": [{ "role": "user", "content": "long" }] }))
        .send();
    let waiting = tokio::spawn(request);
    eventually("the request reaches the sim", || async { sim_stats(&sim).await["in_flight"] == 1 }).await;
    waiting.abort();
    eventually("the sim sees the cancel", || async {
        let stats = sim_stats(&sim).await;
        stats["cancelled"] == 1 && stats["in_flight"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_stream_that_breaks_ends_with_an_error_event() {
    let (_sim, agent) = sim_and_agent(&["--fault-drop-after", "3"], &[]).await;
    let sse = client()
        .post(format!("{}/v1/chat/completions", agent.url))
        .json(&json!({ "model": "qwen2.5:7b", "stream": true, "max_tokens": 10, "messages": [{ "role": "user", "content": "x" }] }))
        .send()
        .await
        .expect("POST")
        .text()
        .await
        .expect("body");
    let events = sse_events(&sse);
    assert!(!events.contains(&"[DONE]".to_string()), "a broken stream must not look complete");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["error"]["code"], "stream_interrupted", "{sse}");
    let contents = events.iter().filter(|e| e.contains("\"content\"") && !e.contains("\"role\"")).count();
    assert_eq!(contents, 3, "the three tokens before the break arrive once each");

    let ndjson = client()
        .post(format!("{}/api/chat", agent.url))
        .json(&json!({ "model": "qwen2.5:7b", "options": { "num_predict": 10 }, "messages": [{ "role": "user", "content": "x" }] }))
        .send()
        .await
        .expect("POST")
        .text()
        .await
        .expect("body");
    let lines = ndjson_lines(&ndjson);
    assert_eq!(lines.len(), 4, "{ndjson}");
    assert!(lines.iter().all(|l| l["done"] != true));
    assert!(lines[3]["error"].as_str().is_some_and(|m| !m.is_empty()));

    // Non-streaming: the broken body becomes a clean 502, not half a document.
    let response = client()
        .post(format!("{}/v1/chat/completions", agent.url))
        .json(&json!({ "model": "qwen2.5:7b", "max_tokens": 10, "messages": [{ "role": "user", "content": "x" }] }))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 502);
}

#[tokio::test]
async fn a_stalled_stream_is_ended_after_the_idle_timeout() {
    // One token every 5 s against an idle timeout of 1 s.
    let (_sim, agent) = sim_and_agent(&["--decode-tps", "0.2"], &["--idle-timeout", "1s"]).await;
    let body = client()
        .post(format!("{}/api/generate", agent.url))
        .json(&json!({ "model": "qwen2.5:7b", "prompt": "x", "options": { "num_predict": 5 } }))
        .send()
        .await
        .expect("POST")
        .text()
        .await
        .expect("body");
    let lines = ndjson_lines(&body);
    assert!(lines.last().is_some_and(|l| l["error"].as_str().is_some_and(|m| m.contains("sent nothing"))), "{body}");
}
