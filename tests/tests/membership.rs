//! Membership across real agent processes on loopback: discovery through
//! bootstrap addresses, gossip of models and load, liveness after a crash,
//! a stable node id across restarts, and a private network that nodes with
//! another cluster secret cannot enter.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_tests::{Proc, agent, agent_in, binary, client, eventually, get_json, join_token, patience, sim};
use serde_json::{Value, json};

async fn nodes(agent: &Proc) -> Vec<Value> {
    get_json(&format!("{}/mesh/v1/nodes", agent.url)).await["nodes"].as_array().cloned().unwrap_or_default()
}

fn node_id(agent: &Proc) -> String {
    agent
        .banner
        .lines()
        .find_map(|l| l.rsplit("/p2p/").next().filter(|_| l.contains("/p2p/")))
        .expect("p2p id")
        .trim()
        .to_string()
}

fn find<'a>(nodes: &'a [Value], id: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["id"] == id)
}

const FAST: &[&str] = &["--dead-after", "4s"];

async fn join(sim_url: &str, token: &str, bootstrap: &str, name: &str) -> Proc {
    let mut args = vec!["--join", token, "--bootstrap", bootstrap, "--name", name];
    args.extend_from_slice(FAST);
    agent(sim_url, &args).await
}

#[tokio::test]
async fn three_nodes_find_each_other_and_share_models_and_load() {
    let sim_a = sim(&[]).await;
    let sim_b = sim(&[]).await;
    let sim_c = sim(&["--models", "qwen2.5:7b,only-c:1b", "--decode-tps", "5"]).await;
    let mut args = vec!["--name", "node-a"];
    args.extend_from_slice(FAST);
    let a = agent(&sim_a.url, &args).await;
    let token = join_token(a.data_dir.as_deref().expect("data dir"));
    let boot = a.p2p_addr();
    let b = join(&sim_b.url, &token, &boot, "node-b").await;
    let c = join(&sim_c.url, &token, &boot, "node-c").await;
    let started = Instant::now();
    let ids = [node_id(&a), node_id(&b), node_id(&c)];

    // Every node lists all three, alive, within 5 s.
    let limit = Duration::from_secs(5).mul_f64(patience().as_secs_f64() / 15.0);
    loop {
        let mut complete = true;
        for node in [&a, &b, &c] {
            let listed = nodes(node).await;
            complete &= ids.iter().all(|id| find(&listed, id).is_some_and(|n| n["liveness"] == "alive"));
        }
        if complete {
            break;
        }
        assert!(started.elapsed() < limit, "not every node saw all three within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // C's model, loaded there, is in A's view and in A's model lists.
    let listed = nodes(&a).await;
    let c_on_a = find(&listed, &ids[2]).expect("C on A");
    assert_eq!(c_on_a["name"], "node-c");
    assert!(
        c_on_a["models"]["loaded"].as_array().expect("loaded").iter().any(|m| m["name"] == "only-c:1b"),
        "{c_on_a}"
    );
    let models = get_json(&format!("{}/v1/models", a.url)).await;
    assert!(models["data"].as_array().expect("data").iter().any(|m| m["id"] == "only-c:1b"));
    let tags = get_json(&format!("{}/api/tags", b.url)).await;
    assert!(tags["models"].as_array().expect("models").iter().any(|m| m["name"] == "only-c:1b"));

    // C gets busy: its in-flight count moves in A's view, and back.
    let response = client()
        .post(format!("{}/v1/chat/completions", c.url))
        .json(&json!({ "model": "only-c:1b", "stream": true, "max_tokens": 100, "messages": [{ "role": "user", "content": "x" }] }))
        .send()
        .await
        .expect("POST");
    let mut body = response.bytes_stream();
    body.next().await.expect("first chunk").expect("readable");
    let c_id = ids[2].clone();
    eventually("A sees C busy", || async {
        find(&nodes(&a).await, &c_id).is_some_and(|n| n["load"]["in_flight"] == 1)
    })
    .await;
    drop(body);
    eventually("A sees C idle again", || async {
        find(&nodes(&a).await, &c_id).is_some_and(|n| n["load"]["in_flight"] == 0)
    })
    .await;

    // A node with another cluster secret never gets in.
    let sim_d = sim(&[]).await;
    let d = agent(&sim_d.url, &["--bootstrap", &boot, "--name", "outsider"]).await;
    let d_id = node_id(&d);
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        for node in [&a, &b, &c] {
            assert!(find(&nodes(node).await, &d_id).is_none(), "the outsider got into {}", node.url);
        }
        assert_eq!(nodes(&d).await.len(), 1, "the outsider sees nobody");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Membership still works for the members.
    assert_eq!(nodes(&a).await.len(), 3);
}

#[tokio::test]
async fn a_killed_node_is_marked_dead_and_returns_with_the_same_id() {
    let sim_a = sim(&[]).await;
    let sim_b = sim(&[]).await;
    let sim_c = sim(&[]).await;
    let mut args = vec!["--name", "node-a"];
    args.extend_from_slice(FAST);
    let a = agent(&sim_a.url, &args).await;
    let token = join_token(a.data_dir.as_deref().expect("data dir"));
    let boot = a.p2p_addr();
    let mut b = join(&sim_b.url, &token, &boot, "node-b").await;
    let c = join(&sim_c.url, &token, &boot, "node-c").await;
    let b_id = node_id(&b);
    let b_dir = b.data_dir.clone().expect("data dir");
    for node in [&a, &c] {
        let id = b_id.clone();
        eventually("B alive everywhere", || async {
            find(&nodes(node).await, &id).is_some_and(|n| n["liveness"] == "alive")
        })
        .await;
    }

    b.kill().await;
    let killed = Instant::now();
    for node in [&a, &c] {
        let id = b_id.clone();
        eventually("B dead on A and C", || async {
            find(&nodes(node).await, &id).is_some_and(|n| n["liveness"] == "dead")
        })
        .await;
    }
    // Dead after 4 s of silence; allow a heartbeat and a poll of slack.
    assert!(killed.elapsed() < Duration::from_secs(4 + 3), "took {:?}", killed.elapsed());

    let mut args = vec!["--join", &token, "--bootstrap", &boot, "--name", "node-b"];
    args.extend_from_slice(FAST);
    let b_again = agent_in(&b_dir, &sim_b.url, &args).await;
    assert_eq!(node_id(&b_again), b_id, "same data dir, same node id");
    for node in [&a, &c] {
        let id = b_id.clone();
        eventually("B alive again", || async {
            find(&nodes(node).await, &id).is_some_and(|n| n["liveness"] == "alive")
        })
        .await;
    }
}

#[tokio::test]
async fn status_prints_the_mesh() {
    let sim_a = sim(&[]).await;
    let a = agent(&sim_a.url, &["--name", "status-node"]).await;
    let url = a.url.clone();
    let out = tokio::task::spawn_blocking(move || Command::new(binary()).args(["status", "--node", &url]).output())
        .await
        .expect("joins")
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().next().is_some_and(|l| l.starts_with("NODE")), "{table}");
    assert!(table.contains("status-node (this)") && table.contains("qwen2.5:7b*"), "{table}");
    let url = a.url.clone();
    let out =
        tokio::task::spawn_blocking(move || Command::new(binary()).args(["status", "--json", "--node", &url]).output())
            .await
            .expect("joins")
            .expect("runs");
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(parsed["nodes"][0]["name"], "status-node");
    let out = Command::new(binary()).args(["status", "--node", "http://127.0.0.1:9"]).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn nodes_that_only_know_a_middle_node_connect_by_gossiped_addresses() {
    let sims = [sim(&[]).await, sim(&[]).await, sim(&[]).await];
    let a = agent(&sims[0].url, &["--name", "chain-a"]).await;
    let token = join_token(a.data_dir.as_deref().expect("data dir"));
    let b = join(&sims[1].url, &token, &a.p2p_addr(), "chain-b").await;
    // C knows only B; gossip alone would relay A's state through B, but C
    // should also find A itself and connect to it directly.
    let c = join(&sims[2].url, &token, &b.p2p_addr(), "chain-c").await;
    let a_id = node_id(&a);
    eventually("C sees A", || async { find(&nodes(&c).await, &a_id).is_some_and(|n| n["liveness"] == "alive") }).await;
    eventually("C is connected to both A and B", || async {
        get_json(&format!("{}/mesh/v1/nodes", c.url)).await["connected_peers"] == 2
    })
    .await;
}

#[tokio::test]
async fn load_figures_come_from_the_nodes_own_traffic() {
    // 50 tokens/s: a 20-token stream takes about 0.4 s.
    let backend = sim(&["--decode-tps", "50"]).await;
    let a = agent(&backend.url, &[]).await;
    for path in ["/v1/chat/completions", "/api/chat"] {
        let body = json!({ "model": "qwen2.5:7b", "stream": true, "max_tokens": 20, "options": { "num_predict": 20 },
                           "messages": [{ "role": "user", "content": "x" }] });
        let text = client()
            .post(format!("{}{path}", a.url))
            .json(&body)
            .send()
            .await
            .expect("POST")
            .text()
            .await
            .expect("body");
        assert!(!text.is_empty());
    }
    let listed = nodes(&a).await;
    let me = listed.iter().find(|n| n["self"] == true).expect("self");
    let model =
        me["load"]["models"].as_array().expect("models").iter().find(|m| m["model"] == "qwen2.5:7b").expect("model");
    assert!(model["ttft_ewma_ms"].as_f64().is_some_and(|t| t >= 0.0), "{model}");
    // Measured, not configured: loose bounds, since the machine may be busy.
    let decode = model["decode_tokens_per_s_ewma"].as_f64().unwrap_or(0.0);
    assert!((5.0..=150.0).contains(&decode), "decode speed {decode} from a 50 tokens/s backend");
    assert_eq!(me["load"]["in_flight"], 0);
}
