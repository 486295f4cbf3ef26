//! The llmesh agent: the node's edges. Config, CLI, the HTTP API, backends
//! (Ollama, OpenAI-compatible, simulated) and the demo. Decisions about
//! *where* a request runs live in `llmesh-mesh`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_cli;
pub mod api;
pub mod backend;
pub mod cli;
pub mod cloud;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod error;
pub mod gpu;
pub mod http_server;
pub mod inventory;
pub mod limits;
pub mod load;
pub mod local;
pub mod metrics;
pub mod node_state;
pub mod placement;
pub mod serve;
pub mod sim;
pub mod telemetry;
pub mod usage;
