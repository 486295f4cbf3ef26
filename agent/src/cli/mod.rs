//! The `llmesh` command line: flags ([`args`]), `init` and `status`
//! ([`status`]), the admin commands ([`admin`]), and the two commands that
//! run the simulator: `demo` ([`demo`]) and `sim-backend` ([`sim`]), which
//! also backs `llmesh agent --backend-kind sim`. The simulator is used here
//! and nowhere in the agent library.

pub mod admin;
pub mod args;
pub mod demo;
pub mod docs;
pub mod models;
pub mod sim;
pub mod status;
