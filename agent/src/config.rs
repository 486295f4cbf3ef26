//! Agent configuration: built-in defaults < TOML file < `LLMESH_*`
//! environment < command-line flags. Each part of the agent owns a section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use llmesh_mesh::config::{MeshConfig, parse_peer_addr};
pub use llmesh_mesh::route::CloudPolicyName;

/// First port of the default block: HTTP on it, libp2p, QUIC and gRPC on
/// the next three. Next to Ollama's 11434 so it is easy to remember.
pub const DEFAULT_PORT_BASE: u16 = 11440;

/// Default Ollama address.
pub const DEFAULT_BACKEND_URL: &str = "http://127.0.0.1:11434";

/// Config sections that `LLMESH_<SECTION>__<KEY>` environment variables may set.
const ENV_SECTIONS: &[&str] = &["node", "api", "backend", "mesh", "cloud", "sim", "log", "telemetry", "port_base"];

/// What serves requests on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Ollama: native `/api/*` and its OpenAI-compatible `/v1/*`.
    Ollama,
    /// Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, ...).
    Openai,
    /// The simulated Ollama (tests and demos): the `llmesh` binary starts
    /// one on loopback and the agent talks to it as to Ollama.
    Sim,
    /// No backend: a pure entry node that forwards every request to the
    /// mesh (run one beside a client, or several behind a load balancer).
    None,
}

impl BackendKind {
    /// The name used in config files and gossip.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Ollama => "ollama",
            BackendKind::Openai => "openai",
            BackendKind::Sim => "sim",
            BackendKind::None => "none",
        }
    }
}

/// Top-level agent configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// When set, HTTP listens on this port (the IP of `api.listen` is
    /// kept); later planes take the next ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_base: Option<u16>,
    /// This node.
    pub node: NodeConfig,
    /// The HTTP API.
    pub api: ApiConfig,
    /// The inference backend beside this agent.
    pub backend: BackendConfig,
    /// Membership in the mesh.
    pub mesh: MeshConfig,
    /// Cloud aggregators for requests the mesh cannot serve.
    pub cloud: CloudConfig,
    /// Settings of the simulated backend, used when `backend.kind = "sim"`.
    pub sim: SimSection,
    /// Logging.
    pub log: LogConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
}

/// The `[sim]` section, kept as written: the agent does not know the
/// simulator. The `llmesh` binary reads it when `backend.kind = "sim"`,
/// starts a simulated Ollama on loopback and points the backend at it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SimSection(pub serde_json::Map<String, serde_json::Value>);

/// Cloud aggregators (OpenRouter, LiteLLM, any OpenAI-compatible URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// Providers, tried in this order.
    pub providers: Vec<ProviderConfig>,
    /// Policy of requests without an API key, or whose key sets none.
    pub default_policy: CloudPolicyName,
    /// Overflow to the cloud when the expected wait in the mesh is longer.
    #[serde(with = "humantime_serde")]
    pub overflow_after: Duration,
    /// Attempts per provider before the next one (only before the first byte).
    pub attempts: u32,
    /// First retry delay; doubles each retry.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Consecutive failures that open a provider's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before letting one probe through.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            providers: Vec::new(),
            default_policy: CloudPolicyName::Allowed,
            overflow_after: Duration::from_secs(10),
            attempts: 2,
            retry_backoff: Duration::from_millis(200),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// One OpenAI-compatible aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name in `x-llmesh-route: cloud:<name>`, metrics and `/v1/models`.
    pub name: String,
    /// Base URL, with or without the trailing `/v1`.
    pub base_url: String,
    /// Environment variable holding the API key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File holding the API key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Extra headers (OpenRouter's `HTTP-Referer` and `X-Title`).
    pub headers: BTreeMap<String, String>,
    /// TCP and TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the response head.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Mesh model name → this provider's model id; only these go here.
    pub models: BTreeMap<String, String>,
    /// Prices per mesh model, for spend.
    pub prices: BTreeMap<String, Price>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            name: String::new(),
            base_url: String::new(),
            api_key_env: None,
            api_key_file: None,
            headers: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            models: BTreeMap::new(),
            prices: BTreeMap::new(),
        }
    }
}

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    /// Per million prompt tokens.
    pub input_per_mtok: f64,
    /// Per million completion tokens.
    pub output_per_mtok: f64,
}

/// Identity of this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Human-readable node name, shown in headers, status and logs.
    pub name: String,
}

/// The client-facing HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP API (API, dashboard, metrics).
    pub listen: SocketAddr,
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Largest non-streaming backend response relayed; larger gets 502.
    pub max_response_bytes: usize,
    /// Most client connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// Threads that client connections run on, each with a runtime of its
    /// own; unset: one per CPU core, at most 8; 0: on the main runtime
    /// (see [`ApiConfig::connection_threads`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_threads: Option<usize>,
    /// Time a client has to send its whole request body; slower gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// How long a shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Who may call the API without an API key.
    pub anonymous: AnonymousAccess,
    /// Resume a streamed chat completion that breaks after its first token
    /// on another node (clients opt out with `x-llmesh-resume: off`).
    pub resume_streams: bool,
    /// Whether the dashboard (`/`), `/metrics` and `/mesh/v1/*` answer
    /// anyone who reaches the port (true), or only this machine and
    /// holders of an API key (false).
    pub public_status: bool,
}

/// Who may call the client API without an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AnonymousAccess {
    /// Clients on this machine, until the cluster's first API key exists.
    Loopback,
    /// Any client, until the cluster's first API key exists.
    Any,
    /// Any client, always (keys then only add limits and policy).
    Always,
    /// Nobody: every request needs a key.
    Never,
}

/// The backend this agent serves from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Which kind of backend.
    pub kind: BackendKind,
    /// Base URL (ignored for `sim`).
    pub url: String,
    /// Bearer token for OpenAI-compatible backends that want one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Time allowed to open a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed until the response head; Ollama sends it only after
    /// loading the model (and, when not streaming, after generating).
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest silence allowed between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How often the model inventory is polled.
    #[serde(with = "humantime_serde")]
    pub inventory_interval: Duration,
    /// Silence (no response head, or no next chunk) after which the backend
    /// is probed; if it does not answer the probe it has stalled: the
    /// request fails over, or its stream ends with an error. 0s: off.
    #[serde(with = "humantime_serde")]
    pub stall_probe_after: Duration,
    /// How long that probe may take.
    #[serde(with = "humantime_serde")]
    pub stall_probe_timeout: Duration,
    /// Requests the backend runs at once (Ollama's OLLAMA_NUM_PARALLEL);
    /// more wait in the mesh queue instead of the backend's. 0: unknown,
    /// assume 4 (the simulated backend reports its own).
    pub parallel_slots: u32,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// tracing filter directives, e.g. `info,llmesh=debug` (RUST_LOG wins).
    pub filter: String,
}

/// OpenTelemetry traces: spans for a request's entry, scheduling decision,
/// forward hop and backend call, with its request id, exported over OTLP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (protobuf), e.g.
    /// `http://collector:4318`; spans go to `<url>/v1/traces`. Unset: no
    /// traces are kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let name = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "llmesh-node".to_string());
        NodeConfig { name }
    }
}

impl ApiConfig {
    /// The connection threads to start: as configured, else one per CPU
    /// core up to 8 (more would only share the cores the mesh and the
    /// backend need too).
    pub fn connection_threads(&self) -> usize {
        self.http_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(8))
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT_BASE)),
            max_body_bytes: 32 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            max_connections: 4096,
            http_threads: None,
            body_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            anonymous: AnonymousAccess::Loopback,
            resume_streams: true,
            public_status: true,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Ollama,
            url: DEFAULT_BACKEND_URL.to_string(),
            api_key: None,
            connect_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            inventory_interval: Duration::from_secs(2),
            stall_probe_after: Duration::from_secs(1),
            stall_probe_timeout: Duration::from_secs(1),
            parallel_slots: 0,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, filter: "info".to_string() }
    }
}

impl BackendConfig {
    /// The backend's parallel slots as configured (0: unknown).
    pub fn slots(&self) -> u32 {
        self.parallel_slots
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The named config file does not exist.
    #[error("config file {0} not found")]
    MissingFile(String),
    /// A source had a bad value or an unknown key.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// The values parse but do not make sense together.
    #[error("invalid configuration: {0}")]
    Inconsistent(String),
}

impl Config {
    /// Loads the layered configuration. `overrides` holds the flags the user
    /// actually passed, as a nested JSON object mirroring this struct.
    pub fn load(file: Option<&Path>, overrides: serde_json::Value) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = Env::prefixed("LLMESH_")
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                ENV_SECTIONS.iter().any(|s| key.starts_with(s))
            })
            .split("__");
        figment = figment.merge(env).merge(Serialized::defaults(overrides));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.resolve()?;
        Ok(config)
    }

    /// Takes the join token from `mesh.join_file`. A missing file is fine
    /// on a box that already belongs to a cluster (a package's unit names
    /// the file on every box, the first one included); on a fresh box it
    /// says how to go on.
    fn read_join_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.mesh.join_file.clone().filter(|_| self.mesh.join.is_none()) else { return Ok(()) };
        let token = match std::fs::read_to_string(&path) {
            Ok(token) => token,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let dir = self.mesh.data_dir();
                if matches!(llmesh_mesh::ClusterSecret::load(&dir), Ok(Some(_))) {
                    return Ok(());
                }
                return Err(ConfigError::Inconsistent(format!(
                    "no join token at {} (mesh.join_file) and no cluster in {}: put the token `llmesh init` printed on a member there, or run `llmesh init --data-dir {}` to make this the first box",
                    path.display(),
                    dir.display(),
                    dir.display()
                )));
            }
            Err(err) => {
                return Err(ConfigError::Inconsistent(format!(
                    "mesh.join_file {}: {err} (it should hold the token `llmesh init` prints)",
                    path.display()
                )));
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(ConfigError::Inconsistent(format!("mesh.join_file {} is empty", path.display())));
        }
        self.mesh.join = Some(token.to_string());
        Ok(())
    }

    /// Applies derived values and checks consistency.
    fn resolve(&mut self) -> Result<(), ConfigError> {
        if let Some(base) = self.port_base {
            if base > u16::MAX - 3 {
                return Err(ConfigError::Inconsistent(format!(
                    "port_base {base} leaves no room for the next three ports"
                )));
            }
            self.api.listen.set_port(base);
        }
        if self.backend.kind != BackendKind::Sim {
            let url = &self.backend.url;
            let parsed = url
                .parse::<http::Uri>()
                .map_err(|e| ConfigError::Inconsistent(format!("backend.url '{url}' is not a URL: {e}")))?;
            if parsed.scheme_str() != Some("http") || parsed.host().is_none() {
                return Err(ConfigError::Inconsistent(format!(
                    "backend.url '{url}' must be an http:// URL with a host (the backend runs beside the agent)"
                )));
            }
        }
        if self.node.name.trim().is_empty() {
            return Err(ConfigError::Inconsistent("node.name must not be empty".into()));
        }
        self.read_join_file()?;
        let mut names = std::collections::HashSet::new();
        for provider in &self.cloud.providers {
            if provider.name.is_empty() || !names.insert(provider.name.as_str()) {
                return Err(ConfigError::Inconsistent(format!(
                    "every cloud provider needs a unique name (got '{}')",
                    provider.name
                )));
            }
            if !(provider.base_url.starts_with("http://") || provider.base_url.starts_with("https://")) {
                return Err(ConfigError::Inconsistent(format!(
                    "cloud provider {}: base_url '{}' must start with https:// or http://",
                    provider.name, provider.base_url
                )));
            }
            if provider.models.is_empty() {
                return Err(ConfigError::Inconsistent(format!(
                    "cloud provider {} maps no models: add [cloud.providers.models] \"mesh-model\" = \"provider-model-id\"",
                    provider.name
                )));
            }
        }
        Ok(())
    }

    /// The config rendered as TOML (for `--print-config`); secrets masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.backend.api_key.is_some() {
            shown.backend.api_key = Some("<set>".into());
        }
        if shown.mesh.join.is_some() {
            shown.mesh.join = Some("<set>".into());
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load(None, json!({})).expect("defaults load");
        assert_eq!(config.backend.kind, BackendKind::Ollama);
        assert_eq!(config.backend.url, DEFAULT_BACKEND_URL);
        assert_eq!(config.api.listen.port(), DEFAULT_PORT_BASE);
    }

    #[test]
    fn file_then_flags_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("llmesh.toml");
        std::fs::write(
            &path,
            "[backend]\nkind = \"openai\"\nurl = \"http://10.0.0.5:8080\"\nresponse_timeout = \"5s\"\n[api]\nlisten = \"0.0.0.0:9000\"\n",
        )
        .expect("write");
        let config = Config::load(Some(&path), json!({ "backend": { "url": "http://127.0.0.1:1" } })).expect("loads");
        assert_eq!(config.backend.kind, BackendKind::Openai);
        assert_eq!(config.backend.url, "http://127.0.0.1:1");
        assert_eq!(config.backend.response_timeout, Duration::from_secs(5));
        assert_eq!(config.api.listen.port(), 9000);
    }

    #[test]
    fn port_base_sets_the_http_port() {
        let config = Config::load(None, json!({ "port_base": 20000 })).expect("loads");
        assert_eq!(config.api.listen.port(), 20000);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[backend]\nurll = \"x\"\n").expect("write");
        let err = Config::load(Some(&path), json!({})).expect_err("typo rejected");
        assert!(err.to_string().contains("urll"), "{err}");
        assert!(Config::load(None, json!({ "backend": { "url": "not a url" } })).is_err());
        assert!(matches!(
            Config::load(Some(Path::new("/nonexistent.toml")), json!({})),
            Err(ConfigError::MissingFile(_))
        ));
    }

    #[test]
    fn peer_addresses_accept_ip_port_and_multiaddrs() {
        assert_eq!(parse_peer_addr("10.0.0.5:11441").expect("ok").to_string(), "/ip4/10.0.0.5/tcp/11441");
        assert_eq!(parse_peer_addr("[::1]:7").expect("ok").to_string(), "/ip6/::1/tcp/7");
        assert!(parse_peer_addr("/ip4/1.2.3.4/tcp/5").is_ok());
        assert!(parse_peer_addr("example.com:80").is_err());
        let mesh = MeshConfig::default();
        assert_eq!(mesh.listen_addr(11440).expect("ok").to_string(), "/ip4/0.0.0.0/tcp/11441");
        assert_eq!(mesh.listen_addr(0).expect("ok").to_string(), "/ip4/0.0.0.0/tcp/0");
    }

    #[test]
    fn example_config_in_the_repo_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../llmesh.example.toml");
        let config = Config::load(Some(&path), json!({})).expect("example config is valid");
        assert_eq!(config, Config { node: config.node.clone(), sim: config.sim.clone(), ..Config::default() });
    }
}
