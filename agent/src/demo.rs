//! `llmesh demo`: an agent over an in-process simulated backend with
//! realistic speeds, so the API can be tried without a GPU or Ollama.

use std::net::SocketAddr;
use std::time::Duration;

use crate::cli::DemoArgs;
use crate::config::{BackendKind, Config};
use crate::sim::SimConfig;

/// The demo's configuration: a sim that feels like a small GPU box.
pub fn config(args: &DemoArgs) -> Config {
    let mut config = Config::default();
    config.node.name = "demo-1".into();
    config.backend.kind = BackendKind::Sim;
    config.backend.inventory_interval = Duration::from_secs(1);
    config.sim = SimConfig {
        models: vec!["qwen2.5:7b".into(), "llama3.2:3b".into(), "nomic-embed-text".into()],
        preload: Some(vec!["qwen2.5:7b".into(), "nomic-embed-text".into()]),
        slots: 2,
        max_loaded: 2,
        prompt_tps: 2000.0,
        decode_tps: 40.0,
        load_ms: 1500,
        output_tokens: 24,
        ..SimConfig::default()
    };
    config.api.drain_timeout = Duration::from_secs(5);
    // A throwaway identity, and no LAN discovery: the demo must not join
    // (or be joined by) anything else on the network.
    config.mesh.data_dir = Some(std::env::temp_dir().join(format!("llmesh-demo-{}", std::process::id())));
    config.mesh.mdns = false;
    config.mesh.listen = Some("/ip4/127.0.0.1/tcp/0".into());
    if let Some(base) = args.port_base {
        config.api.listen.set_port(base);
    }
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    config
}

/// What the demo prints once it listens.
pub fn banner(addr: SocketAddr) -> String {
    let base = format!("http://{addr}");
    format!(
        "llmesh demo is running: one agent over a simulated Ollama (no GPU or Ollama needed)\n\
         \n  OpenAI API:  {base}/v1      Ollama API: OLLAMA_HOST={addr}\n\
         \n  models:      qwen2.5:7b (warm), llama3.2:3b (cold: first request loads it), nomic-embed-text\n\
         \nTry it:\n\
         \n  curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"qwen2.5:7b\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n\
         \nPress Ctrl-C to stop.\n"
    )
}
