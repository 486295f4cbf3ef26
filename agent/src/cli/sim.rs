//! The simulator at the binary's edge: `llmesh sim-backend`, and
//! `backend.kind = "sim"`, which starts a simulated Ollama on a loopback
//! port beside the agent and points the agent's backend at it. The agent
//! then talks to it over HTTP exactly as to a real Ollama.

use std::net::SocketAddr;

use llmesh::app::{self, Ready, RunError};
use llmesh::config::{BackendKind, Config, SimSection};
use llmesh_sim::SimConfig;
use tokio_util::sync::CancellationToken;

/// The `[sim]` section for `config` (the demo's nodes).
pub fn section(config: &SimConfig) -> SimSection {
    match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(map)) => SimSection(map),
        _ => SimSection::default(),
    }
}

/// The simulator's settings from the `[sim]` section, over its defaults.
pub fn parse(section: &SimSection) -> Result<SimConfig, String> {
    let mut value = serde_json::to_value(SimConfig::default()).map_err(|e| e.to_string())?;
    if let Some(defaults) = value.as_object_mut() {
        defaults.extend(section.0.clone());
    }
    let config: SimConfig = serde_json::from_value(value).map_err(|e| format!("invalid [sim] section: {e}"))?;
    config.parsed_models()?;
    Ok(config)
}

/// Runs `llmesh sim-backend` until `shutdown`.
pub async fn run_backend(
    listen: SocketAddr,
    config: SimConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RunError> {
    let listener = app::bind(listen).await?;
    let server = llmesh_sim::spawn(listener, config, shutdown).map_err(RunError::Backend)?;
    on_ready(server.addr);
    server.task.await.map_err(|e| RunError::Backend(e.to_string()))?.map_err(RunError::Serve)
}

/// Runs the agent; with `backend.kind = "sim"` a simulated Ollama from the
/// `[sim]` section starts first on loopback and stops after the agent.
pub async fn run_agent(
    mut config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), RunError> {
    if config.backend.kind != BackendKind::Sim {
        return app::run_agent(config, shutdown, on_ready).await;
    }
    let sim = parse(&config.sim).map_err(RunError::Backend)?;
    let slots = sim.slots;
    let listener = app::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let stop_sim = CancellationToken::new();
    let server = llmesh_sim::spawn(listener, sim, stop_sim.clone()).map_err(RunError::Backend)?;
    config.backend.url = format!("http://{}", server.addr);
    if config.backend.parallel_slots == 0 {
        config.backend.parallel_slots = slots;
    }
    let result = app::run_agent(config, shutdown, on_ready).await;
    stop_sim.cancel();
    let _ = server.task.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configs_sim_section_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../llmesh.example.toml");
        let config = Config::load(Some(&path), serde_json::json!({})).expect("example config is valid");
        let sim = parse(&config.sim).expect("sim section is valid");
        assert_eq!(sim.models, SimConfig::default().models);
        assert!(parse(&SimSection::default()).is_ok());
        let mut bad = SimSection::default();
        bad.0.insert("slots".into(), serde_json::json!("many"));
        assert!(parse(&bad).is_err());
    }
}
