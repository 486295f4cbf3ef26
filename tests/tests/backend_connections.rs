//! Backend connections that close under the agent: llama-server closes
//! every connection after a streamed response although it announced
//! keep-alive. The sim's `--close-after-stream` does the same; no request
//! may fail for it.

use llmesh_tests::{agent, client, sim};
use serde_json::json;

fn chat(i: usize, stream: bool) -> serde_json::Value {
    json!({ "model": "qwen2.5:7b", "stream": stream, "max_tokens": 4,
            "messages": [{ "role": "user", "content": format!("pair {i}") }] })
}

#[tokio::test]
async fn a_backend_closing_after_every_stream_fails_no_request() {
    let backend = sim(&["--close-after-stream"]).await;
    let node = agent(&backend.url, &[]).await;
    let url = format!("{}/v1/chat/completions", node.url);
    let http = client();
    // One client: a stream, then a plain request on what the pool kept.
    let mut failures = Vec::new();
    for i in 0..200 {
        for stream in [true, false] {
            let response = http.post(&url).json(&chat(i, stream)).send().await.expect("POST");
            let status = response.status();
            let text = response.text().await.expect("body");
            if status != 200 || (stream && !text.ends_with("data: [DONE]\n\n")) {
                failures.push(format!("pair {i} stream={stream}: {status} {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} of 400 failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    // Sixteen clients streaming at once, then plain requests, four rounds.
    for round in 0..4 {
        let load = (0..16).map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.post(&url).json(&chat(i, i % 2 == round % 2)).send().await.expect("POST");
                (response.status(), response.text().await.expect("body"))
            }
        });
        for (status, text) in futures::future::join_all(load).await {
            assert_eq!(status, 200, "round {round}: {text}");
        }
    }
}
