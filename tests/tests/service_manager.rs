//! Under systemd (`Type=notify`) the agent says READY only once it serves:
//! a node still waiting to join its cluster stays "activating" with a
//! STATUS line that says why, and a SIGTERM is announced as STOPPING.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use llmesh_tests::{agent_in_env, client, data_dir, join_token, sim};
use serde_json::json;

/// A service manager's notification socket, as systemd would pass it.
struct NotifySocket {
    socket: UnixDatagram,
    path: String,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        NotifySocket { socket, path: path.to_string_lossy().into_owned(), _dir: dir }
    }

    /// Every message that arrives within `wait`, split into `KEY=VALUE`
    /// lines, stopping early once a line equals `stop`.
    fn read(&self, wait: Duration, stop: Option<&str>) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                lines.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string));
                if stop.is_some_and(|stop| lines.iter().any(|l| l == stop)) {
                    break;
                }
            }
        }
        lines
    }

    /// Every line that arrives within `wait`.
    fn lines_within(&self, wait: Duration) -> Vec<String> {
        self.read(wait, None)
    }

    /// Lines until one equals `line` (inclusive), or panics after `wait`.
    fn until(&self, line: &str, wait: Duration) -> Vec<String> {
        let lines = self.read(wait, Some(line));
        assert!(lines.iter().any(|l| l == line), "no {line} within {wait:?}; got {lines:?}");
        lines
    }
}

#[tokio::test]
async fn ready_is_sent_once_the_node_serves_and_stopping_on_sigterm() {
    let backend = sim(&[]).await;
    let notify = NotifySocket::new();
    let mut node = agent_in_env(&data_dir(), &backend.url, &[], &[("NOTIFY_SOCKET", &notify.path)]).await;
    let lines = notify.until("READY=1", Duration::from_secs(30));
    assert!(lines.iter().any(|l| l.starts_with("STATUS=serving")), "{lines:?}");
    let reply = client()
        .post(format!("{}/v1/chat/completions", node.url))
        .json(&json!({ "model": "qwen2.5:7b", "max_tokens": 3, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("chat");
    assert_eq!(reply.status().as_u16(), 200, "a node that said READY serves");
    assert!(node.terminate().await, "the agent exits on SIGTERM");
    let lines = notify.lines_within(Duration::from_millis(500));
    assert!(lines.iter().any(|l| l == "STOPPING=1"), "{lines:?}");
}

#[tokio::test]
async fn a_node_that_cannot_join_yet_is_not_ready_and_says_why() {
    let backend = sim(&[]).await;
    let token = join_token(&data_dir());
    let notify = NotifySocket::new();
    // The token's cluster has no node this one can reach.
    let args = ["--join", &token, "--bootstrap", "/ip4/127.0.0.1/tcp/9"];
    let _node = agent_in_env(&data_dir(), &backend.url, &args, &[("NOTIFY_SOCKET", &notify.path)]).await;
    let lines = notify.lines_within(Duration::from_secs(4));
    assert!(!lines.iter().any(|l| l == "READY=1"), "READY before this node is a member: {lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("STATUS=not serving yet (")), "{lines:?}");
}
