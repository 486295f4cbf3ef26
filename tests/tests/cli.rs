//! The binary's edges: the demo's printed curl line works, configuration
//! layers in the documented order, bad config exits with a clear message,
//! and SIGTERM drains in-flight work before exiting.

use std::process::Command;

use llmesh_tests::{Proc, binary, client, eventually, sim_and_agent, sim_stats};
use serde_json::{Value, json};

#[tokio::test]
async fn demo_prints_a_curl_line_that_works() {
    let demo = Proc::start(&["demo", "--listen", "127.0.0.1:0"]).await;
    let curl = demo
        .banner
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("curl "))
        .unwrap_or_else(|| panic!("no curl line in the banner:\n{}", demo.banner))
        .to_string();
    assert!(curl.contains(&demo.url), "{curl}");
    let output = tokio::task::spawn_blocking(move || Command::new("sh").args(["-c", &curl]).output())
        .await
        .expect("joins")
        .expect("curl runs");
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let body: Value = serde_json::from_slice(&output.stdout).expect("curl printed JSON");
    assert!(body["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0));

    // The printed route line works too: the demo has a Raft group and its
    // admin token where the banner says.
    eventually("the demo's three nodes are Raft voters", || async {
        let view = llmesh_tests::get_json(&format!("{}/mesh/v1/cluster", demo.url)).await;
        view["voters"].as_array().is_some_and(|v| v.len() == 3)
    })
    .await;
    let route = demo
        .banner
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("llmesh route set"))
        .expect("a route line")
        .split('#')
        .next()
        .expect("command")
        .to_string();
    let args: Vec<&str> = route.split_whitespace().skip(1).collect();
    let output = Command::new(binary()).args(&args).output().expect("llmesh runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let response = client()
        .post(format!("{}/v1/chat/completions", demo.url))
        .json(&json!({ "model": "fast", "max_tokens": 3, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-llmesh-route"], "peer:demo-3", "fast routes to mistral:7b on demo-3");
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(binary())
        .arg("agent")
        .args(args)
        .arg("--print-config")
        .envs(env.iter().copied())
        .output()
        .expect("llmesh runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn config_layers_file_then_env_then_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "[node]\nname = \"from-file\"\n[backend]\nurl = \"http://file:1\"\nidle_timeout = \"7s\"\n")
        .expect("write");
    let file = path.to_str().expect("utf8 path");
    let (ok, out, err) = print_config(&["--config", file], &[("LLMESH_BACKEND__URL", "http://env:2")]);
    assert!(ok, "{err}");
    assert!(out.contains("name = \"from-file\""), "{out}");
    assert!(out.contains("url = \"http://env:2\""), "env beats file:\n{out}");
    assert!(out.contains("idle_timeout = \"7s\""), "{out}");
    let (ok, out, _) =
        print_config(&["--config", file, "--backend", "http://flag:3"], &[("LLMESH_BACKEND__URL", "http://env:2")]);
    assert!(ok);
    assert!(out.contains("url = \"http://flag:3\""), "flag beats env:\n{out}");
}

#[test]
fn bad_config_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[api]\nlisten = \"not an address\"\n").expect("write");
    let output = Command::new(binary()).args(["agent", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listen"), "{stderr}");
    let output = Command::new(binary()).args(["agent", "--config", "/nonexistent/llmesh.toml"]).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));
}

#[tokio::test]
async fn taken_port_gets_a_tip() {
    let (_sim, agent) = sim_and_agent(&[], &[]).await;
    let port = agent.url.rsplit(':').next().expect("port").to_string();
    let output =
        Command::new(binary()).args(["agent", "--listen", &format!("127.0.0.1:{port}")]).output().expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--port-base"), "{stderr}");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_streams_then_exits() {
    // 20 tokens at 20 tokens/s: about a second of streaming.
    let (sim, mut agent) = sim_and_agent(&["--decode-tps", "20"], &[]).await;
    let url = format!("{}/api/generate", agent.url);
    let request = tokio::spawn(async move {
        let response = client()
            .post(url)
            .json(&json!({ "model": "qwen2.5:7b", "prompt": "x", "options": { "num_predict": 20 } }))
            .send()
            .await
            .expect("POST");
        response.text().await.expect("body")
    });
    eventually("the stream starts", || async { sim_stats(&sim).await["in_flight"] == 1 }).await;
    assert!(agent.terminate().await, "agent exits cleanly on SIGTERM");
    let body = request.await.expect("joins");
    let last: Value = serde_json::from_str(body.lines().last().expect("lines")).expect("json");
    assert_eq!(last["done"], true, "the in-flight stream completed: {body}");
    assert_eq!(last["eval_count"], 20);
}
