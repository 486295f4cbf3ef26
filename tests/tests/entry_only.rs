//! A pure entry node (`--backend-kind none`): no backend of its own, ready
//! once it runs, and every request it takes is served by a peer.

use llmesh_tests::{agent, client, eventually, get_json, join_token, sim};
use serde_json::json;

#[tokio::test]
async fn a_node_without_a_backend_forwards_everything() {
    let backend = sim(&[]).await;
    let first = agent(&backend.url, &["--name", "gpu-box"]).await;
    let token = join_token(first.data_dir.as_deref().expect("data dir"));
    let boot = first.p2p_addr();
    // No backend: the URL is never called.
    let entry = agent(
        "http://127.0.0.1:9",
        &["--name", "front", "--backend-kind", "none", "--join", &token, "--bootstrap", &boot],
    )
    .await;
    eventually("the entry is ready without a backend once it is a member", || async {
        client().get(format!("{}/readyz", entry.url)).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    eventually("the entry sees the GPU box's models", || async {
        let listed = get_json(&format!("{}/v1/models", entry.url)).await;
        listed["data"].as_array().is_some_and(|m| m.iter().any(|m| m["id"] == "qwen2.5:7b"))
    })
    .await;
    let body = json!({ "model": "qwen2.5:7b", "max_tokens": 3, "messages": [{ "role": "user", "content": "hi" }] });
    let response = client().post(format!("{}/v1/chat/completions", entry.url)).json(&body).send().await.expect("chat");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-llmesh-node"], "gpu-box");
    let unknown = json!({ "model": "nowhere:1b", "messages": [{ "role": "user", "content": "hi" }] });
    let response =
        client().post(format!("{}/v1/chat/completions", entry.url)).json(&unknown).send().await.expect("chat");
    assert_eq!(response.status().as_u16(), 404);
}
