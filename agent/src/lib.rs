//! The llmesh agent: the node's edges. Config, the HTTP API, policy (keys,
//! limits, metering), backends (Ollama, OpenAI-compatible) and the cloud
//! client; [`app`] composes them with the mesh. Decisions about *where* a
//! request runs live in `llmesh-mesh`. The `llmesh` binary adds the command
//! line (its `cli` module), including `demo` and `sim-backend`, the only
//! places that use the simulator.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod backend;
pub mod cloud;
pub mod config;
pub mod entry_figures;
pub mod error;
pub mod gpu;
pub mod http_server;
pub mod inventory;
pub mod limits;
pub mod load;
pub mod local;
pub mod metrics;
pub mod node_state;
pub mod preload;
pub mod service_manager;
pub mod stall;
pub mod telemetry;
pub mod usage;
