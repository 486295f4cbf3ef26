//! The coordinator across real agent processes: leader election and
//! failover, voters and learners, admin writes through any node enforced
//! by every node, state kept across a full restart, model placement.
//! (Partitions run in network namespaces: `tests/partition.rs`.)

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use llmesh_tests::{
    Proc, agent_in_env, binary, client, data_dir, eventually, get_json, join_token, patience, sim, sim_stats,
};
use serde_json::{Value, json};

/// Scales a wall-clock promise by `LLMESH_TEST_PATIENCE` like `patience()`.
fn within(limit: Duration) -> Duration {
    limit.mul_f64(patience().as_secs_f64() / 15.0)
}

const ENV: &[(&str, &str)] = &[("LLMESH_MESH__REPLACE_VOTER_AFTER", "4s"), ("LLMESH_MESH__PLACEMENT_HOT_FOR", "1s")];

/// A mesh of agents (each with its own sim), node 0 the seed.
struct Mesh {
    _sims: Vec<Proc>,
    nodes: Vec<Option<Proc>>,
    dirs: Vec<PathBuf>,
    names: Vec<String>,
    token: String,
    voters: String,
}

impl Mesh {
    async fn start(n: usize, voters: usize) -> Mesh {
        let mut mesh = Mesh {
            _sims: Vec::new(),
            nodes: Vec::new(),
            dirs: Vec::new(),
            names: Vec::new(),
            token: String::new(),
            voters: voters.to_string(),
        };
        for i in 0..n {
            let backend = sim(&[]).await;
            mesh.dirs.push(data_dir());
            mesh.names.push(format!("node-{i}"));
            let node = mesh.launch(i, &backend.url, None).await;
            if i == 0 {
                mesh.token = join_token(&mesh.dirs[0]);
            }
            mesh.nodes.push(Some(node));
            mesh._sims.push(backend);
        }
        mesh
    }

    async fn launch(&self, i: usize, backend: &str, bootstrap: Option<String>) -> Proc {
        let mut args = vec!["--name", &self.names[i], "--voters", &self.voters, "--dead-after", "3s"];
        let boot;
        if i > 0 || bootstrap.is_some() {
            boot = bootstrap.unwrap_or_else(|| self.node(0).p2p_addr());
            args.extend_from_slice(&["--join", &self.token, "--bootstrap", &boot]);
        }
        agent_in_env(&self.dirs[i], backend, &args, ENV).await
    }

    fn node(&self, i: usize) -> &Proc {
        self.nodes[i].as_ref().expect("node is running")
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Proc)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill().await;
        }
    }

    /// Runs an admin command against node `i` with the seed's credential.
    fn admin(&self, i: usize, args: &[&str]) -> Result<Value, String> {
        let seed = self.dirs[0].to_str().expect("utf-8");
        let out = Command::new(binary())
            .args(args)
            .args(["--node", &self.node(i).url, "--data-dir", seed, "--json"])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

async fn cluster(node: &Proc) -> Value {
    get_json(&format!("{}/mesh/v1/cluster", node.url)).await
}

/// Indexes of live nodes that call themselves leader, and the leader name
/// every live node agrees on (if they agree).
async fn leadership(mesh: &Mesh) -> (Vec<usize>, Option<String>) {
    let mut leaders = Vec::new();
    let mut named = Vec::new();
    for (i, node) in mesh.live() {
        let view = cluster(node).await;
        if view["role"] == "leader" {
            leaders.push(i);
        }
        named.push(view["leader"]["name"].as_str().map(str::to_string));
    }
    let agreed = named.first().cloned().flatten().filter(|first| named.iter().all(|n| n.as_deref() == Some(first)));
    (leaders, agreed)
}

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> =
        list.as_array().into_iter().flatten().filter_map(|m| m["name"].as_str().map(str::to_string)).collect();
    names.sort();
    names
}

async fn wait_for_voters(mesh: &Mesh, voters: usize, learners: usize) {
    eventually(&format!("{voters} voters and {learners} learners, one leader"), || async {
        let (leaders, agreed) = leadership(mesh).await;
        let view = cluster(mesh.node(leaders.first().copied().unwrap_or(0))).await;
        leaders.len() == 1
            && agreed.is_some()
            && names(&view["voters"]).len() == voters
            && names(&view["learners"]).len() == learners
    })
    .await;
}

async fn chat(node: &Proc, key: Option<&str>, model: &str) -> (u16, Value) {
    let mut request = client().post(format!("{}/v1/chat/completions", node.url)).json(&json!({
        "model": model, "max_tokens": 4, "messages": [{ "role": "user", "content": "hi" }],
    }));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn three_nodes_elect_one_leader_and_fail_over_within_three_seconds() {
    let mut mesh = Mesh::start(3, 3).await;
    wait_for_voters(&mesh, 3, 0).await;
    let (leaders, _) = leadership(&mesh).await;
    let old = leaders[0];
    let old_term = cluster(mesh.node(old)).await["term"].as_u64().expect("term");

    mesh.kill(old).await;
    let killed = Instant::now();
    let limit = within(Duration::from_secs(3));
    let new = loop {
        let (leaders, agreed) = leadership(&mesh).await;
        if let ([leader], Some(_)) = (leaders.as_slice(), agreed) {
            break *leader;
        }
        assert!(killed.elapsed() < limit, "no new leader within {limit:?} of killing the old one");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = killed.elapsed();
    assert_ne!(new, old);
    assert!(cluster(mesh.node(new)).await["term"].as_u64().expect("term") > old_term);
    eprintln!("new leader after {took:?}");

    // Writes continue through either survivor.
    for (i, _) in mesh.live().map(|(i, n)| (i, n.url.clone())).collect::<Vec<_>>() {
        let reply = mesh.admin(i, &["route", "set", &format!("alias-{i}"), "qwen2.5:7b"]).expect("write commits");
        assert!(reply["index"].as_u64().is_some_and(|x| x > 0));
    }
}

#[tokio::test]
async fn five_nodes_keep_three_voters_and_learners_never_vote() {
    let mut mesh = Mesh::start(5, 3).await;
    wait_for_voters(&mesh, 3, 2).await;
    let (leaders, _) = leadership(&mesh).await;
    let old = leaders[0];
    let view = cluster(mesh.node(old)).await;
    let voters = names(&view["voters"]);
    let learners = names(&view["learners"]);

    mesh.kill(old).await;
    let deadline = Instant::now() + patience();
    let new = loop {
        let (leaders, agreed) = leadership(&mesh).await;
        if let ([leader], Some(_)) = (leaders.as_slice(), agreed) {
            break Some(*leader);
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let new_name = mesh.names[new.expect("leader")].clone();
    assert!(voters.contains(&new_name), "the new leader {new_name} was a voter ({voters:?})");
    // Learners did not even start an election (raft-rs logs every campaign).
    for (i, node) in mesh.live() {
        if learners.contains(&mesh.names[i]) {
            let logs = node.logs();
            assert!(
                !logs.contains("became pre-candidate") && !logs.contains("became candidate"),
                "learner {} campaigned:\n{logs}",
                mesh.names[i]
            );
        }
    }
    // The dead voter is replaced by a learner: three live voters again.
    eventually("three live voters after the replacement", || async {
        let view = cluster(mesh.node(new.expect("leader"))).await;
        let voters = names(&view["voters"]);
        voters.len() == 3 && !voters.contains(&mesh.names[old])
    })
    .await;
}

#[tokio::test]
async fn keys_and_routes_written_anywhere_apply_everywhere_within_a_second() {
    let mesh = Mesh::start(3, 3).await;
    wait_for_voters(&mesh, 3, 0).await;
    for (_, node) in mesh.live() {
        assert_eq!(chat(node, None, "qwen2.5:7b").await.0, 200, "open until the first key exists");
    }
    assert!(mesh.admin(1, &["keys", "list", "--admin-token", "wrong"]).is_err_and(|e| e.contains("wrong admin token")));

    let created = mesh.admin(1, &["keys", "create", "--name", "alice"]).expect("key created");
    let secret = created["secret"].as_str().expect("secret").to_string();
    let id = created["id"].as_str().expect("id").to_string();
    let written = Instant::now();
    for (i, node) in mesh.live() {
        loop {
            let anonymous = chat(node, None, "qwen2.5:7b").await;
            let keyed = chat(node, Some(&secret), "qwen2.5:7b").await;
            if anonymous.0 == 401 && keyed.0 == 200 {
                assert_eq!(anonymous.1["error"]["code"], "missing_api_key");
                break;
            }
            assert!(written.elapsed() < within(Duration::from_secs(1)), "node {i} did not enforce the key in 1 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(chat(mesh.node(0), Some("lmk_not-a-key"), "qwen2.5:7b").await.0, 401);

    mesh.admin(2, &["route", "set", "fast", "llama3.2:3b"]).expect("route set");
    for (_, node) in mesh.live() {
        let (status, body) = chat(node, Some(&secret), "fast").await;
        // Served (no backend knows "fast"), and named as the client asked.
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], "fast", "the response names the model the client asked for");
    }
    let routes = mesh.admin(0, &["route", "list"]).expect("routes");
    assert_eq!(routes["routes"]["fast"], "llama3.2:3b");

    mesh.admin(0, &["keys", "revoke", &id]).expect("revoked");
    let revoked = Instant::now();
    for (i, node) in mesh.live() {
        while chat(node, Some(&secret), "qwen2.5:7b").await.0 != 401 {
            assert!(revoked.elapsed() < within(Duration::from_secs(1)), "node {i} still accepts a revoked key");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let listed = mesh.admin(2, &["keys", "list"]).expect("list");
    assert_eq!(listed["keys"][0]["revoked"], true);
    assert!(listed["keys"][0].get("secret").is_none(), "secrets are never listed");
}

#[tokio::test]
async fn a_full_restart_keeps_keys_routes_and_drains() {
    let mut mesh = Mesh::start(3, 3).await;
    wait_for_voters(&mesh, 3, 0).await;
    let secret = mesh.admin(0, &["keys", "create", "--name", "kept"]).expect("key")["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    mesh.admin(1, &["route", "set", "fast", "llama3.2:3b"]).expect("route");
    mesh.admin(2, &["node", "drain", "node-2"]).expect("drain");
    let before = cluster(mesh.node(0)).await;

    for i in 0..3 {
        mesh.kill(i).await;
    }
    let backends: Vec<String> = mesh._sims.iter().map(|s| s.url.clone()).collect();
    let first = mesh.launch(0, &backends[0], None).await;
    let boot = first.p2p_addr();
    mesh.nodes[0] = Some(first);
    for (i, backend) in backends.iter().enumerate().skip(1) {
        let node = mesh.launch(i, backend, Some(boot.clone())).await;
        mesh.nodes[i] = Some(node);
    }
    wait_for_voters(&mesh, 3, 0).await;
    for (_, node) in mesh.live() {
        let after = cluster(node).await;
        assert_eq!(after["keys"], before["keys"]);
        assert_eq!(after["routes"], json!({ "fast": "llama3.2:3b" }));
        assert_eq!(names(&after["drained"]), ["node-2"]);
        assert_eq!(chat(node, None, "fast").await.0, 401);
        let (status, body) = chat(node, Some(&secret), "fast").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], "fast");
    }
}

#[tokio::test]
async fn a_drained_node_gets_no_work_until_undrained() {
    let mesh = Mesh::start(2, 1).await;
    wait_for_voters(&mesh, 1, 1).await;
    mesh.admin(0, &["node", "drain", "node-1"]).expect("drain");
    eventually("node-1 sees itself drained", || async { names(&cluster(mesh.node(1)).await["drained"]) == ["node-1"] })
        .await;
    for _ in 0..6 {
        let response = client()
            .post(format!("{}/v1/chat/completions", mesh.node(1).url))
            .json(&json!({ "model": "qwen2.5:7b", "max_tokens": 2, "messages": [{ "role": "user", "content": "x" }] }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-llmesh-node"], "node-0", "the drained node forwards its work");
    }
    mesh.admin(1, &["node", "undrain", "node-1"]).expect("undrain");
    assert!(mesh.admin(0, &["node", "drain", "no-such-node"]).is_err_and(|e| e.contains("no member")));
}

#[tokio::test]
async fn a_hot_model_is_preloaded_on_a_second_node_and_traffic_spreads() {
    // node-0 serves hot:7b from the start; node-1 has it on disk only, and
    // loading it there is slow enough that the scheduler alone would not
    // send work there before the leader places it.
    let sim_a = sim(&["--models", "hot:7b", "--slots", "2", "--decode-tps", "40"]).await;
    let sim_b = sim(&["--models", "hot:7b,cold:1b", "--preload", "cold:1b", "--load-ms", "4000"]).await;
    let dirs = [data_dir(), data_dir()];
    let a = agent_in_env(&dirs[0], &sim_a.url, &["--name", "node-0", "--voters", "1"], ENV).await;
    let token = join_token(&dirs[0]);
    let boot = a.p2p_addr();
    let b =
        agent_in_env(&dirs[1], &sim_b.url, &["--name", "node-1", "--join", &token, "--bootstrap", &boot], ENV).await;
    eventually("both nodes in the Raft group", || async { names(&cluster(&a).await["learners"]) == ["node-1"] }).await;
    let b_id = cluster(&a).await["learners"][0]["node_id"].as_str().expect("id").to_string();

    // Bounded load: 6 clients, each at most 60 requests and 40 s.
    let stop = Instant::now() + within(Duration::from_secs(40));
    let served_by_b = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..6 {
        let (url, served_by_b) = (a.url.clone(), served_by_b.clone());
        clients.push(tokio::spawn(async move {
            for r in 0..60 {
                if Instant::now() > stop || served_by_b.load(std::sync::atomic::Ordering::Relaxed) >= 3 {
                    break;
                }
                let response = client()
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&json!({
                        "model": "hot:7b", "max_tokens": 40,
                        "messages": [{ "role": "user", "content": format!("client {c} request {r}") }],
                    }))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 200);
                if response.headers()["x-llmesh-node"] == "node-1" {
                    served_by_b.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = response.bytes().await;
            }
        }));
    }
    for c in clients {
        c.await.expect("client");
    }
    let placement = cluster(&a).await["placement"]["hot:7b"].clone();
    assert!(
        placement.as_array().is_some_and(|p| p.iter().any(|n| n == b_id.as_str())),
        "the leader placed hot:7b on node-1: {placement}"
    );
    assert!(b.logs().contains("preloading: the leader placed this model here"), "node-1 preloaded hot:7b");
    assert!(sim_stats(&sim_b).await["loads"].as_u64().is_some_and(|n| n >= 1));
    assert!(served_by_b.load(std::sync::atomic::Ordering::Relaxed) >= 3, "traffic spread to node-1");
}
