//! Every endpoint of the single-node gateway, through a real agent process
//! in front of a real sim-backend process.

use base64::Engine as _;
use llmesh_tests::{client, get_json, ndjson_lines, sim_and_agent, sse_events};
use serde_json::{Value, json};

async fn post(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.expect("POST")
}

#[tokio::test]
async fn openai_chat_body_is_forwarded_byte_for_byte() {
    let (sim, agent) = sim_and_agent(&[], &[]).await;
    // Odd spacing, key order and unknown fields must all survive untouched.
    let raw = "{ \"messages\":[{\"role\":\"user\",\"content\":\"hello  mesh\"}],\n \"x_vendor\": {\"keep\": [1,2]}, \"model\" : \"qwen2.5:7b\", \"max_tokens\": 5 }";
    let response = client()
        .post(format!("{}/v1/chat/completions", agent.url))
        .header("content-type", "application/json")
        .header("x-request-id", "req-abc-123")
        .body(raw)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-llmesh-node"], "test-node");
    assert_eq!(response.headers()["x-llmesh-route"], "local");
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["prompt_tokens"], 2);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let seen = get_json(&format!("{}/sim/last-request", sim.url)).await;
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(seen["body"], raw);
}

#[tokio::test]
async fn openai_chat_streams_sse_with_usage() {
    let (_sim, agent) = sim_and_agent(&[], &[]).await;
    let response = post(
        &format!("{}/v1/chat/completions", agent.url),
        &json!({ "model": "qwen2.5:7b", "stream": true, "max_tokens": 6,
                 "stream_options": { "include_usage": true },
                 "messages": [{ "role": "user", "content": "count to six" }] }),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().expect("ascii").starts_with("text/event-stream"));
    let events = sse_events(&response.text().await.expect("body"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("chunk")).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text.split_whitespace().count(), 6);
    let usage = chunks.iter().find_map(|c| c.get("usage").filter(|u| !u.is_null())).expect("usage chunk");
    assert_eq!(usage["completion_tokens"], 6);
}

#[tokio::test]
async fn tools_and_response_format_pass_through() {
    let (sim, agent) = sim_and_agent(&[], &[]).await;
    let tools = json!([{ "type": "function", "function": { "name": "get_weather",
        "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } }]);
    let url = format!("{}/v1/chat/completions", agent.url);
    let body: Value = post(
        &url,
        &json!({ "model": "qwen2.5:7b", "tools": tools,
        "messages": [{ "role": "user", "content": "weather in Paris?" }] }),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(body["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather");
    let seen = get_json(&format!("{}/sim/last-request", sim.url)).await;
    let forwarded: Value = serde_json::from_str(seen["body"].as_str().expect("body")).expect("json");
    assert_eq!(forwarded["tools"], tools);

    let stream = post(
        &url,
        &json!({ "model": "qwen2.5:7b", "tools": tools, "stream": true,
        "messages": [{ "role": "user", "content": "weather?" }] }),
    )
    .await
    .text()
    .await
    .expect("body");
    assert!(sse_events(&stream).iter().any(|e| e.contains("\"tool_calls\"") && e.contains("get_weather")));

    let body: Value = post(
        &url,
        &json!({ "model": "qwen2.5:7b", "response_format": { "type": "json_object" },
        "messages": [{ "role": "user", "content": "answer in JSON" }] }),
    )
    .await
    .json()
    .await
    .expect("json");
    let content = body["choices"][0]["message"]["content"].as_str().expect("content");
    let parsed: Value = serde_json::from_str(content).expect("content is JSON");
    assert!(parsed["answer"].is_string());
}

#[tokio::test]
async fn openai_completions_and_embeddings() {
    let (_sim, agent) = sim_and_agent(&["--embedding-dim", "8"], &[]).await;
    let body: Value = post(
        &format!("{}/v1/completions", agent.url),
        &json!({ "model": "llama3.2:3b", "prompt": "Once upon", "max_tokens": 3 }),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let stream = post(
        &format!("{}/v1/completions", agent.url),
        &json!({ "model": "llama3.2:3b", "prompt": "Once", "max_tokens": 3, "stream": true }),
    )
    .await
    .text()
    .await
    .expect("body");
    let events = sse_events(&stream);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(events.len(), 3 + 2, "three tokens, a finish chunk and [DONE]");

    let embed: Value =
        post(&format!("{}/v1/embeddings", agent.url), &json!({ "model": "nomic-embed-text", "input": ["a", "b c"] }))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(embed["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(embed["data"][0]["embedding"].as_array().map(Vec::len), Some(8));
    assert_eq!(embed["usage"]["prompt_tokens"], 3);
    let b64: Value = post(
        &format!("{}/v1/embeddings", agent.url),
        &json!({ "model": "nomic-embed-text", "input": "a", "encoding_format": "base64" }),
    )
    .await
    .json()
    .await
    .expect("json");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().expect("b64"))
        .expect("decodes");
    assert_eq!(bytes.len(), 8 * 4);
}

#[tokio::test]
async fn model_listing_in_both_shapes() {
    let (_sim, agent) =
        sim_and_agent(&["--models", "qwen2.5:7b,llama3.2:3b,hf.co/org/tiny:Q8_0", "--max-loaded", "1"], &[]).await;
    let models = get_json(&format!("{}/v1/models", agent.url)).await;
    let ids: Vec<&str> = models["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, vec!["qwen2.5:7b", "llama3.2:3b", "hf.co/org/tiny:Q8_0"]);
    let one = get_json(&format!("{}/v1/models/hf.co/org/tiny:Q8_0", agent.url)).await;
    assert_eq!(one["id"], "hf.co/org/tiny:Q8_0");
    let missing = client().get(format!("{}/v1/models/nope:1b", agent.url)).send().await.expect("GET");
    assert_eq!(missing.status(), 404);

    let tags = get_json(&format!("{}/api/tags", agent.url)).await;
    assert_eq!(tags["models"].as_array().map(Vec::len), Some(3));
    assert_eq!(tags["models"][0]["details"]["parameter_size"], "7B");
    let ps = get_json(&format!("{}/api/ps", agent.url)).await;
    let loaded: Vec<&str> =
        ps["models"].as_array().expect("models").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(loaded, vec!["qwen2.5:7b"]);
    let version = get_json(&format!("{}/api/version", agent.url)).await;
    assert!(version["version"].as_str().is_some_and(|v| v.split('.').count() == 3));
}

#[tokio::test]
async fn ollama_chat_and_generate_stream_ndjson_by_default() {
    let (_sim, agent) = sim_and_agent(&[], &[]).await;
    for (path, field, body) in [
        (
            "/api/chat",
            "message",
            json!({ "model": "qwen2.5:7b", "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 4 } }),
        ),
        (
            "/api/generate",
            "response",
            json!({ "model": "qwen2.5:7b", "prompt": "hi", "options": { "num_predict": 4 } }),
        ),
    ] {
        let response = post(&format!("{}{path}", agent.url), &body).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/x-ndjson");
        let lines = ndjson_lines(&response.text().await.expect("body"));
        assert_eq!(lines.len(), 5, "{path}: four tokens and a final line");
        assert!(lines[..4].iter().all(|l| l["done"] == false));
        let last = lines.last().expect("final");
        assert_eq!(last["done"], true);
        assert_eq!(last["eval_count"], 4);
        let text: String = lines
            .iter()
            .filter_map(|l| if field == "message" { l["message"]["content"].as_str() } else { l["response"].as_str() })
            .collect();
        assert_eq!(text.split_whitespace().count(), 4);

        let mut once = body.clone();
        once["stream"] = json!(false);
        let single: Value = post(&format!("{}{path}", agent.url), &once).await.json().await.expect("json");
        assert_eq!(single["done"], true, "{path}");
        assert_eq!(single["eval_count"], 4);
    }
}

#[tokio::test]
async fn ollama_embeddings_show_and_tools() {
    let (_sim, agent) = sim_and_agent(&["--embedding-dim", "16"], &[]).await;
    let embed: Value =
        post(&format!("{}/api/embed", agent.url), &json!({ "model": "nomic-embed-text", "input": ["x", "y"] }))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(embed["embeddings"].as_array().map(Vec::len), Some(2));
    assert_eq!(embed["embeddings"][1].as_array().map(Vec::len), Some(16));
    let legacy: Value =
        post(&format!("{}/api/embeddings", agent.url), &json!({ "model": "nomic-embed-text", "prompt": "x" }))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(legacy["embedding"].as_array().map(Vec::len), Some(16));
    let show: Value =
        post(&format!("{}/api/show", agent.url), &json!({ "model": "qwen2.5:7b" })).await.json().await.expect("json");
    assert_eq!(show["details"]["family"], "qwen");
    let chat: Value = post(
        &format!("{}/api/chat", agent.url),
        &json!({ "model": "qwen2.5:7b", "stream": false,
        "messages": [{ "role": "user", "content": "weather?" }],
        "tools": [{ "type": "function", "function": { "name": "get_weather", "parameters": {} } }] }),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(chat["message"]["tool_calls"][0]["function"]["name"], "get_weather");
}

#[tokio::test]
async fn health_and_readiness() {
    let (mut sim, agent) = sim_and_agent(&[], &[]).await;
    assert_eq!(get_json(&format!("{}/healthz", agent.url)).await["status"], "ok");
    let ready = client().get(format!("{}/readyz", agent.url)).send().await.expect("GET");
    assert_eq!(ready.status(), 200);
    sim.kill().await;
    llmesh_tests::eventually("readyz turns 503 once the backend is gone", || async {
        client().get(format!("{}/readyz", agent.url)).send().await.map(|r| r.status() == 503).unwrap_or(false)
    })
    .await;
    assert_eq!(get_json(&format!("{}/healthz", agent.url)).await["status"], "ok");
}
