//! The simulated backend: an Ollama stand-in with configurable models,
//! slots, speeds, cold loads, a prefix cache and faults. It backs tests,
//! benchmarks and `llmesh demo` where no GPU is present.

pub mod config;
pub mod engine;
pub mod server;
pub mod text;

pub use config::{Faults, SimConfig, SimModel};
pub use engine::SimEngine;
pub use server::{OLLAMA_COMPAT_VERSION, router};
