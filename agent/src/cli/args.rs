//! Command-line interface. Flags override `LLMESH_*` environment variables,
//! which override the TOML file, which overrides built-in defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};

use llmesh::config::{BackendKind, LogFormat};
use llmesh_sim::SimConfig;

/// llmesh: one inference endpoint over a fleet of GPU boxes running Ollama.
#[derive(Debug, Parser)]
#[command(name = "llmesh", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent beside an Ollama (or OpenAI-compatible) backend.
    Agent(Box<AgentArgs>),
    /// Run a simulated Ollama (for tests, benchmarks and demos).
    SimBackend(SimBackendArgs),
    /// Start a local setup on simulated backends; no GPU or Ollama needed.
    Demo(DemoArgs),
    /// Create this node's cluster secret (if missing) and print the join token.
    Init(InitArgs),
    /// Print a shell completion script (for packages and dotfiles).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a directory.
    Man {
        /// Where to write `llmesh.1`, `llmesh-agent.1`, …; stdout when absent.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Show the mesh as a node sees it: nodes, liveness, models, load, Raft.
    Status(StatusArgs),
    /// Manage client API keys (needs the admin token).
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: KeysCommand,
        /// Which node and credential.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Manage model routes (aliases), e.g. `fast` → `qwen2.5:7b`.
    Route {
        /// What to do.
        #[command(subcommand)]
        command: RouteCommand,
        /// Which node and credential.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drain, undrain, remove or revoke a node (by name or id).
    Node {
        /// What to do.
        #[command(subcommand)]
        command: NodeCommand,
        /// Which node and credential.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Pull models onto nodes, or remove them, through any node.
    Models {
        /// What to do.
        #[command(subcommand)]
        command: ModelsCommand,
        /// Which node to ask, and the API key.
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage the join token.
    Token {
        /// What to do.
        #[command(subcommand)]
        command: TokenCommand,
        /// Which node and credential.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `llmesh token …`
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Replace the join key and print the new join token: tokens printed
    /// before no longer admit new nodes (nodes already in keep running).
    Rotate,
    /// Set the bootstrap addresses every join token carries (`IP:PORT` of
    /// a node's libp2p port, or a multiaddr), then print the token.
    Bootstrap {
        /// The addresses (none: tokens carry none).
        addrs: Vec<String>,
    },
}

/// How admin commands reach the mesh.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Any node's HTTP API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:11440")]
    pub node: String,
    /// That node's control-plane address (HOST:PORT), when not the one it reports.
    #[arg(long, global = true, value_name = "ADDR")]
    pub control: Option<String>,
    /// Admin credential [default: the admin.token file in --data-dir].
    #[arg(long, global = true, env = "LLMESH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Data directory holding admin.token [default: ~/.local/share/llmesh].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Limits of an API key (0 or absent: unlimited).
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Requests per minute across the mesh.
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute across the mesh.
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Token budget per --budget-period.
    #[arg(long)]
    pub budget: Option<u64>,
    /// `day` or `month`.
    #[arg(long)]
    pub budget_period: Option<String>,
    /// Models the key may use (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Cloud fallback: never, overflow, failover, allowed [default: cloud.default_policy].
    #[arg(long)]
    pub cloud: Option<String>,
    /// Models this key sends to the cloud first (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub prefer_cloud: Vec<String>,
}

/// `llmesh keys` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints its secret once.
    Create {
        /// A name for the key (who it is for).
        #[arg(long)]
        name: String,
        /// Its limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key: every node refuses it within a second.
    Revoke {
        /// Key id (`key_…`).
        id: String,
    },
    /// Replace a key's limits.
    SetLimits {
        /// Key id (`key_…`).
        id: String,
        /// The new limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// `llmesh route` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum RouteCommand {
    /// Send requests for ALIAS to MODEL.
    Set {
        /// The name clients use.
        alias: String,
        /// The model that serves it.
        model: String,
    },
    /// List routes.
    List,
    /// Remove a route.
    Rm {
        /// The alias.
        alias: String,
    },
}

/// `llmesh node` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum NodeCommand {
    /// Give a node no new work (it still accepts and forwards requests).
    Drain {
        /// Node name or id.
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// Return a drained node to service.
    Undrain {
        /// Node name or id.
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// Take a node out of the Raft group and routing for good.
    Remove {
        /// Node name or id.
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// Shut a node out of every plane (gossip, data plane, Raft, admin)
    /// within seconds, even with its old certificate.
    Revoke {
        /// Node name or id.
        #[arg(value_name = "NODE")]
        target: String,
    },
}

const AGENT_AFTER_HELP: &str = "\
The backend's API key is read only from the file or the environment
(LLMESH_BACKEND__API_KEY), never from a flag, so it stays out of ps.

Configuration is layered: built-in defaults < TOML file (--config) <
LLMESH_* environment < flags. Every file key can be set from the
environment as LLMESH_<SECTION>__<KEY>, e.g. LLMESH_BACKEND__URL,
LLMESH_API__LISTEN, LLMESH_BACKEND__RESPONSE_TIMEOUT=60s. See
llmesh.example.toml for every key with its default, and --print-config
for the configuration as it resolves.";

/// Flags of `llmesh agent`.
#[derive(Debug, Clone, Default, Args)]
#[command(after_help = AGENT_AFTER_HELP)]
pub struct AgentArgs {
    /// TOML config file.
    #[arg(long, short = 'c', env = "LLMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP address for the API, dashboard and metrics [default: 127.0.0.1:11440].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Backend base URL [default: http://127.0.0.1:11434].
    #[arg(long)]
    pub backend: Option<String>,
    /// Backend kind [default: ollama].
    #[arg(long, value_enum)]
    pub backend_kind: Option<BackendKind>,
    /// Put HTTP on N, libp2p on N+1 and QUIC on N+2 (gRPC N+3 to come), so many agents can share a host.
    #[arg(long, value_name = "N")]
    pub port_base: Option<u16>,
    /// Node name shown in headers and logs [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// Largest request body in bytes; larger gets 413 [default: 33554432].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Wait for the backend's response head, e.g. 300s [default: 300s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub response_timeout: Option<Duration>,
    /// Longest silence between streamed chunks, e.g. 120s [default: 120s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Requests the backend runs at once (OLLAMA_NUM_PARALLEL) [default: unknown, assume 4].
    #[arg(long, value_name = "N")]
    pub parallel_slots: Option<u32>,
    /// Time to open a connection to the backend [default: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// How often the backend's models are listed [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub inventory_interval: Option<Duration>,
    /// On SIGTERM, how long in-flight requests may finish [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Largest non-streaming backend response relayed, in bytes [default: 67108864].
    #[arg(long)]
    pub max_response_bytes: Option<usize>,
    /// Directory for the node key and cluster secret [default: ~/.local/share/llmesh].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Join the cluster of this token (from `llmesh init`). Visible in `ps`:
    /// prefer --join-file or LLMESH_MESH__JOIN.
    #[arg(long, value_name = "TOKEN")]
    pub join: Option<String>,
    /// Join the cluster of the token in this file (mode 0600 is wise).
    #[arg(long, value_name = "FILE", conflicts_with = "join")]
    pub join_file: Option<PathBuf>,
    /// The IP other boxes reach this one at (shown in status, gossip and
    /// the banner) [default: the first non-loopback IPv4 when listening on
    /// every interface].
    #[arg(long, value_name = "IP")]
    pub advertise: Option<std::net::IpAddr>,
    /// A peer to contact first: IP:PORT of its libp2p port, or a multiaddr. Repeatable.
    #[arg(long, value_name = "ADDR")]
    pub bootstrap: Vec<String>,
    /// libp2p listen multiaddr [default: /ip4/0.0.0.0/tcp/<HTTP port + 1>].
    #[arg(long, value_name = "MULTIADDR")]
    pub mesh_listen: Option<String>,
    /// Data-plane (QUIC) UDP address [default: 0.0.0.0:<HTTP port + 2>].
    #[arg(long, value_name = "ADDR")]
    pub data_listen: Option<SocketAddr>,
    /// Control-plane (gRPC) TCP address [default: 0.0.0.0:<HTTP port + 3>].
    #[arg(long, value_name = "ADDR")]
    pub control_listen: Option<SocketAddr>,
    /// Raft voters to keep: 1, 3 or 5 [default: 3].
    #[arg(long, value_name = "N")]
    pub voters: Option<usize>,
    /// Do not discover peers on the LAN by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Run as a standalone gateway without joining a mesh.
    #[arg(long)]
    pub no_mesh: bool,
    /// Silence after which a peer is dead, e.g. 10s [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub dead_after: Option<Duration>,
    /// Models of the in-process simulated backend (with --backend-kind sim).
    #[arg(long, value_delimiter = ',', value_name = "SPEC")]
    pub sim_models: Option<Vec<String>>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

fn set(map: &mut Map<String, Value>, section: &str, key: &str, value: Value) {
    let entry = map.entry(section.to_string()).or_insert_with(|| json!({}));
    if let Some(object) = entry.as_object_mut() {
        object.insert(key.to_string(), value);
    }
}

fn duration(d: Duration) -> Value {
    json!(humantime::format_duration(d).to_string())
}

impl AgentArgs {
    /// The flags the user passed, shaped like [`llmesh::config::Config`].
    pub fn overrides(&self) -> Value {
        let mut map = Map::new();
        if let Some(base) = self.port_base {
            map.insert("port_base".into(), json!(base));
        }
        let text = |v: Option<&dyn std::fmt::Display>| v.map(|v| json!(v.to_string()));
        let flags: [(&str, &str, Option<Value>); 26] = [
            ("mesh", "advertise", self.advertise.map(|ip| json!(ip.to_string()))),
            ("api", "listen", self.listen.map(|l| json!(l.to_string()))),
            ("api", "max_body_bytes", self.max_body_bytes.map(|b| json!(b))),
            ("api", "max_response_bytes", self.max_response_bytes.map(|b| json!(b))),
            ("api", "drain_timeout", self.drain_timeout.map(duration)),
            ("backend", "parallel_slots", self.parallel_slots.map(|s| json!(s))),
            ("backend", "connect_timeout", self.connect_timeout.map(duration)),
            ("backend", "inventory_interval", self.inventory_interval.map(duration)),
            ("backend", "url", text(self.backend.as_ref().map(|u| u as _))),
            ("backend", "kind", self.backend_kind.map(|k| json!(k.as_str()))),
            ("backend", "response_timeout", self.response_timeout.map(duration)),
            ("backend", "idle_timeout", self.idle_timeout.map(duration)),
            ("node", "name", text(self.name.as_ref().map(|n| n as _))),
            ("mesh", "data_dir", self.data_dir.as_ref().map(|d| json!(d))),
            ("mesh", "join_file", self.join_file.as_ref().map(|p| json!(p))),
            ("mesh", "join", text(self.join.as_ref().map(|t| t as _))),
            ("mesh", "bootstrap", (!self.bootstrap.is_empty()).then(|| json!(self.bootstrap))),
            ("mesh", "listen", text(self.mesh_listen.as_ref().map(|l| l as _))),
            ("mesh", "data_listen", self.data_listen.map(|a| json!(a.to_string()))),
            ("mesh", "control_listen", self.control_listen.map(|a| json!(a.to_string()))),
            ("mesh", "voters", self.voters.map(|v| json!(v))),
            ("mesh", "mdns", self.no_mdns.then_some(Value::Bool(false))),
            ("mesh", "enabled", self.no_mesh.then_some(Value::Bool(false))),
            ("mesh", "dead_after", self.dead_after.map(duration)),
            ("sim", "models", self.sim_models.as_ref().map(|m| json!(m))),
            ("log", "format", self.log_format.map(|f| json!(f))),
        ];
        for (section, key, value) in flags {
            if let Some(value) = value {
                set(&mut map, section, key, value);
            }
        }
        Value::Object(map)
    }
}

/// Flags of `llmesh sim-backend`.
#[derive(Debug, Clone, Args)]
pub struct SimBackendArgs {
    /// Address to listen on (Ollama's default, so an agent with no flags finds it).
    #[arg(long, default_value = "127.0.0.1:11434")]
    pub listen: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The simulated backend.
    #[command(flatten)]
    pub sim: SimConfig,
}

/// Flags of `llmesh demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// HTTP address of the demo's agent [default: 127.0.0.1:11440].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Put the demo's ports at N.
    #[arg(long, value_name = "N")]
    pub port_base: Option<u16>,
}

/// Flags of `llmesh init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Data directory of this node [default: ~/.local/share/llmesh].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address (IP:PORT or multiaddr) of this node's libp2p port to put in
    /// the token, so joining nodes know where to start. Repeatable.
    #[arg(long, value_name = "ADDR")]
    pub bootstrap: Vec<String>,
}

/// `llmesh models …`
#[derive(Debug, Clone, Subcommand)]
pub enum ModelsCommand {
    /// Pull MODEL: where it is already (an update), else onto the node
    /// with the most free GPU memory; progress is shown as it downloads.
    Pull {
        /// The model, as Ollama names it (`qwen2.5:7b`).
        model: String,
        /// Pull onto these nodes (names or ids; repeatable).
        #[arg(long = "node", value_name = "NODE", conflicts_with = "replicas")]
        nodes: Vec<String>,
        /// Make sure this many nodes hold the model.
        #[arg(long, value_name = "K")]
        replicas: Option<usize>,
    },
    /// Remove MODEL from the named nodes (or, without --node, from every
    /// node that holds it).
    Rm {
        /// The model.
        model: String,
        /// Remove it from these nodes only (names or ids; repeatable).
        #[arg(long = "node", value_name = "NODE")]
        nodes: Vec<String>,
    },
}

/// Which node's HTTP API a client command talks to.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Any node's HTTP API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:11440", env = "LLMESH_URL")]
    pub url: String,
    /// An API key, when the mesh has keys.
    #[arg(long, global = true, env = "LLMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Flags of `llmesh status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Any node's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:11440")]
    pub node: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn only_passed_flags_override() {
        let cli = Cli::parse_from(["llmesh", "agent", "--backend", "http://h:1", "--idle-timeout", "3s"]);
        let Command::Agent(args) = cli.command else { panic!("agent subcommand") };
        let args = *args;
        assert_eq!(args.overrides(), json!({ "backend": { "url": "http://h:1", "idle_timeout": "3s" } }));
    }
}
