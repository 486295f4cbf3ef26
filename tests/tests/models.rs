//! Model management through any node (Ollama's pull, delete, copy): placed
//! by the mesh or on named nodes, progress streamed back, the inventory
//! and the routing updated once it is done, and clean refusals.

use std::process::Command;

use llmesh_tests::{agent, binary, client, eventually, get_json, mesh, ndjson_lines, sim};
use serde_json::{Value, json};

async fn sim_models(sim_url: &str) -> Vec<String> {
    let tags = get_json(&format!("{sim_url}/api/tags")).await;
    tags["models"]
        .as_array()
        .map_or_else(Vec::new, |a| a.iter().filter_map(|m| m["name"].as_str().map(String::from)).collect())
}

async fn chat_node(url: &str, model: &str) -> (u16, String) {
    let body = json!({ "model": model, "max_tokens": 2, "messages": [{ "role": "user", "content": "hi" }] });
    let response = client().post(format!("{url}/v1/chat/completions")).json(&body).send().await.expect("chat");
    let node = response.headers().get("x-llmesh-node").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (response.status().as_u16(), node)
}

fn llmesh(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary()).args(args).output().expect("llmesh runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn the_cli_pulls_onto_a_named_node_the_mesh_routes_there_and_rm_removes_it() {
    let specs: [(&str, &[&str]); 2] = [
        ("node-a", &["--models", "qwen2.5:7b", "--pull-ms", "300"]),
        ("node-b", &["--models", "qwen2.5:7b", "--pull-ms", "300"]),
    ];
    let nodes = mesh(&specs).await;
    let entry = nodes[0].agent.url.clone();
    assert_eq!(chat_node(&entry, "tiny:1b").await.0, 404, "nobody has it yet");

    let (ok, out) = llmesh(&["models", "pull", "tiny:1b", "--node", "node-b", "--url", &entry]);
    assert!(ok, "pull failed: {out}");
    assert!(
        out.contains("node-b: pulling") && out.contains("100%") && out.contains("success"),
        "progress shown: {out}"
    );
    assert!(sim_models(&nodes[1].sim.url).await.contains(&"tiny:1b".to_string()));
    assert!(!sim_models(&nodes[0].sim.url).await.contains(&"tiny:1b".to_string()));
    // The entry node learns it through gossip and sends the model there.
    eventually("node-a routes tiny:1b to node-b", || async {
        chat_node(&entry, "tiny:1b").await == (200, "node-b".to_string())
    })
    .await;

    let (ok, out) = llmesh(&["models", "rm", "tiny:1b", "--url", &entry]);
    assert!(ok, "rm failed: {out}");
    assert!(!sim_models(&nodes[1].sim.url).await.contains(&"tiny:1b".to_string()));
    eventually("tiny:1b is gone from the mesh", || async { chat_node(&entry, "tiny:1b").await.0 == 404 }).await;
    let (ok, out) = llmesh(&["models", "rm", "tiny:1b", "--url", &entry]);
    assert!(!ok && out.contains("not found"), "a second rm says it is gone: {out}");
}

#[tokio::test]
async fn an_untargeted_pull_is_placed_streams_progress_and_copies_and_deletes_reach_every_holder() {
    let specs: [(&str, &[&str]); 2] = [
        ("node-a", &["--models", "qwen2.5:7b,llama3.2:3b", "--pull-ms", "200"]),
        ("node-b", &["--models", "qwen2.5:7b", "--pull-ms", "200"]),
    ];
    let nodes = mesh(&specs).await;
    let entry = nodes[0].agent.url.clone();
    let pull = |headers: Vec<(&'static str, &'static str)>| {
        let entry = entry.clone();
        async move {
            let mut request = client().post(format!("{entry}/api/pull")).json(&json!({ "model": "fresh:1b" }));
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("pull");
            let node = response.headers().get("x-llmesh-node").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let status = response.status().as_u16();
            (status, node, ndjson_lines(&response.text().await.expect("body")))
        }
    };
    // Same free GPU memory (none): the node with less on disk gets it.
    let (status, node, lines) = pull(vec![]).await;
    assert_eq!((status, node.as_str()), (200, "node-b"));
    assert_eq!(lines.first().map(|l| l["status"].clone()), Some(json!("pulling manifest")));
    assert_eq!(lines.last().map(|l| l["status"].clone()), Some(json!("success")));
    let downloads: Vec<&Value> = lines.iter().filter(|l| l["total"].as_u64().is_some()).collect();
    assert!(downloads.len() >= 3, "download progress: {lines:?}");
    assert_eq!(downloads.last().map(|l| l["completed"].clone()), downloads.last().map(|l| l["total"].clone()));
    // Pulled again: an update where it is, no second copy.
    let (_, node, _) = pull(vec![]).await;
    assert_eq!(node, "node-b");
    assert!(!sim_models(&nodes[0].sim.url).await.contains(&"fresh:1b".to_string()));
    // Two replicas: the holder and one more, progress tagged by node.
    let (status, node, lines) = pull(vec![("x-llmesh-replicas", "2")]).await;
    assert_eq!((status, node.as_str()), (200, "node-b,node-a"));
    assert!(lines.iter().any(|l| l["node"] == "node-a") && lines.iter().any(|l| l["node"] == "node-b"));
    assert!(sim_models(&nodes[0].sim.url).await.contains(&"fresh:1b".to_string()));

    // A peer's new model reaches the entry node with its next gossip.
    eventually("node-a sees fresh:1b on node-b", || async {
        let listed = get_json(&format!("{entry}/mesh/v1/nodes")).await;
        listed["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().all(|n| n["models"]["available"].as_array().is_some_and(|m| m.contains(&json!("fresh:1b"))))
        })
    })
    .await;
    let copy = client()
        .post(format!("{entry}/api/copy"))
        .json(&json!({ "source": "fresh:1b", "destination": "fresh-copy" }))
        .send()
        .await
        .expect("copy");
    let copied_on = copy.headers().get("x-llmesh-node").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert_eq!(copy.status().as_u16(), 200);
    for node in &nodes {
        let models = sim_models(&node.sim.url).await;
        assert!(models.contains(&"fresh-copy:latest".to_string()), "copied on {copied_on}: {models:?}");
    }
    let delete = |model: &'static str| {
        let entry = entry.clone();
        async move {
            let response = client()
                .delete(format!("{entry}/api/delete"))
                .json(&json!({ "model": model }))
                .send()
                .await
                .expect("delete");
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    eventually("both nodes gossip the copy", || async {
        let listed = get_json(&format!("{entry}/mesh/v1/nodes")).await;
        listed["nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .all(|n| n["models"]["available"].as_array().is_some_and(|m| m.contains(&json!("fresh-copy:latest"))))
        })
    })
    .await;
    assert_eq!(delete("fresh-copy").await.0, 200);
    for node in &nodes {
        assert!(!sim_models(&node.sim.url).await.contains(&"fresh-copy:latest".to_string()));
    }
    let (status, body) = delete("never-there").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("never-there")), "Ollama's error shape: {body}");
    let bad = client().post(format!("{entry}/api/pull")).json(&json!({ "model": 5 })).send().await.expect("pull");
    assert_eq!(bad.status().as_u16(), 400);
}

#[tokio::test]
async fn a_node_whose_backend_cannot_pull_says_so_in_ollamas_shape() {
    let backend = sim(&[]).await;
    let front = agent(&backend.url, &["--backend-kind", "openai", "--name", "oai"]).await;
    let pull = |target: Option<&'static str>| {
        let url = front.url.clone();
        async move {
            let mut request = client().post(format!("{url}/api/pull")).json(&json!({ "model": "x:1b" }));
            if let Some(target) = target {
                request = request.header("x-llmesh-target", target);
            }
            let response = request.send().await.expect("pull");
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = pull(Some("oai")).await;
    assert_eq!(status, 501);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("OpenAI-compatible")), "{body}");
    let (status, body) = pull(None).await;
    assert_eq!(status, 503);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("cannot pull")), "{body}");
}
