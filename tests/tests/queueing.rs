//! The mesh-level queue: while every slot is busy, requests wait in the
//! queue of the node whose slot they will take (not in the backend's own
//! queue), fairly whatever node they entered at; a full queue answers 429
//! with Retry-After.

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

/// Streams `max_tokens: 10` requests for `model` to `url` one after another
/// until `until`; returns how many completed, and the failures.
async fn closed_loop_client(url: String, model: &str, until: std::time::Instant) -> (usize, Vec<String>) {
    let (mut done, mut failures) = (0, Vec::new());
    let mut i = 0;
    while std::time::Instant::now() < until {
        let body = json!({ "model": model, "stream": true, "max_tokens": 10,
                           "messages": [{ "role": "user", "content": format!("turn {i}") }] });
        i += 1;
        match client().post(&url).json(&body).send().await {
            Ok(response) if response.status() == 200 => match response.text().await {
                Ok(text) if text.ends_with("data: [DONE]\n\n") => done += 1,
                Ok(text) => failures.push(text),
                Err(err) => failures.push(err.to_string()),
            },
            Ok(response) => {
                failures.push(format!("{}: {}", response.status(), response.text().await.unwrap_or_default()))
            }
            Err(err) => failures.push(err.to_string()),
        }
    }
    (done, failures)
}

#[tokio::test]
async fn no_entry_node_starves_when_one_node_serves_everyone() {
    // n1 serves the model with 4 slots; n2 does not have it and forwards
    // everything to n1. Eight closed-loop streaming clients enter at each.
    // Before the mesh-wide queue, n1's own clients won every freed slot
    // and n2's completed a twentieth as many.
    let serving = sim(&["--models", "m:1b", "--slots", "4", "--decode-tps", "50"]).await;
    let n1 = agent(&serving.url, &["--name", "n1", "--parallel-slots", "4"]).await;
    let token = llmesh_tests::join_token(n1.data_dir.as_deref().expect("data dir"));
    let other = sim(&["--models", "other:1b"]).await;
    let n2 = agent(&other.url, &["--name", "n2", "--join", &token, "--bootstrap", &n1.p2p_addr()]).await;
    llmesh_tests::eventually("n2 sees n1 serving m:1b", || async {
        let listed = llmesh_tests::get_json(&format!("{}/mesh/v1/nodes", n2.url)).await;
        listed["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| {
                n["name"] == "n1"
                    && n["liveness"] == "alive"
                    && n["models"]["available"][0] == "m:1b"
                    && n["addresses"]["data"] != ""
            })
        })
    })
    .await;
    let until = std::time::Instant::now() + Duration::from_secs(12);
    let clients = (0..16).map(|i| {
        let entry = if i % 2 == 0 { &n1.url } else { &n2.url };
        closed_loop_client(format!("{entry}/v1/chat/completions"), "m:1b", until)
    });
    let sample = async {
        // The backend never queues: the waiting happens in n1's queue.
        let mut most = 0;
        while std::time::Instant::now() < until {
            most = most.max(sim_stats(&serving).await["queued"].as_u64().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        most
    };
    let (results, most_queued) = tokio::join!(futures::future::join_all(clients), sample);
    assert_eq!(most_queued, 0, "the backend queued requests");
    let mut at = [0usize; 2];
    for (i, (done, failures)) in results.iter().enumerate() {
        assert!(failures.is_empty(), "client {i} failed: {failures:?}");
        at[i % 2] += done;
    }
    println!("completions: n1's clients {}, n2's clients {}", at[0], at[1]);
    let share = at[1] as f64 / (at[0] + at[1]) as f64;
    assert!((share - 0.5).abs() <= 0.5 * 0.15, "completions: n1's clients {}, n2's clients {}", at[0], at[1]);
}
