//! Cloud fallback against a fake aggregator on loopback: models only the
//! cloud has, overflow while the mesh is saturated (and not after it
//! drains), `never` policies that keep requests on the premises, failover
//! between providers, and the circuit breaker opening and closing.

use std::process::Command;
use std::time::Duration;

use futures::future::join_all;
use llmesh_tests::aggregator::{Aggregator, Fault};
use llmesh_tests::{Proc, agent_in_env, binary, client, data_dir, eventually, get_json, ndjson_lines, sim, sse_events};
use serde_json::{Value, json};

fn provider(name: &str, agg: &Aggregator, env: &str) -> String {
    format!(
        r#"
[[cloud.providers]]
name = "{name}"
base_url = "{url}"
api_key_env = "{env}"
headers = {{ "X-Title" = "llmesh-test" }}
response_timeout = "5s"
[cloud.providers.models]
"cloud-only:70b" = "vendor/cloud-70b"
"qwen2.5:7b" = "vendor/qwen"
[cloud.providers.prices]
"cloud-only:70b" = {{ input_per_mtok = 1000.0, output_per_mtok = 2000.0 }}
"#,
        url = agg.url
    )
}

/// An agent in front of `backend` with `providers` (TOML) configured.
async fn agent_with_cloud(backend: &str, providers: &[String], extra: &[&str]) -> Proc {
    let dir = data_dir();
    let config = dir.join("cloud.toml");
    let text = format!(
        "[cloud]\noverflow_after = \"0s\"\nattempts = 1\nbreaker_failures = 2\nbreaker_cooldown = \"2s\"\nretry_backoff = \"50ms\"\n{}",
        providers.concat()
    );
    std::fs::write(&config, text).expect("config written");
    let config = config.to_str().expect("utf-8").to_string();
    let mut args = vec!["--config", config.as_str(), "--name", "edge"];
    args.extend_from_slice(extra);
    agent_in_env(&dir, backend, &args, &[("AGG_A_KEY", "sk-aaa"), ("AGG_B_KEY", "sk-bbb")]).await
}

async fn chat(
    node: &Proc,
    model: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    stream: bool,
) -> (u16, Value, String) {
    let mut request = client().post(format!("{}/v1/chat/completions", node.url)).json(&json!({
        "model": model, "stream": stream, "max_tokens": 30,
        "messages": [{ "role": "user", "content": "hello there" }],
    }));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let route = response.headers().get("x-llmesh-route").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = response.text().await.expect("body");
    let body = if stream { json!({ "sse": text }) } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
    (status, body, route)
}

#[tokio::test]
async fn a_model_only_the_cloud_has_is_listed_served_mapped_and_billed() {
    let agg = Aggregator::start("sk-aaa", &["vendor/cloud-70b"]).await;
    let backend = sim(&[]).await;
    let node = agent_with_cloud(&backend.url, &[provider("prov-a", &agg, "AGG_A_KEY")], &[]).await;

    let models = get_json(&format!("{}/v1/models", node.url)).await;
    let listed = models["data"].as_array().expect("list");
    let cloud = listed.iter().find(|m| m["id"] == "cloud-only:70b").expect("cloud-only model listed");
    assert_eq!(cloud["owned_by"], "prov-a");
    assert!(listed.iter().any(|m| m["id"] == "qwen2.5:7b" && m["owned_by"] == "llmesh"), "mesh models stay ours");

    let (status, body, route) = chat(&node, "cloud-only:70b", None, &[], false).await;
    assert_eq!((status, route.as_str()), (200, "cloud:prov-a"), "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "the cloud answers");
    assert_eq!(body["model"], "cloud-only:70b", "named as the client asked, not by the provider's id");
    let (status, body, route) = chat(&node, "cloud-only:70b", None, &[], true).await;
    assert_eq!((status, route.as_str()), (200, "cloud:prov-a"));
    let events = sse_events(body["sse"].as_str().expect("text"));
    assert!(events.iter().all(|e| !e.contains("vendor/cloud-70b")), "no event names the provider's id: {events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream arrives whole");
    assert_eq!(events.len(), 5);

    // Ollama clients reach cloud models too (translated to /v1 and back).
    let response = client()
        .post(format!("{}/api/chat", node.url))
        .json(&json!({ "model": "cloud-only:70b", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-llmesh-route"], "cloud:prov-a");
    let lines = ndjson_lines(&response.text().await.expect("body"));
    assert_eq!(lines.last().map(|l| l["done"].clone()), Some(json!(true)));
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, "the cloud answers");

    let log = agg.requests();
    assert_eq!(log.len(), 3);
    for entry in &log {
        assert_eq!(entry["model"], "vendor/cloud-70b", "the mesh name is mapped to the provider's id");
        assert_eq!(entry["authorization"], "Bearer sk-aaa", "the key comes from the environment");
        assert_eq!(entry["x_title"], "llmesh-test", "extra headers are sent");
    }
    let spend = get_json(&format!("{}/mesh/v1/cloud", node.url)).await;
    let row = &spend["spend"][0];
    assert_eq!((row["provider"].clone(), row["requests"].clone()), (json!("prov-a"), json!(3)));
    assert!(row["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{spend}");
    assert!(!spend.to_string().contains("sk-aaa"), "keys are never shown");
    assert!(!node.logs().contains("sk-aaa"), "keys are never logged");
}

#[tokio::test]
async fn overflow_starts_when_the_mesh_saturates_and_stops_when_it_drains() {
    let agg = Aggregator::start("sk-aaa", &["vendor/qwen"]).await;
    let backend = sim(&["--slots", "1", "--decode-tps", "20"]).await;
    let node =
        agent_with_cloud(&backend.url, &[provider("prov-a", &agg, "AGG_A_KEY")], &["--parallel-slots", "1"]).await;

    // One slot: the first request takes it, the others overflow at once.
    let burst = join_all((0..4).map(|_| chat(&node, "qwen2.5:7b", None, &[], false))).await;
    let mut routes: Vec<String> = burst
        .iter()
        .map(|(status, _, route)| {
            assert_eq!(*status, 200);
            route.clone()
        })
        .collect();
    routes.sort();
    assert_eq!(routes, ["cloud:prov-a", "cloud:prov-a", "cloud:prov-a", "local"]);
    assert_eq!(agg.requests().len(), 3);

    // Drained: one request at a time stays in the mesh.
    for _ in 0..3 {
        let (status, _, route) = chat(&node, "qwen2.5:7b", None, &[], false).await;
        assert_eq!((status, route.as_str()), (200, "local"));
    }
    assert_eq!(agg.requests().len(), 3, "no overflow once the mesh has room");
}

fn admin(node: &Proc, args: &[&str]) -> Value {
    let dir = node.data_dir.as_deref().expect("data dir").to_str().expect("utf-8").to_string();
    let out = Command::new(binary())
        .args(args)
        .args(["--node", &node.url, "--data-dir", &dir, "--json"])
        .output()
        .expect("llmesh runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

async fn wait_for_raft(node: &Proc) {
    eventually("a Raft leader", || async {
        get_json(&format!("{}/mesh/v1/cluster", node.url)).await["role"] == "leader"
    })
    .await;
}

#[tokio::test]
async fn never_keys_and_the_never_header_keep_requests_on_the_premises() {
    let agg = Aggregator::start("sk-aaa", &["vendor/qwen"]).await;
    let backend = sim(&["--slots", "1", "--decode-tps", "40"]).await;
    let node =
        agent_with_cloud(&backend.url, &[provider("prov-a", &agg, "AGG_A_KEY")], &["--parallel-slots", "1"]).await;
    wait_for_raft(&node).await;
    let never = admin(&node, &["keys", "create", "--name", "on-prem", "--cloud", "never"]);
    let never_key = never["secret"].as_str().expect("secret").to_string();
    let never_id = never["id"].as_str().expect("id").to_string();
    let open = admin(&node, &["keys", "create", "--name", "anything"]);
    let open_key = open["secret"].as_str().expect("secret").to_string();

    // Saturated, but the key says never: all four wait for the one slot.
    let burst = join_all((0..4).map(|_| chat(&node, "qwen2.5:7b", Some(&never_key), &[], false))).await;
    assert!(burst.iter().all(|(status, _, route)| *status == 200 && route == "local"));
    let (status, body, _) = chat(&node, "cloud-only:70b", Some(&never_key), &[], false).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "cloud_not_allowed");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("'never'") && message.contains(&never_id), "{message}");
    let (status, body, _) = chat(&node, "cloud-only:70b", Some(&open_key), &[("x-llmesh-cloud", "never")], false).await;
    assert_eq!(status, 403);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("x-llmesh-cloud")), "{body}");
    assert!(agg.requests().is_empty(), "nothing reached the aggregator: {:?}", agg.requests());

    let (status, _, route) = chat(&node, "cloud-only:70b", Some(&open_key), &[], false).await;
    assert_eq!((status, route.as_str()), (200, "cloud:prov-a"));
    assert_eq!(agg.requests().len(), 1);
}

async fn breaker_state(node: &Proc, provider: &str) -> String {
    let status = get_json(&format!("{}/mesh/v1/cloud", node.url)).await;
    status["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == provider))
        .and_then(|p| p["breaker"].as_str())
        .unwrap_or("?")
        .to_string()
}

#[tokio::test]
async fn a_failing_provider_fails_over_to_the_next_and_its_breaker_opens_and_closes() {
    let a = Aggregator::start("sk-aaa", &["vendor/cloud-70b"]).await;
    let b = Aggregator::start("sk-bbb", &["vendor/cloud-70b"]).await;
    let backend = sim(&[]).await;
    let node = agent_with_cloud(
        &backend.url,
        &[provider("prov-a", &a, "AGG_A_KEY"), provider("prov-b", &b, "AGG_B_KEY")],
        &[],
    )
    .await;
    a.set_fault(Fault::Status(500));
    for _ in 0..5 {
        let (status, body, route) = chat(&node, "cloud-only:70b", None, &[], false).await;
        assert_eq!((status, route.as_str()), (200, "cloud:prov-b"), "{body}");
    }
    assert_eq!(a.requests().len(), 2, "the breaker opened after two failures and skipped prov-a since");
    assert_eq!(breaker_state(&node, "prov-a").await, "open");

    a.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(breaker_state(&node, "prov-a").await, "half-open");
    let (status, _, route) = chat(&node, "cloud-only:70b", None, &[], false).await;
    assert_eq!((status, route.as_str()), (200, "cloud:prov-a"), "the probe went to prov-a and succeeded");
    assert_eq!(breaker_state(&node, "prov-a").await, "closed");

    // Both down: a clean error naming each provider.
    a.set_fault(Fault::Status(503));
    b.set_fault(Fault::Status(502));
    let (status, body, _) = chat(&node, "cloud-only:70b", None, &[], false).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("prov-a") && message.contains("prov-b"), "{message}");
}

#[tokio::test]
async fn a_dead_backend_fails_over_to_the_cloud_unless_the_request_forbids_it() {
    let agg = Aggregator::start("sk-aaa", &["vendor/qwen"]).await;
    let mut backend = sim(&[]).await;
    let node = agent_with_cloud(&backend.url, &[provider("prov-a", &agg, "AGG_A_KEY")], &[]).await;
    let (_, _, route) = chat(&node, "qwen2.5:7b", None, &[], false).await;
    assert_eq!(route, "local");
    backend.kill().await;
    let (status, body, route) = chat(&node, "qwen2.5:7b", None, &[], false).await;
    assert_eq!((status, route.as_str()), (200, "cloud:prov-a"), "{body}");
    let (status, body, _) = chat(&node, "qwen2.5:7b", None, &[("x-llmesh-cloud", "never")], false).await;
    assert!(status >= 500, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("x-llmesh-cloud")), "{body}");
    assert_eq!(agg.requests().len(), 1);
}

#[tokio::test]
async fn a_provider_that_is_down_is_skipped_for_the_next() {
    // A port nothing listens on: connection refused.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        listener.local_addr().expect("address").port()
    };
    let down = format!(
        "\n[[cloud.providers]]\nname = \"down\"\nbase_url = \"http://127.0.0.1:{dead}/v1\"\n[cloud.providers.models]\n\"cloud-only:70b\" = \"x\"\n"
    );
    let agg = Aggregator::start("sk-aaa", &["vendor/cloud-70b"]).await;
    let backend = sim(&[]).await;
    let node = agent_with_cloud(&backend.url, &[down, provider("prov-a", &agg, "AGG_A_KEY")], &[]).await;
    for stream in [false, true] {
        let (status, body, route) = chat(&node, "cloud-only:70b", None, &[], stream).await;
        assert_eq!((status, route.as_str()), (200, "cloud:prov-a"), "{body}");
    }
    assert_eq!(agg.requests().len(), 2);
}
