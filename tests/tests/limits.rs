//! Per-key limits across a 3-node mesh: a requests-per-minute limit admits
//! exactly its number however requests are spread over the nodes, and a
//! spent token budget is refused by every node. Plus `/metrics` moving.

use std::path::PathBuf;
use std::process::Command;

use llmesh_tests::{Proc, agent_in, binary, client, data_dir, eventually, get_json, join_token, sim};
use serde_json::{Value, json};

struct Mesh {
    _sims: Vec<Proc>,
    nodes: Vec<Proc>,
    seed: PathBuf,
}

async fn mesh() -> Mesh {
    let mut sims = Vec::new();
    let mut nodes: Vec<Proc> = Vec::new();
    let seed = data_dir();
    let mut token = String::new();
    for i in 0..3 {
        let backend = sim(&[]).await;
        let name = format!("lim-{i}");
        let node = if i == 0 {
            agent_in(&seed, &backend.url, &["--name", &name]).await
        } else {
            let boot = nodes[0].p2p_addr();
            agent_in(&data_dir(), &backend.url, &["--name", &name, "--join", &token, "--bootstrap", &boot]).await
        };
        if i == 0 {
            token = join_token(&seed);
        }
        nodes.push(node);
        sims.push(backend);
    }
    let mesh = Mesh { _sims: sims, nodes, seed };
    eventually("three voters and a leader everywhere", || async {
        let mut ok = true;
        for node in &mesh.nodes {
            let view = get_json(&format!("{}/mesh/v1/cluster", node.url)).await;
            ok &= view["voters"].as_array().is_some_and(|v| v.len() == 3) && view["leader"]["name"].is_string();
        }
        ok
    })
    .await;
    mesh
}

impl Mesh {
    fn create_key(&self, args: &[&str]) -> (String, String) {
        let out = Command::new(binary())
            .args(["keys", "create", "--name", "limited"])
            .args(args)
            .args(["--node", &self.nodes[1].url, "--data-dir", self.seed.to_str().expect("utf-8"), "--json"])
            .output()
            .expect("llmesh runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let key: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        (key["id"].as_str().expect("id").into(), key["secret"].as_str().expect("secret").into())
    }

    async fn wait_known(&self, secret: &str) {
        for node in &self.nodes {
            eventually("the key is known on every node", || async {
                chat(node, secret).await.status().as_u16() != 401
            })
            .await;
        }
    }
}

async fn chat(node: &Proc, key: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", node.url))
        .bearer_auth(key)
        .json(&json!({ "model": "qwen2.5:7b", "max_tokens": 10, "messages": [{ "role": "user", "content": "count" }] }))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn a_key_limited_to_ten_requests_a_minute_gets_ten_across_three_nodes() {
    let mesh = mesh().await;
    let (id, secret) = mesh.create_key(&["--rpm", "10"]);
    // Probing that every node knows the key spends part of the limit: count it.
    mesh.wait_known(&secret).await;
    let probes = 3;
    let mut accepted = probes;
    let mut refused = 0;
    for i in 0..15 {
        let response = chat(&mesh.nodes[i % 3], &secret).await;
        match response.status().as_u16() {
            200 => {
                accepted += 1;
                assert_eq!(response.headers()["x-ratelimit-limit-requests"], "10");
                let remaining: u64 = response.headers()["x-ratelimit-remaining-requests"]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("number");
                assert_eq!(remaining, 10 - accepted, "remaining counts down across nodes");
            }
            429 => {
                refused += 1;
                let retry: f64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
                assert!((1.0..=60.0).contains(&retry), "{retry}");
                assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
                let body: Value = response.json().await.expect("JSON");
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                assert_eq!(body["error"]["type"], "rate_limit_error");
                assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains(&id)), "{body}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(accepted, 10, "exactly the limit is admitted across the mesh");
    assert_eq!(refused, 15 + probes - 10);
}

#[tokio::test]
async fn an_exhausted_budget_gives_429_on_every_node() {
    let mesh = mesh().await;
    let (_, secret) = mesh.create_key(&["--budget", "60", "--budget-period", "day"]);
    mesh.wait_known(&secret).await;
    let mut spent = false;
    for _ in 0..20 {
        let response = chat(&mesh.nodes[0], &secret).await;
        if response.status() == 429 {
            let body: Value = response.json().await.expect("JSON");
            assert_eq!(body["error"]["code"], "insufficient_quota");
            spent = true;
            break;
        }
        assert_eq!(response.status(), 200);
    }
    assert!(spent, "60 tokens at about 12 per request run out within 20 requests");
    // The entry node flushes its usage to the replicated ledger (every 2 s).
    let ledger_tokens = || {
        let out = Command::new(binary())
            .args(["keys", "list", "--node", &mesh.nodes[2].url, "--data-dir", mesh.seed.to_str().expect("utf-8")])
            .arg("--json")
            .output()
            .expect("llmesh runs");
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        listed["keys"][0]["tokens_used"].as_u64().unwrap_or(0)
    };
    eventually("the spent tokens reach the ledger", || async { ledger_tokens() >= 60 }).await;
    // Now every node refuses at once: not one more request gets through.
    for node in &mesh.nodes {
        let response = chat(node, &secret).await;
        assert_eq!(response.status(), 429, "{}", node.url);
        let retry: u64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
        assert!((1..=86_400).contains(&retry));
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "insufficient_quota");
    }
}
