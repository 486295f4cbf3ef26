//! Joining and operating a fleet: any voter admits new boxes (the `init`
//! box may be gone, disk and all), a box that cannot join says why on
//! `/readyz` and in its log while its HTTP port answers at once, tokens
//! printed after a rotation work and keep the bootstrap addresses, and a
//! data directory serves one agent only.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use llmesh_tests::{Proc, agent, agent_in, binary, client, data_dir, eventually, get_json, join_token, sim};
use serde_json::{Value, json};

/// `/readyz` as (status, reason).
async fn readiness(node: &Proc) -> (u16, String) {
    match client().get(format!("{}/readyz", node.url)).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or_default();
            (status, body["reason"].as_str().unwrap_or("").to_string())
        }
        Err(_) => (0, String::new()),
    }
}

async fn wait_ready(node: &Proc) {
    eventually("the node is ready", || async { readiness(node).await.0 == 200 }).await;
}

/// How long `/healthz` takes to answer, at worst over a few calls.
async fn healthz_time(node: &Proc) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let response = client().get(format!("{}/healthz", node.url)).send().await.expect("healthz answers");
        assert_eq!(response.status(), 200);
        worst = worst.max(started.elapsed());
    }
    worst
}

async fn chat_status(node: &Proc) -> (u16, Value) {
    let body = json!({ "model": "qwen2.5:7b", "max_tokens": 3, "messages": [{ "role": "user", "content": "hi" }] });
    let response = client().post(format!("{}/v1/chat/completions", node.url)).json(&body).send().await.expect("chat");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Runs `llmesh ARGS --node <node> --data-dir <dir>` until it succeeds (a
/// node just started may not have elected its leader or added a member
/// yet); returns stdout.
async fn admin(node: &Proc, dir: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + llmesh_tests::patience();
    loop {
        let out = Command::new(binary())
            .args(args)
            .args(["--node", &node.url, "--data-dir"])
            .arg(dir)
            .output()
            .expect("runs");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn token_in(text: &str) -> String {
    text.lines().find(|l| l.starts_with("lmj2.")).map(str::to_string).unwrap_or_else(|| panic!("no token in {text}"))
}

/// Names of the voters in a node's view of the Raft group.
async fn voters(node: &Proc) -> Vec<String> {
    let cluster = get_json(&format!("{}/mesh/v1/cluster", node.url)).await;
    cluster["voters"]
        .as_array()
        .map(|v| v.iter().filter_map(|v| v["name"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_new_box_joins_through_another_voter_after_the_init_box_is_gone() {
    let backend = sim(&[]).await;
    let mut seed = agent(&backend.url, &["--name", "seed"]).await;
    let seed_dir = seed.data_dir.clone().expect("data dir");
    let token = join_token(&seed_dir);
    let boot = seed.p2p_addr();
    let a = agent(&backend.url, &["--name", "a", "--join", &token, "--bootstrap", &boot]).await;
    let b = agent(&backend.url, &["--name", "b", "--join", &token, "--bootstrap", &boot, "--bootstrap", &a.p2p_addr()])
        .await;
    // Both become voters, and as voters take the CA key from the cluster state.
    eventually("three voters", || async { voters(&seed).await.len() == 3 }).await;
    for node in [&a, &b] {
        let dir = node.data_dir.clone().expect("data dir");
        eventually("the voter holds the CA key", || async { dir.join("ca.key").exists() }).await;
    }

    // The init box dies; a new box joins through `a`, with a token printed
    // on `a`'s own data directory.
    seed.kill().await;
    let token_a = join_token(a.data_dir.as_deref().expect("data dir"));
    let started = Instant::now();
    let c = agent(&backend.url, &["--name", "c", "--join", &token_a, "--bootstrap", &a.p2p_addr()]).await;
    wait_ready(&c).await;
    let (status, _) = chat_status(&c).await;
    assert_eq!(status, 200, "the new box serves");
    println!("joined without the init box and served after {:?}", started.elapsed());
    eventually("the new box sees a and b alive", || async {
        let nodes = get_json(&format!("{}/mesh/v1/nodes", c.url)).await;
        nodes["nodes"].as_array().is_some_and(|n| n.iter().filter(|n| n["liveness"] == "alive").count() >= 3)
    })
    .await;

    // The init box's disk is lost too: a further box still joins.
    std::fs::remove_dir_all(&seed_dir).expect("remove the init box's data");
    let d = agent(&backend.url, &["--name", "d", "--join", &token_a, "--bootstrap", &b.p2p_addr()]).await;
    wait_ready(&d).await;
    assert_eq!(chat_status(&d).await.0, 200);
}

#[tokio::test]
async fn a_box_that_cannot_join_says_why_while_its_port_answers_at_once() {
    let backend = sim(&[]).await;
    let seed = agent(&backend.url, &["--name", "seed"]).await;
    let seed_dir = seed.data_dir.clone().expect("data dir");
    let old_token = join_token(&seed_dir);
    let boot = seed.p2p_addr();
    admin(&seed, &seed_dir, &["token", "rotate"]).await;

    // A rotated-out token: refused, and the box says so.
    let refused = agent(&backend.url, &["--name", "refused", "--join", &old_token, "--bootstrap", &boot]).await;
    eventually("readiness names the refused token", || async {
        readiness(&refused).await == (503, "token_refused".to_string())
    })
    .await;
    assert!(refused.logs().contains("refused this node's join token"), "{}", refused.logs());
    let took = healthz_time(&refused).await;
    assert!(took < Duration::from_millis(500), "healthz took {took:?}");
    // Its own machine still uses its backend; other machines are told to wait.
    assert_eq!(chat_status(&refused).await.0, 200, "loopback clients keep their local backend");

    // A box of another cluster cannot even connect, and says what it tried.
    let other_dir = data_dir();
    let other_token = join_token(&other_dir);
    let stranger = agent(&backend.url, &["--name", "stranger", "--join", &other_token, "--bootstrap", &boot]).await;
    eventually("readiness says no peer is reachable", || async {
        readiness(&stranger).await == (503, "no_peers".to_string())
    })
    .await;
    assert!(stranger.logs().contains("no peer of the cluster is reachable"), "{}", stranger.logs());
    assert!(healthz_time(&stranger).await < Duration::from_millis(500));

    // `init` after the rotation prints the current key; with bootstrap
    // addresses set for the cluster, its token needs no --bootstrap (and
    // here no mDNS either). The token travels in a file.
    admin(&seed, &seed_dir, &["token", "bootstrap", &boot]).await;
    let fresh = token_in(
        &Command::new(binary())
            .args(["init", "--data-dir"])
            .arg(&seed_dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .expect("init"),
    );
    assert_ne!(fresh, old_token);
    let file = data_dir().join("join.token");
    std::fs::write(&file, format!("{fresh}\n")).expect("token file");
    let file_arg = file.to_str().expect("utf-8").to_string();
    let joined = agent(&backend.url, &["--name", "joined", "--join-file", &file_arg]).await;
    wait_ready(&joined).await;
    // A rotation from now on prints tokens with those addresses too.
    let rotated = token_in(&admin(&seed, &seed_dir, &["token", "rotate"]).await);
    let rotated_box = agent(&backend.url, &["--name", "rotated", "--join", &rotated]).await;
    wait_ready(&rotated_box).await;

    // A second agent on a directory in use says so and exits.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary())
            .args(["agent", "--listen", "127.0.0.1:0", "--backend", &backend.url, "--no-mdns", "--data-dir"])
            .arg(&seed_dir)
            .args([
                "--mesh-listen",
                "/ip4/127.0.0.1/tcp/0",
                "--data-listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
            ])
            .output(),
    )
    .await
    .expect("exits at once")
    .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another llmesh agent already uses the data directory"), "{stderr}");
}

#[tokio::test]
async fn a_revoked_box_stays_out_and_says_so_after_a_restart() {
    let backend = sim(&[]).await;
    let seed = agent(&backend.url, &["--name", "seed"]).await;
    let seed_dir = seed.data_dir.clone().expect("data dir");
    let token = join_token(&seed_dir);
    let dir = data_dir();
    let mut doomed =
        agent_in(&dir, &backend.url, &["--name", "doomed", "--join", &token, "--bootstrap", &seed.p2p_addr()]).await;
    wait_ready(&doomed).await;
    admin(&seed, &seed_dir, &["node", "revoke", "doomed"]).await;
    eventually("the revoked node reports it", || async { readiness(&doomed).await == (503, "revoked".to_string()) })
        .await;
    assert!(doomed.logs().contains("this node was revoked by the cluster"), "{}", doomed.logs());
    let (status, body) = chat_status(&doomed).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("node_revoked")), "{body}");
    // The others list it.
    let cluster = get_json(&format!("{}/mesh/v1/cluster", seed.url)).await;
    assert_eq!(cluster["revoked"][0]["name"], "doomed", "{cluster}");
    let status = Command::new(binary()).args(["status", "--node", &seed.url]).output().expect("status");
    assert!(String::from_utf8_lossy(&status.stdout).contains("revoked: doomed"));
    doomed.kill().await;

    let again =
        agent_in(&dir, &backend.url, &["--name", "doomed", "--join", &token, "--bootstrap", &seed.p2p_addr()]).await;
    assert_eq!(readiness(&again).await, (503, "revoked".to_string()), "still out after a restart");
    assert!(healthz_time(&again).await < Duration::from_millis(500));
    assert_eq!(chat_status(&again).await.0, 503);
}
