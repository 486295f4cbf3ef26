//! mDNS discovery on a real (namespaced) LAN: nodes with the same cluster
//! token find each other with no bootstrap address; a node with another
//! secret is discovered by mDNS but refused by the private network.

use std::time::Duration;

use llmesh_tests::netns::Lan;
use llmesh_tests::{Proc, binary, data_dir, eventually, join_token};
use serde_json::Value;

async fn start(lan: &Lan, i: usize, name: &str, token: &str) -> Proc {
    lan.agent(i, &data_dir(), &["--name", name, "--join", token, "--dead-after", "4s"], &[]).await
}

fn names_seen(lan: &Lan, i: usize) -> Vec<String> {
    let node = format!("http://{}:11440", lan.addr(i));
    let Ok(out) = lan.exec(i, &binary(), &["status", "--json", "--node", &node]) else { return Vec::new() };
    let parsed: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    parsed["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["liveness"] == "alive")
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn nodes_on_a_lan_find_each_other_by_mdns() {
    let lan = Lan::new(3);
    // A is the node where `llmesh init` ran: it holds the cluster CA that
    // B's certificate comes from.
    let seed = data_dir();
    let token = join_token(&seed);
    let _a = lan.agent(0, &seed, &["--name", "lan-a", "--dead-after", "4s"], &[]).await;
    let _b = start(&lan, 1, "lan-b", &token).await;
    // The outsider is the seed of a cluster of its own.
    let other = data_dir();
    join_token(&other);
    let _c = lan.agent(2, &other, &["--name", "lan-outsider", "--dead-after", "4s"], &[]).await;
    eventually("A and B discover each other by mDNS", || async {
        let mut a = names_seen(&lan, 0);
        let mut b = names_seen(&lan, 1);
        a.sort();
        b.sort();
        a == ["lan-a", "lan-b"] && b == ["lan-a", "lan-b"]
    })
    .await;
    // The outsider is on the same LAN and answers mDNS, but cannot join.
    for _ in 0..8 {
        assert!(!names_seen(&lan, 0).contains(&"lan-outsider".to_string()));
        assert_eq!(names_seen(&lan, 2), ["lan-outsider"]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
