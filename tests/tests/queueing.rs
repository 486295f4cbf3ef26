//! The mesh-level queue: while every slot is busy, requests wait at the
//! entry node (not in the backend's own queue) and go out as slots free; a
//! full queue answers 429 with Retry-After.

use std::time::Duration;

use llmesh_tests::{Proc, agent, client, data_dir, sim, sim_stats};
use serde_json::{Value, json};

fn slow_request(i: usize) -> Value {
    json!({ "model": "qwen2.5:7b", "stream": true, "max_tokens": 10, "messages": [{ "role": "user", "content": format!("q{i}") }] })
}

#[tokio::test]
async fn requests_wait_at_the_entry_instead_of_piling_onto_the_backend() {
    // Two slots at 20 tokens/s: each request holds a slot for about 0.5 s.
    let backend = sim(&["--slots", "2", "--decode-tps", "20"]).await;
    let entry = agent(&backend.url, &["--parallel-slots", "2"]).await;
    let url = format!("{}/v1/chat/completions", entry.url);
    let load = tokio::spawn(futures::future::join_all((0..6).map(|i| {
        let url = url.clone();
        async move {
            let response = client().post(url).json(&slow_request(i)).send().await.expect("POST");
            (response.status(), response.text().await.expect("body"))
        }
    })));
    // While the six run, the backend never holds more than its two slots
    // and never queues: the waiting happens at the entry node.
    let mut most = 0;
    while !load.is_finished() {
        let stats = sim_stats(&backend).await;
        assert_eq!(stats["queued"], 0, "the backend queued requests: {stats}");
        most = most.max(stats["in_flight"].as_u64().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most <= 2, "backend held {most} requests at once");
    for (status, text) in load.await.expect("joins") {
        assert_eq!(status, 200);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    assert_eq!(sim_stats(&backend).await["completed"], 6);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let backend = sim(&["--slots", "1", "--decode-tps", "10"]).await;
    let dir = data_dir();
    let dir = dir.to_str().expect("utf-8");
    let entry = Proc::start_with_env(
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend.url,
            "--data-dir",
            dir,
            "--no-mdns",
            "--mesh-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-listen",
            "127.0.0.1:0",
            "--parallel-slots",
            "1",
        ],
        &[("LLMESH_MESH__QUEUE_CAPACITY", "1")],
    )
    .await;
    let url = format!("{}/v1/chat/completions", entry.url);
    let results = futures::future::join_all((0..4).map(|i| {
        let url = url.clone();
        async move {
            // Stagger slightly so the first surely holds the slot.
            tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
            let response = client().post(url).json(&slow_request(i)).send().await.expect("POST");
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            (response.status().as_u16(), retry_after, response.text().await.expect("body"))
        }
    }))
    .await;
    let refused: Vec<_> = results.iter().filter(|(status, _, _)| *status == 429).collect();
    let served = results.iter().filter(|(status, _, _)| *status == 200).count();
    assert!(!refused.is_empty(), "{results:?}");
    assert!(served >= 2, "the slot holder and the queued request are served: {results:?}");
    for (_, retry_after, body) in refused {
        assert!(retry_after.is_some(), "429 without Retry-After");
        let error: Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(error["error"]["code"], "mesh_overloaded");
        assert_eq!(error["error"]["type"], "rate_limit_error");
    }
}
