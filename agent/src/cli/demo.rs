//! `llmesh demo`: a three-node mesh on simulated backends in one process,
//! so the API, the mesh and forwarding can be tried without a GPU or
//! Ollama. Each node's sim has different models; asking the first node for
//! a model only the third holds shows a request crossing the data plane.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use llmesh_mesh::ClusterSecret;
use tokio_util::sync::CancellationToken;

use crate::cli::args::DemoArgs;
use llmesh::app::{Ready, RunError};
use llmesh::config::{BackendKind, Config, DEFAULT_PORT_BASE};
use llmesh_sim::SimConfig;

fn files(err: impl std::fmt::Display) -> RunError {
    RunError::Mesh(llmesh_mesh::node::NodeError::Files(err.to_string()))
}

/// Ports between the demo's nodes.
const NODE_PORT_STRIDE: u16 = 10;

/// Models of each demo node, and which start warm.
const NODES: [(&str, &[&str], &[&str]); 3] = [
    ("demo-1", &["qwen2.5:7b", "nomic-embed-text"], &["qwen2.5:7b", "nomic-embed-text"]),
    ("demo-2", &["qwen2.5:7b", "llama3.2:3b"], &["qwen2.5:7b"]),
    ("demo-3", &["mistral:7b"], &["mistral:7b"]),
];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The configuration of demo node `index`: a sim that feels like a small
/// GPU box (40 tokens/s, 2 slots, 1.5 s cold loads).
pub fn node_config(args: &DemoArgs, index: usize, data_dir: &Path) -> Config {
    let (name, models, warm) = NODES[index];
    let mut config = Config::default();
    config.node.name = name.into();
    config.backend.kind = BackendKind::Sim;
    config.backend.inventory_interval = Duration::from_secs(1);
    config.sim = crate::cli::sim::section(&SimConfig {
        models: strings(models),
        preload: Some(strings(warm)),
        slots: 2,
        max_loaded: 2,
        prompt_tps: 2000.0,
        decode_tps: 40.0,
        load_ms: 1500,
        output_tokens: 24,
        ..SimConfig::default()
    });
    config.api.drain_timeout = Duration::from_secs(5);
    let mut listen = args.listen.unwrap_or(config.api.listen);
    if args.listen.is_none() {
        listen.set_port(args.port_base.unwrap_or(DEFAULT_PORT_BASE));
    }
    let offset = if listen.port() == 0 { 0 } else { NODE_PORT_STRIDE * index as u16 };
    listen.set_port(listen.port() + offset);
    config.api.listen = listen;
    let port = |delta: u16| if listen.port() == 0 { 0 } else { listen.port() + delta };
    // A throwaway identity on loopback, no LAN discovery: the demo must not
    // join (or be joined by) anything else on the network.
    config.mesh.data_dir = Some(data_dir.join(name));
    config.mesh.mdns = false;
    config.mesh.listen = Some(format!("/ip4/127.0.0.1/tcp/{}", port(1)));
    config.mesh.data_listen = Some(SocketAddr::new(listen.ip(), port(2)));
    config.mesh.control_listen = Some(SocketAddr::new(listen.ip(), port(3)));
    config.log.filter = "warn".into();
    config
}

/// What the demo prints once its mesh is up.
pub fn banner(addr: SocketAddr, admin_dir: &Path) -> String {
    let base = format!("http://{addr}");
    let admin = admin_dir.display();
    format!(
        "llmesh demo is running: three nodes on simulated backends (no GPU or Ollama needed)\n\
         \n  OpenAI API:  {base}/v1      Ollama API: OLLAMA_HOST={addr}\n\
         \n  demo-1 (this URL): qwen2.5:7b, nomic-embed-text\
         \n  demo-2:            qwen2.5:7b, llama3.2:3b (cold: the first request loads it)\
         \n  demo-3:            mistral:7b\n\
         \nTry it:\n\
         \n  curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"qwen2.5:7b\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n\
         \n  # mistral:7b lives on demo-3: the response header x-llmesh-route says peer:demo-3\
         \n  curl -si {base}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"mistral:7b\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'\n\
         \n  llmesh status --node {base}\
         \n  llmesh route set fast mistral:7b --node {base} --data-dir {admin}   # then ask for model \"fast\"\n\
         \nPress Ctrl-C to stop.\n"
    )
}

async fn start_node(
    config: Config,
    shutdown: CancellationToken,
) -> Result<(Ready, tokio::task::JoinHandle<Result<(), RunError>>), RunError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        crate::cli::sim::run_agent(config, shutdown, move |ready| {
            let _ = tx.send(ready.clone());
        })
        .await
    });
    match rx.await {
        Ok(ready) => Ok((ready, task)),
        // The node failed before it was ready: report its error.
        Err(_) => Err(task
            .await
            .map_err(|e| RunError::Backend(e.to_string()))?
            .err()
            .unwrap_or_else(|| RunError::Backend("a demo node stopped before it was ready".into()))),
    }
}

/// Runs the demo until `shutdown`; `print` receives the banner.
pub async fn run(args: &DemoArgs, shutdown: CancellationToken, print: impl FnOnce(&str)) -> Result<(), RunError> {
    sweep_dead_demos();
    let data_dir = std::env::temp_dir().join(format!("{DEMO_DIR_PREFIX}{}", std::process::id()));
    let _remove = RemoveOnDrop(data_dir.clone());
    let secret = ClusterSecret::generate();
    let mut configs: Vec<Config> = (0..NODES.len()).map(|i| node_config(args, i, &data_dir)).collect();
    // demo-1 created the cluster: it holds the CA, starts the Raft group and
    // keeps the admin token; the others join with its token, as real nodes do.
    let admin_dir = configs[0].mesh.data_dir();
    secret.store(&admin_dir).map_err(files)?;
    llmesh_mesh::seed::make_seed(&admin_dir).map_err(files)?;
    let ca = llmesh_mesh::pki::ca_fingerprint(&admin_dir)
        .map_err(files)?
        .ok_or_else(|| files("the demo's cluster CA was not created"))?;
    let join = secret.initial_join_key();
    let token = llmesh_mesh::JoinToken { secret: secret.clone(), ca, join, bootstrap: Vec::new() }.encode();
    for config in configs.iter_mut().skip(1) {
        config.mesh.join = Some(token.clone());
    }
    let mut tasks = Vec::new();
    let (first, task) = start_node(configs.remove(0), shutdown.clone()).await?;
    tasks.push(task);
    let bootstrap: Vec<String> = first.p2p.iter().map(ToString::to_string).collect();
    for mut config in configs {
        config.mesh.bootstrap = bootstrap.clone();
        let (_, task) = start_node(config, shutdown.clone()).await?;
        tasks.push(task);
    }
    wait_for_mesh(first.http, NODES.len()).await;
    print(&banner(first.http, &admin_dir));
    let mut result = Ok(());
    for task in tasks {
        match task.await {
            Ok(Err(err)) => result = Err(err),
            Err(err) => result = Err(RunError::Backend(err.to_string())),
            Ok(Ok(())) => {}
        }
    }
    result
}

/// Prefix of a demo's data directory under the temp dir; the process id follows.
const DEMO_DIR_PREFIX: &str = "llmesh-demo-";

/// Removes the demo's data directory however `run` ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the data directories of demos that were killed (their process
/// is gone), so repeated demos do not fill the temp dir. Only where
/// `/proc` tells which processes live.
fn sweep_dead_demos() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DEMO_DIR_PREFIX)).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Waits (up to 10 s) until the first node sees every demo node alive.
async fn wait_for_mesh(addr: SocketAddr, nodes: usize) {
    let url = format!("http://{addr}/mesh/v1/nodes");
    for _ in 0..100 {
        if let Ok(view) = crate::cli::status::fetch_as::<llmesh::api::nodes::NodesView>(&url).await {
            let alive = view.nodes.iter().filter(|n| n.liveness == "alive").count();
            if alive >= nodes {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!("the demo mesh is not complete yet; it may take a few more seconds");
}
