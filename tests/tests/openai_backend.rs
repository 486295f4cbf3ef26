//! An agent with `--backend-kind openai` in front of an OpenAI-compatible
//! server (the sim's `/v1/*`): OpenAI calls pass through, Ollama-native
//! calls are translated both ways.

use llmesh_tests::{Proc, agent, client, get_json, ndjson_lines, sim};
use serde_json::{Value, json};

async fn setup() -> (Proc, Proc) {
    let backend = sim(&["--embedding-dim", "8"]).await;
    let front = agent(&backend.url, &["--backend-kind", "openai"]).await;
    (backend, front)
}

async fn post(url: String, body: Value) -> reqwest::Response {
    client().post(url).json(&body).send().await.expect("POST")
}

#[tokio::test]
async fn inventory_comes_from_v1_models() {
    let (_sim, agent) = setup().await;
    let tags = get_json(&format!("{}/api/tags", agent.url)).await;
    let names: Vec<&str> =
        tags["models"].as_array().expect("models").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, vec!["qwen2.5:7b", "llama3.2:3b", "nomic-embed-text"]);
    let models = get_json(&format!("{}/v1/models", agent.url)).await;
    assert_eq!(models["data"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn ollama_chat_is_translated_streaming_and_not() {
    let (sim, agent) = setup().await;
    let body = json!({ "model": "qwen2.5:7b", "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 4 } });
    let response = post(format!("{}/api/chat", agent.url), body.clone()).await;
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson_lines(&response.text().await.expect("body"));
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text.split_whitespace().count(), 4);
    let last = lines.last().expect("final line");
    assert_eq!(last["done"], true);
    assert_eq!(last["eval_count"], 4);
    assert_eq!(last["prompt_eval_count"], 1);
    // The backend saw an OpenAI request, not Ollama's.
    let seen = get_json(&format!("{}/sim/last-request", sim.url)).await;
    assert_eq!(seen["path"], "/v1/chat/completions");
    let forwarded: Value = serde_json::from_str(seen["body"].as_str().expect("body")).expect("json");
    assert_eq!(forwarded["max_tokens"], 4);

    let mut once = body;
    once["stream"] = json!(false);
    let single: Value = post(format!("{}/api/chat", agent.url), once).await.json().await.expect("json");
    assert_eq!(single["done"], true);
    assert_eq!(single["message"]["content"].as_str().map(|c| c.split_whitespace().count()), Some(4));
}

#[tokio::test]
async fn ollama_generate_embed_show_and_errors_are_translated() {
    let (_sim, agent) = setup().await;
    let lines = ndjson_lines(
        &post(
            format!("{}/api/generate", agent.url),
            json!({ "model": "llama3.2:3b", "prompt": "once", "options": { "num_predict": 3 } }),
        )
        .await
        .text()
        .await
        .expect("body"),
    );
    assert_eq!(lines.iter().filter_map(|l| l["response"].as_str()).collect::<String>().split_whitespace().count(), 3);
    let load: Value = post(format!("{}/api/generate", agent.url), json!({ "model": "llama3.2:3b" }))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(load["done_reason"], "load");
    let embed: Value =
        post(format!("{}/api/embed", agent.url), json!({ "model": "nomic-embed-text", "input": ["a", "b"] }))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(embed["embeddings"][1].as_array().map(Vec::len), Some(8));
    let legacy: Value =
        post(format!("{}/api/embeddings", agent.url), json!({ "model": "nomic-embed-text", "prompt": "a" }))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(legacy["embedding"].as_array().map(Vec::len), Some(8));
    let show = post(format!("{}/api/show", agent.url), json!({ "model": "qwen2.5:7b" })).await;
    assert_eq!(show.status(), 200);
    let missing = post(format!("{}/api/chat", agent.url), json!({ "model": "nope", "messages": [] })).await;
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("json");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("nope")));
}

#[tokio::test]
async fn openai_requests_pass_through() {
    let (_sim, agent) = setup().await;
    let body: Value = post(
        format!("{}/v1/chat/completions", agent.url),
        json!({ "model": "qwen2.5:7b", "max_tokens": 2, "messages": [{ "role": "user", "content": "x" }] }),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn the_backends_own_slot_count_is_used_unless_one_is_configured() {
    // llama-server says its parallel slots in /props (`total_slots`); the
    // sim does too. Gossip and the scheduler use them when the operator
    // set none; a configured count wins.
    let backend = sim(&["--slots", "3"]).await;
    let slots = |url: String| async move {
        let nodes = get_json(&format!("{url}/mesh/v1/nodes")).await;
        let this = nodes["nodes"].as_array().expect("nodes").iter().find(|n| n["self"] == true).cloned();
        this.expect("this node")["load"]["slots"].as_u64()
    };
    let learnt = agent(&backend.url, &["--backend-kind", "openai"]).await;
    llmesh_tests::eventually("the slots from /props", || async { slots(learnt.url.clone()).await == Some(3) }).await;
    let configured = agent(&backend.url, &["--backend-kind", "openai", "--parallel-slots", "5"]).await;
    llmesh_tests::eventually("the configured slots", || async { slots(configured.url.clone()).await == Some(5) }).await;
    // Ollama says nothing of its slots: unknown (0), the scheduler assumes 4.
    let ollama = agent(&backend.url, &[]).await;
    llmesh_tests::eventually("the node's state", || async { slots(ollama.url.clone()).await.is_some() }).await;
    assert_eq!(slots(ollama.url.clone()).await, Some(0));
}
