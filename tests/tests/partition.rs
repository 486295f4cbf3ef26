//! Raft under a network partition, on hosts in network namespaces: a node
//! cut off from the other two can neither commit nor elect itself, the
//! majority keeps committing, and the cut-off node catches up after the
//! partition heals.

use std::time::Duration;

use llmesh_tests::netns::Lan;
use llmesh_tests::{Proc, binary, data_dir, eventually, join_token};
use serde_json::Value;

async fn start(lan: &Lan, i: usize, dir: &std::path::Path, token: &str) -> Proc {
    let boot = format!("{}:11441", lan.addr(0));
    let name = format!("part-{i}");
    let mut args = vec!["--name", &name, "--join", token, "--no-mdns", "--dead-after", "3s"];
    if i > 0 {
        args.extend_from_slice(&["--bootstrap", &boot]);
    }
    lan.agent(i, dir, &args, &[]).await
}

/// `llmesh ARGS --node <host i> --json` run inside host `i`.
fn cli(lan: &Lan, i: usize, seed: &std::path::Path, args: &[&str]) -> Result<Value, String> {
    let node = format!("http://{}:11440", lan.addr(i));
    let mut all = args.to_vec();
    all.extend_from_slice(&["--node", &node, "--json"]);
    if args[0] != "status" {
        all.extend_from_slice(&["--data-dir", seed.to_str().expect("utf-8")]);
    }
    let out = lan.exec(i, &binary(), &all)?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

fn cluster(lan: &Lan, i: usize, seed: &std::path::Path) -> Value {
    cli(lan, i, seed, &["status"]).map(|s| s["cluster"].clone()).unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_minority_cannot_commit_and_catches_up_after_healing() {
    let lan = Lan::new(3);
    let seed = data_dir();
    let token = join_token(&seed);
    let _a = start(&lan, 0, &seed, &token).await;
    let _b = start(&lan, 1, &data_dir(), &token).await;
    let _c = start(&lan, 2, &data_dir(), &token).await;
    eventually("three voters agree on a leader", || async {
        (0..3).all(|i| {
            let view = cluster(&lan, i, &seed);
            view["voters"].as_array().is_some_and(|v| v.len() == 3) && view["leader"]["name"].is_string()
        })
    })
    .await;
    // Cut off a node that is not the leader, so the majority keeps its leader.
    let leader = cluster(&lan, 0, &seed)["leader"]["name"].as_str().map(str::to_string).expect("leader");
    let cut = (0..3).find(|i| format!("part-{i}") != leader).expect("a follower");
    lan.partition(cut).expect("partition");

    let refused = cli(&lan, cut, &seed, &["route", "set", "minority", "qwen2.5:7b"]);
    assert!(refused.is_err(), "a write through the cut-off node must not commit: {refused:?}");
    let err = refused.unwrap_err();
    assert!(err.contains("commit") || err.contains("leader"), "{err}");

    let majority = (0..3).find(|i| *i != cut).expect("majority node");
    cli(&lan, majority, &seed, &["route", "set", "majority", "llama3.2:3b"]).expect("the majority commits");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let isolated = cluster(&lan, cut, &seed);
    assert!(isolated["routes"].get("majority").is_none(), "the cut-off node cannot see new commits yet");
    assert_ne!(isolated["role"], "leader", "the cut-off node never leads alone");

    lan.heal(cut).expect("heal");
    eventually("the healed node catches up", || async {
        let view = cluster(&lan, cut, &seed);
        view["routes"]["majority"] == "llama3.2:3b" && view["leader"]["name"].is_string()
    })
    .await;
    for i in 0..3 {
        let routes = cluster(&lan, i, &seed)["routes"].clone();
        assert!(routes.get("minority").is_none(), "the refused write never appears on node {i}: {routes}");
    }
}

/// `curl` run inside host `i`: the HTTP status of a chat request to `url`.
fn remote_chat(lan: &Lan, i: usize, url: &str) -> String {
    let curl = std::path::Path::new("curl");
    let body = r#"{"model":"qwen2.5:7b","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;
    lan.exec(
        i,
        curl,
        &["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json", "-d", body, url],
    )
    .unwrap_or_else(|e| e)
}

#[tokio::test]
async fn anonymous_requests_are_accepted_only_from_loopback_unless_configured() {
    let lan = Lan::new(2);
    let dir = data_dir();
    let url = format!("http://{}:11440/v1/chat/completions", lan.addr(0));
    let mut node = lan.agent(0, &dir, &["--no-mdns"], &[]).await;
    assert_eq!(remote_chat(&lan, 1, &url), "401", "a remote client without a key is refused by default");
    node.kill().await;
    let _node = lan.agent(0, &dir, &["--no-mdns"], &[("LLMESH_API__ANONYMOUS", "any")]).await;
    assert_eq!(remote_chat(&lan, 1, &url), "200", "api.anonymous = any lets it in");
}
