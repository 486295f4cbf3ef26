//! Node-to-node traffic is encrypted: two nodes on hosts in network
//! namespaces, `tshark` on the bridge between them (every packet from one
//! node to the other crosses it) while a request is forwarded from one to
//! the other and an admin write replicates. Neither the prompt, nor the
//! answer, nor the admin write appears in the capture; the same capture
//! taken on the entry host's loopback, where the client's plain HTTP goes,
//! does show the prompt (so the search itself works).

use std::time::Duration;

use llmesh_tests::netns::Lan;
use llmesh_tests::{binary, data_dir, eventually, join_token};

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Packets in a capture file that match a display filter.
fn count(path: &std::path::Path, filter: &str) -> usize {
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(path)
        .args(["-Y", filter, "-T", "fields", "-e", "frame.number"])
        .output()
        .expect("tshark reads the capture");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test]
async fn no_plaintext_crosses_the_wire_between_nodes() {
    let lan = Lan::new(2);
    let seed = data_dir();
    let token = join_token(&seed);
    let open = [("LLMESH_API__ANONYMOUS", "any")];
    let _a = lan.agent(0, &seed, &["--name", "wire-a", "--no-mdns", "--sim-models", "qwen2.5:7b"], &open).await;
    let boot = format!("{}:11441", lan.addr(0));
    let args = ["--name", "wire-b", "--no-mdns", "--join", &token, "--bootstrap", &boot, "--sim-models", "mistral:7b"];
    let _b = lan.agent(1, &data_dir(), &args, &[]).await;
    let entry = format!("http://{}:11440", lan.addr(0));
    eventually("wire-a can route to wire-b", || async {
        lan.exec(0, &binary(), &["status", "--json", "--node", &entry])
            .is_ok_and(|out| out.contains("mistral:7b") && out.matches("\"alive\"").count() >= 2)
    })
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let wire = lan.capture(lan.switch(), "br0", &dir.path().join("bridge.pcap"));
    let client_side = lan.capture(lan.host(0), "lo", &dir.path().join("loopback.pcap"));
    // Gossip crosses the bridge every second; loopback needs a poke.
    wire.wait_for_packets(|| {});
    let health = format!("{entry}/healthz");
    client_side.wait_for_packets(|| {
        let _ = lan.exec(0, std::path::Path::new("curl"), &["-s", "-o", "/dev/null", &health]);
    });

    let prompt = format!("the secret plan is number {}", std::process::id());
    let body = format!(r#"{{"model":"mistral:7b","messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let url = format!("{entry}/v1/chat/completions");
    let answer = lan
        .exec(
            0,
            std::path::Path::new("curl"),
            &["-s", "-D", "-", "-H", "content-type: application/json", "-d", &body, &url],
        )
        .expect("curl runs");
    assert!(answer.contains("x-llmesh-route: peer:wire-b"), "the request must cross to wire-b: {answer}");
    let json_start = answer.find('{').expect("a JSON body");
    let reply: serde_json::Value = serde_json::from_str(&answer[json_start..]).expect("JSON");
    let content = reply["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    let marker = format!("wiremarker{}", std::process::id());
    let seed_text = seed.to_str().expect("utf-8");
    // Retried: the seed may still be electing itself right after start.
    eventually("the admin write commits", || async {
        lan.exec(0, &binary(), &["route", "set", &marker, "mistral:7b", "--node", &entry, "--data-dir", seed_text])
            .is_ok()
    })
    .await;
    eventually("the route reaches wire-b", || async {
        let node = format!("http://{}:11440", lan.addr(1));
        lan.exec(1, &binary(), &["status", "--json", "--node", &node]).is_ok_and(|out| out.contains(&marker))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let bridge = wire.finish();
    let loopback = client_side.finish();
    let bridge_path = dir.path().join("bridge.pcap");
    assert!(count(&bridge_path, "udp") > 0, "the forwarded request crossed the bridge over QUIC");
    assert!(count(&bridge_path, "tcp.len > 0") > 0, "gossip and Raft crossed the bridge over TCP");
    assert!(!contains(&bridge, &prompt), "the prompt crossed the wire in plaintext");
    assert!(!contains(&bridge, &content), "the answer crossed the wire in plaintext");
    assert!(!contains(&bridge, &marker), "the admin write crossed the wire in plaintext");
    assert!(!contains(&bridge, "mistral:7b"), "even model names are not visible on the wire");
    // The search works: the client's own HTTP request is plaintext.
    assert!(contains(&loopback, &prompt), "the loopback capture should hold the client's plaintext request");
}
