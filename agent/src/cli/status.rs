//! One-shot commands: `llmesh init` and `llmesh status`.

use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llmesh_mesh::{ClusterSecret, JoinToken};
use serde_json::Value;

use crate::cli::args::{InitArgs, StatusArgs};
use llmesh::api::nodes::NodesView;
use llmesh::config::{MeshConfig, parse_peer_addr};

/// `llmesh init`: creates the cluster secret and node key in the data
/// directory (keeping existing ones) and prints the join token: the
/// current one (after a rotation too), with the cluster's bootstrap
/// addresses.
pub fn init(args: &InitArgs) -> ExitCode {
    match init_cluster(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("llmesh init: {message}");
            code
        }
    }
}

type InitError = (ExitCode, String);

fn failed(err: impl std::fmt::Display) -> InitError {
    (ExitCode::FAILURE, err.to_string())
}

fn init_cluster(args: &InitArgs) -> Result<(), InitError> {
    let dir = MeshConfig { data_dir: args.data_dir.clone(), ..MeshConfig::default() }.data_dir();
    let bootstrap = args
        .bootstrap
        .iter()
        .map(|a| parse_peer_addr(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (ExitCode::from(2), e.to_string()))?;
    let (secret, created) = ClusterSecret::load_or_create(&dir).map_err(failed)?;
    if created {
        llmesh_mesh::seed::make_seed(&dir).map_err(failed)?;
    }
    let node_id = llmesh_mesh::identity::load_or_create(&dir).map_err(failed)?.0.public().to_peer_id();
    let ca = llmesh_mesh::pki::ca_fingerprint(&dir).map_err(failed)?.ok_or_else(|| {
        failed(format!(
            "{} has no cluster CA certificate yet: start its agent once so that it enrolls, or run init on a node of the cluster",
            dir.display()
        ))
    })?;
    let bootstrap = bootstrap_for_tokens(&dir, bootstrap)?;
    let join = llmesh_mesh::seed::join_key(&dir, &secret).map_err(failed)?;
    let has_bootstrap = !bootstrap.is_empty();
    let token = JoinToken { secret: secret.clone(), ca, join, bootstrap }.encode();
    let what = if created { "created a new cluster" } else { "this node's cluster" };
    println!("{what} (fingerprint {}), secret stored in {}", secret.fingerprint(), dir.display());
    println!("cluster CA: sha256 {}", llmesh_mesh::pki::hex(&ca));
    println!("this node's id: {node_id}");
    println!();
    println!("join token (keep it secret: it admits machines to the cluster):");
    println!("{token}");
    println!();
    println!("on every other box: save the token in a file only the agent can read, then start it:");
    println!("  (umask 077; echo '{token}' > join.token)");
    println!("  llmesh agent --listen 0.0.0.0:11440 --join-file join.token");
    match llmesh_mesh::seed::admin_token(&dir) {
        Ok(Some(_)) => println!(
            "admin credential (for `llmesh keys|route|node|token`): {}; start this node's agent on {} first: it starts the cluster's Raft group",
            dir.join("admin.token").display(),
            dir.display()
        ),
        _ => println!("(this node joined the cluster; the admin credential lives on the node that created it)"),
    }
    if !has_bootstrap {
        println!(
            "(where mDNS cannot reach this box, add --bootstrap THIS_HOST:11441 on the others, or run init with --bootstrap, or `llmesh token bootstrap`)"
        );
    }
    Ok(())
}

/// Addresses given to `init` are kept for later tokens (and shared with
/// the cluster by its leader); without any, the ones kept in `dir` (from
/// an earlier init or the cluster state) are used.
fn bootstrap_for_tokens(
    dir: &std::path::Path,
    given: Vec<llmesh_mesh::Multiaddr>,
) -> Result<Vec<llmesh_mesh::Multiaddr>, InitError> {
    if given.is_empty() {
        return Ok(llmesh_mesh::seed::bootstrap_addrs(dir).iter().filter_map(|a| a.parse().ok()).collect());
    }
    let text: Vec<String> = given.iter().map(ToString::to_string).collect();
    llmesh_mesh::seed::store_bootstrap_addrs(dir, &text).map_err(failed)?;
    Ok(given)
}

/// GETs `url` and parses its JSON body as a `T`.
pub async fn fetch_as<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, String> {
    let value = fetch(url).await?;
    serde_json::from_value(value).map_err(|e| format!("{url} sent an unexpected body: {e}"))
}

/// GETs `url` and parses its JSON body.
pub async fn fetch(url: &str) -> Result<Value, String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| format!("{url} did not answer within 10s"))?
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
    if !status.is_success() {
        return Err(format!("{url} answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url} sent invalid JSON: {e}"))
}

fn short_id(id: &str) -> String {
    if id.len() > 12 { format!("…{}", &id[id.len() - 10..]) } else { id.to_string() }
}

/// Renders `/mesh/v1/nodes` as a table.
pub fn render_table(view: &NodesView) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "ID".into(),
        "STATE".into(),
        "API".into(),
        "BACKEND".into(),
        "IN-FLIGHT".into(),
        "GPUS".into(),
        "MODELS (* = loaded)".into(),
    ]];
    for node in &view.nodes {
        let loaded = |m: &str| node.models.loaded.iter().any(|l| l.name == m);
        let models: Vec<String> =
            node.models.available.iter().map(|m| if loaded(m) { format!("{m}*") } else { m.clone() }).collect();
        let name = format!("{}{}", node.name, if node.is_self { " (this)" } else { "" });
        let backend = format!("{} {}", node.backend.kind, if node.backend.healthy { "ok" } else { "down" });
        rows.push([
            name,
            short_id(&node.id),
            node.liveness.clone(),
            node.addresses.api.clone(),
            backend,
            node.load.in_flight.to_string(),
            if node.gpus.is_empty() { "none".into() } else { node.gpus.len().to_string() },
            models.join(", "),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, cell)| if c == 7 { cell.clone() } else { format!("{cell:<width$}", width = widths[c]) })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Renders `/mesh/v1/cluster` as a few lines: leader, term, members.
pub fn render_cluster(cluster: &Value) -> String {
    let names = |list: &Value| {
        let names: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m["name"].as_str().filter(|n| !n.is_empty()) {
                Some(name) => name.to_string(),
                None => m["node_id"].as_str().map_or_else(|| m["raft_id"].to_string(), short_id),
            })
            .collect();
        if names.is_empty() { "-".to_string() } else { names.join(", ") }
    };
    let leader = cluster["leader"]["name"].as_str().unwrap_or("none known");
    let drained = names(&cluster["drained"]);
    let revoked = names(&cluster["revoked"]);
    format!(
        "raft: leader {leader}, term {}, commit index {}, this node {}\nvoters: {}\nlearners: {}\ndrained: {drained}\nrevoked: {revoked}\nkeys: {} active of {}; routes: {}",
        cluster["term"],
        cluster["commit_index"],
        cluster["role"].as_str().unwrap_or("?"),
        names(&cluster["voters"]),
        names(&cluster["learners"]),
        cluster["keys"]["active"],
        cluster["keys"]["total"],
        cluster["routes"].as_object().map_or(0, |r| r.len()),
    )
}

/// `llmesh status`: the mesh as one node sees it.
pub async fn status(args: &StatusArgs) -> ExitCode {
    let base = args.node.trim_end_matches('/');
    match fetch_as::<NodesView>(&format!("{base}/mesh/v1/nodes")).await {
        Ok(nodes) => {
            // Older or mesh-less nodes have no cluster view; show the nodes anyway.
            let cluster = fetch(&format!("{base}/mesh/v1/cluster")).await.unwrap_or(Value::Null);
            if args.json {
                let mut json = serde_json::to_value(&nodes).unwrap_or(Value::Null);
                json["cluster"] = cluster;
                println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
            } else {
                println!("{}", render_table(&nodes));
                if cluster["enabled"] == true {
                    println!();
                    println!("{}", render_cluster(&cluster));
                }
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("llmesh status: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_marks_loaded_models_and_this_node() {
        let nodes: NodesView = serde_json::from_value(json!({ "node_id": "a", "connected_peers": 1, "nodes": [
            { "name": "a", "self": true, "id": "12D3KooWabcdefghijklmnop", "liveness": "alive", "version": "1",
              "addresses": { "api": "http://127.0.0.1:1", "data": "", "control": "", "p2p": [] },
              "backend": { "kind": "sim", "healthy": true },
              "load": { "in_flight": 2, "queued": 0, "slots": 4, "models": [] }, "gpus": [], "draining": false,
              "last_seen_ms": 0,
              "models": { "loaded": [{ "name": "m1", "vram_bytes": 0, "context_length": 0, "quantization": "",
                                       "family": "" }], "available": ["m1", "m2"] } },
            { "name": "b", "self": false, "id": "short", "liveness": "dead", "version": "1",
              "addresses": { "api": "http://127.0.0.1:2", "data": "", "control": "", "p2p": [] },
              "backend": { "kind": "ollama", "healthy": false }, "draining": false, "last_seen_ms": 9000,
              "load": { "in_flight": 0, "queued": 0, "slots": 1, "models": [] },
              "gpus": [{ "name": "g", "utilization_percent": 0, "memory_used_bytes": 0, "memory_total_bytes": 0,
                         "temperature_c": 0 }],
              "models": { "loaded": [], "available": [] } },
        ]}))
        .expect("the endpoint's schema");
        let table = render_table(&nodes);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("a (this)"));
        assert!(lines[1].contains("m1*, m2"));
        assert!(lines[1].contains("…ghijklmnop"));
        assert!(lines[2].contains("dead") && lines[2].contains("ollama down"));
    }
}
