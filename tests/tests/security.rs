//! Who may talk to a node. An outsider (another cluster's secret and CA), a
//! revoked node, and a revoked node's old certificate replayed from its
//! data directory each try all four planes — gossip, a data-plane stream, a
//! Raft message, an Admin call — and each is refused; a current member
//! doing the very same calls gets through, so the refusals are not an
//! artefact of the probe.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use llmesh_tests::probe::{self, Credentials, Target};
use llmesh_tests::{Proc, agent_in, binary, data_dir, eventually, get_json, join_token, sim};
use serde_json::Value;

const MODEL: &str = "qwen2.5:7b";

/// Node ids `node` lists as alive.
async fn alive(node: &Proc) -> Vec<String> {
    let listed = get_json(&format!("{}/mesh/v1/nodes", node.url)).await;
    listed["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["liveness"] == "alive")
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect()
}

/// How `node` lists itself, as a target for the probe.
async fn target(node: &Proc) -> Target {
    let listed = get_json(&format!("{}/mesh/v1/nodes", node.url)).await;
    let me = listed["node_id"].as_str().expect("node id").to_string();
    let entry: &Value =
        listed["nodes"].as_array().and_then(|a| a.iter().find(|n| n["id"] == me.as_str())).expect("lists itself");
    let addr = |key: &str| entry["addresses"][key].as_str().expect("address").parse().expect("socket address");
    Target { id: me, data: addr("data"), control: addr("control"), p2p: node.p2p_addr() }
}

fn node_id(dir: &Path) -> String {
    probe::credentials(dir).trust.node_id().to_string()
}

/// Tries the planes of `target` with `creds` (gossip too unless the key is
/// in use by a running node), each both as a node would (checking the
/// server's certificate) and as an attacker would (trusting any server, so
/// that only the server's own check can stop it); returns what got through.
async fn planes_open_to(creds: &Credentials, target: &Target, admin_token: &str, gossip: bool) -> Vec<&'static str> {
    let mut open = Vec::new();
    if gossip && probe::gossip(creds, target, Duration::from_secs(3)).await.contains(&target.id) {
        open.push("gossip");
    }
    let polite = probe::data_stream(creds, target, MODEL).await;
    let reckless = probe::data_stream_reckless(creds, target, MODEL).await;
    eprintln!("data plane: {polite:?} / reckless {reckless:?}");
    if polite.is_ok() || reckless.is_ok() {
        open.push("data plane");
    }
    let polite = (probe::raft_send(creds, target).await, probe::admin_status(creds, target, admin_token).await);
    let reckless = probe::control_reckless(creds, target, admin_token).await;
    eprintln!("raft: {:?} / reckless {:?}", polite.0, reckless.0);
    eprintln!("admin: {:?} / reckless {:?}", polite.1, reckless.1);
    if polite.0.is_ok() || reckless.0.is_ok() {
        open.push("raft");
    }
    if polite.1.is_ok() || reckless.1.is_ok() {
        open.push("admin");
    }
    open
}

struct Cluster {
    _sims: Vec<Proc>,
    seed: Proc,
    member: Proc,
    doomed: Option<Proc>,
    seed_dir: PathBuf,
    member_dir: PathBuf,
    doomed_dir: PathBuf,
    token: String,
}

async fn cluster() -> Cluster {
    let seed_dir = data_dir();
    let token = join_token(&seed_dir);
    let sims = vec![sim(&[]).await, sim(&[]).await, sim(&[]).await];
    let seed = agent_in(&seed_dir, &sims[0].url, &["--name", "seed", "--dead-after", "4s"]).await;
    let boot = seed.p2p_addr();
    let join = |name: &'static str| ["--name", name, "--join", &token, "--bootstrap", &boot, "--dead-after", "4s"];
    let member_dir = data_dir();
    let member = agent_in(&member_dir, &sims[1].url, &join("member")).await;
    let doomed_dir = data_dir();
    let doomed = agent_in(&doomed_dir, &sims[2].url, &join("doomed")).await;
    let cluster = Cluster {
        _sims: sims,
        seed,
        member,
        doomed: Some(doomed),
        seed_dir,
        member_dir,
        doomed_dir,
        token: token.clone(),
    };
    for node in [&cluster.seed, &cluster.member, cluster.doomed.as_ref().expect("running")] {
        eventually("every node sees all three alive", || async { alive(node).await.len() == 3 }).await;
    }
    cluster
}

/// Runs an admin command against the seed with the seed's credentials;
/// returns its stdout.
fn admin_cli(c: &Cluster, args: &[&str]) -> Vec<u8> {
    let out = Command::new(binary())
        .args(args)
        .args(["--node", &c.seed.url, "--data-dir"])
        .arg(&c.seed_dir)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn admin_token(seed_dir: &Path) -> String {
    std::fs::read_to_string(seed_dir.join("admin.token")).expect("admin token").trim().to_string()
}

#[tokio::test]
async fn outsiders_revoked_nodes_and_replayed_certificates_are_refused_on_every_plane() {
    let mut c = cluster().await;
    let seed = target(&c.seed).await;
    let admin = admin_token(&c.seed_dir);

    // A current member's credentials open every plane (the control).
    let member = probe::credentials(&c.member_dir);
    assert_eq!(
        planes_open_to(&member, &seed, &admin, false).await,
        ["data plane", "raft", "admin"],
        "a member must get through (gossip is checked with a fresh node below)"
    );
    // Both probe styles work for a member, so either failing later means refusal.
    assert_eq!(probe::data_stream_reckless(&member, &seed, MODEL).await, Ok(200));
    let (raft, admin_call) = probe::control_reckless(&member, &seed, &admin).await;
    assert!(raft.is_ok() && admin_call.is_ok(), "{raft:?} {admin_call:?}");
    // A brand-new node with the token enrolls and joins gossip.
    let fresh_dir = data_dir();
    let fresh = probe::join(&fresh_dir, &c.token);
    let seen = probe::gossip(&fresh, &seed, Duration::from_secs(4)).await;
    assert!(seen.contains(&seed.id), "a node with the token joins gossip: saw {seen:?}");

    // An outsider: another cluster's secret and CA (and the real admin token).
    let outsider_dir = data_dir();
    join_token(&outsider_dir);
    let outsider = probe::credentials(&outsider_dir);
    assert_eq!(planes_open_to(&outsider, &seed, &admin, true).await, Vec::<&str>::new(), "outsider");
    assert!(!alive(&c.seed).await.contains(&outsider.trust.node_id().to_string()));

    // Revoke a running member; every node drops it within seconds.
    let doomed_id = node_id(&c.doomed_dir);
    let started = Instant::now();
    admin_cli(&c, &["node", "revoke", "doomed"]);
    for node in [&c.seed, &c.member] {
        eventually("the revoked node leaves every view", || async { !alive(node).await.contains(&doomed_id) }).await;
    }
    let gone_after = started.elapsed();
    assert!(gone_after < Duration::from_secs(5), "took {gone_after:?}");

    // The revoked node itself, still running with its key and certificate,
    // loses the others (they block it) and cannot reach them.
    let doomed = c.doomed.as_ref().expect("running");
    eventually("the revoked node is cut off from the mesh", || async {
        let seen = alive(doomed).await;
        seen == [doomed_id.clone()]
    })
    .await;
    let response = llmesh_tests::client()
        .post(format!("{}/v1/chat/completions", doomed.url))
        .json(&serde_json::json!({"model": "mistral:7b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("answers");
    assert_ne!(response.status(), 200, "nobody serves a revoked node");

    // Its certificate, replayed from its data directory, opens nothing.
    if let Some(mut node) = c.doomed.take() {
        node.kill().await;
    }
    let replay = probe::credentials(&c.doomed_dir);
    assert_eq!(planes_open_to(&replay, &seed, &admin, true).await, Vec::<&str>::new(), "replayed certificate");
    // It is refused by every node, not only the one that was asked.
    let member_target = target(&c.member).await;
    assert!(probe::data_stream(&replay, &member_target, MODEL).await.is_err());
    // Nor can its key get a fresh certificate with the token.
    let again_dir = data_dir();
    std::fs::copy(c.doomed_dir.join("node.key"), again_dir.join("node.key")).expect("copy key");
    let again = probe::join(&again_dir, &c.token);
    assert_eq!(again.trust.node_id().to_string(), doomed_id);
    let reenrolled = probe::gossip(&again, &seed, Duration::from_secs(3)).await;
    assert!(reenrolled.is_empty() && !again.trust.is_enrolled(), "{reenrolled:?}");

    // The machine still holds the join token, so it could come back under
    // a new key; rotating the join key retires every earlier token.
    let rotated: Value = serde_json::from_slice(&admin_cli(&c, &["token", "rotate", "--json"])).expect("JSON");
    let new_token = rotated["token"].as_str().expect("token").to_string();
    assert_ne!(new_token, c.token);
    let old_token_dir = data_dir();
    let with_old = probe::join(&old_token_dir, &c.token);
    let seen = probe::gossip(&with_old, &seed, Duration::from_secs(3)).await;
    assert!(seen.is_empty() && !with_old.trust.is_enrolled(), "an old token still admits: {seen:?}");
    let new_token_dir = data_dir();
    let with_new = probe::join(&new_token_dir, &new_token);
    let seen = probe::gossip(&with_new, &seed, Duration::from_secs(4)).await;
    assert!(seen.contains(&seed.id), "the new token admits: {seen:?}");
    // `llmesh init` on the seed prints the new token from now on.
    assert_eq!(join_token(&c.seed_dir), new_token);

    // And the members still talk to each other.
    assert_eq!(probe::data_stream(&member, &seed, MODEL).await.ok(), Some(200));
    eprintln!("revocation reached every view in {gone_after:?}");
}
