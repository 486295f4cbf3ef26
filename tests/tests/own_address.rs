//! A client on the agent's own machine that dials the box's LAN address
//! (not 127.0.0.1) counts as local for `api.anonymous = "loopback"`; a
//! client on another box does not. Hosts in network namespaces.

use std::path::Path;

use llmesh_tests::data_dir;
use llmesh_tests::netns::Lan;

/// POSTs a chat completion from inside host `from` to host `to`'s agent;
/// returns the HTTP status.
fn chat_from(lan: &Lan, from: usize, to: usize) -> u16 {
    let script = format!(
        r#"
import json, urllib.request, urllib.error
body = json.dumps({{"model": "qwen2.5:7b", "max_tokens": 2, "messages": [{{"role": "user", "content": "hi"}}]}}).encode()
request = urllib.request.Request("http://{}:11440/v1/chat/completions", data=body, headers={{"content-type": "application/json"}})
try:
    print(urllib.request.urlopen(request, timeout=20).status)
except urllib.error.HTTPError as err:
    print(err.code)
"#,
        lan.addr(to)
    );
    let out = lan.exec(from, Path::new("python3"), &["-c", &script]).expect("python3 runs in the namespace");
    out.trim().parse().unwrap_or_else(|_| panic!("no status in {out:?}"))
}

#[tokio::test]
async fn the_boxs_own_lan_address_counts_as_local() {
    let lan = Lan::new(2);
    let dir = data_dir();
    let _agent = lan.agent(0, &dir, &["--name", "lan-box", "--no-mdns"], &[]).await;
    assert_eq!(chat_from(&lan, 0, 0), 200, "a client on the box, dialling its LAN address");
    assert_eq!(chat_from(&lan, 1, 0), 401, "a client on another box, without a key");
}
