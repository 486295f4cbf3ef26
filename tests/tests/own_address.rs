//! Who counts as local, on hosts in network namespaces: a client on the
//! agent's own machine that dials the box's LAN address (not 127.0.0.1)
//! counts as local for `api.anonymous = "loopback"`, a client on another
//! box does not; and with `api.public_status = false` the status
//! endpoints answer only local clients.

use std::path::Path;

use llmesh_tests::data_dir;
use llmesh_tests::netns::Lan;

/// Calls `path` on host `to`'s agent from inside host `from` (a POST of
/// `body` when given, else a GET); returns the HTTP status.
fn call_from(lan: &Lan, from: usize, to: usize, path: &str, body: Option<&str>) -> u16 {
    let script = format!(
        r#"
import sys, urllib.request, urllib.error
body = sys.argv[1].encode() if len(sys.argv) > 1 else None
request = urllib.request.Request("http://{}:11440{path}", data=body, headers={{"content-type": "application/json"}})
try:
    print(urllib.request.urlopen(request, timeout=20).status)
except urllib.error.HTTPError as err:
    print(err.code)
"#,
        lan.addr(to)
    );
    let mut args = vec!["-c", script.as_str()];
    args.extend(body);
    let out = lan.exec(from, Path::new("python3"), &args).expect("python3 runs in the namespace");
    out.trim().parse().unwrap_or_else(|_| panic!("no status in {out:?}"))
}

fn chat_from(lan: &Lan, from: usize, to: usize) -> u16 {
    let body = r#"{"model": "qwen2.5:7b", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#;
    call_from(lan, from, to, "/v1/chat/completions", Some(body))
}

fn get_from(lan: &Lan, from: usize, to: usize, path: &str) -> u16 {
    call_from(lan, from, to, path, None)
}

#[tokio::test]
async fn status_endpoints_can_be_closed_to_other_machines() {
    let lan = Lan::new(2);
    let dir = data_dir();
    let env = [("LLMESH_API__PUBLIC_STATUS", "false")];
    let _agent = lan.agent(0, &dir, &["--name", "closed-box", "--no-mdns"], &env).await;
    for path in ["/metrics", "/mesh/v1/nodes", "/"] {
        assert_eq!(get_from(&lan, 0, 0, path), 200, "{path} from the box itself");
        assert_eq!(get_from(&lan, 1, 0, path), 401, "{path} from another box");
    }
    assert_eq!(get_from(&lan, 1, 0, "/readyz"), 200, "load balancers still see readiness");
}

#[tokio::test]
async fn the_boxs_own_lan_address_counts_as_local() {
    let lan = Lan::new(2);
    let dir = data_dir();
    let _agent = lan.agent(0, &dir, &["--name", "lan-box", "--no-mdns"], &[]).await;
    assert_eq!(chat_from(&lan, 0, 0), 200, "a client on the box, dialling its LAN address");
    assert_eq!(chat_from(&lan, 1, 0), 401, "a client on another box, without a key");
}
