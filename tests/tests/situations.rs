//! One answer per situation, whichever node a client enters at: a model
//! no node serves is 404 everywhere; a model whose every node an operator
//! drained is 503 `model_drained` everywhere, without a Retry-After that
//! would invite pointless retries.

use std::process::Command;
use std::time::{Duration, Instant};

use llmesh_tests::{MeshNode, binary, client, eventually, get_json, mesh, patience};
use serde_json::{Value, json};

async fn chat(node: &MeshNode, model: &str) -> (u16, Option<String>, Value) {
    let body = json!({ "model": model, "max_tokens": 2, "messages": [{ "role": "user", "content": "hi" }] });
    let response =
        client().post(format!("{}/v1/chat/completions", node.agent.url)).json(&body).send().await.expect("answers");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, retry_after, response.json().await.unwrap_or_default())
}

/// Runs an admin command through `node` with the seed's credential,
/// retrying while the cluster settles.
async fn admin(node: &MeshNode, seed: &MeshNode, args: &[&str]) {
    let dir = seed.agent.data_dir.as_deref().expect("data dir");
    let deadline = Instant::now() + patience();
    loop {
        let out = Command::new(binary())
            .args(args)
            .args(["--node", &node.agent.url, "--data-dir"])
            .arg(dir)
            .output()
            .expect("runs");
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn every_entry_gives_the_same_answer_for_the_same_situation() {
    let nodes = mesh(&[("a", &[]), ("b", &[]), ("c", &["--models", "llama3.2:3b"])]).await;

    for node in &nodes {
        let (status, _, body) = chat(node, "nowhere:1b").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "model_not_found");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("no node of the mesh serves model 'nowhere:1b'"), "{message}");
    }

    admin(&nodes[1], &nodes[0], &["node", "drain", "a"]).await;
    admin(&nodes[2], &nodes[0], &["node", "drain", "b"]).await;
    for node in &nodes {
        eventually("every node sees both drains", || async {
            let cluster = get_json(&format!("{}/mesh/v1/cluster", node.agent.url)).await;
            cluster["drained"].as_array().is_some_and(|d| d.len() == 2)
        })
        .await;
    }
    for node in &nodes {
        let (status, retry_after, body) = chat(node, "qwen2.5:7b").await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("model_drained")), "{body}");
        assert_eq!(retry_after, None, "a drain is not over in seconds");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("llmesh node undrain"), "{message}");
    }
    // The model the third node serves is unaffected from every entry.
    for node in &nodes {
        assert_eq!(chat(node, "llama3.2:3b").await.0, 200);
    }
}
