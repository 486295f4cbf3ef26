//! A mesh of real agents on namespaced hosts: host `i` runs a sim backend
//! on its own loopback and an agent in front of it whose mesh, data and
//! control planes use the cluster network (`10.77.0.<i+1>`) and whose API
//! listens everywhere, so clients on the front network (`10.78.0.<i+1>`)
//! reach it even while its cluster link is cut.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::accounting::Downtime;
use super::load::Entries;
use crate::netns::Lan;
use crate::{Proc, binary, data_dir, join_token, join_token_with};

/// HTTP port of every agent; mesh, data and control planes follow.
const API_PORT: u16 = 11440;
/// The model the load asks for: on even hosts only.
pub const MODEL: &str = "qwen2.5:7b";
const MODELS_HERE: &str = "qwen2.5:7b,llama3.2:3b";
const MODEL_ELSEWHERE: &str = "llama3.2:3b";

/// How the hosts' processes run.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Flags of every sim backend.
    pub sim_args: Vec<String>,
    /// `LLMESH_*` settings of every agent.
    pub agent_env: Vec<(String, String)>,
    /// Silence after which a peer is out of routing.
    pub dead_after: String,
    /// Another `llmesh` build (the previous release) that every host runs
    /// until [`Fleet::upgrade`] moves it to this build: a mixed-version
    /// mesh, upgraded one node at a time.
    pub previous: Option<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            sim_args: ["--slots", "4", "--decode-tps", "400"].map(String::from).to_vec(),
            agent_env: vec![
                // What a hung backend is: no response head within 8 s, or
                // 4 s of silence mid-stream (the defaults, 300 s and 120 s,
                // suit Ollama loading big models, not a drill).
                ("LLMESH_BACKEND__RESPONSE_TIMEOUT".into(), "8s".into()),
                ("LLMESH_BACKEND__IDLE_TIMEOUT".into(), "4s".into()),
                ("LLMESH_BACKEND__INVENTORY_INTERVAL".into(), "1s".into()),
            ],
            dead_after: "3s".into(),
            previous: None,
        }
    }
}

/// One host's processes.
struct Host {
    dir: PathBuf,
    sim: Option<Proc>,
    agent: Option<Proc>,
    stopped_sim: bool,
    /// Runs this build (not [`FleetConfig::previous`]).
    upgraded: bool,
}

/// The hosts, their processes, and when each agent was down.
pub struct Fleet<'lan> {
    lan: &'lan Lan,
    config: FleetConfig,
    seed: PathBuf,
    token: String,
    hosts: Vec<Host>,
    /// Hosts clients send to (those started at least once).
    pub entries: Entries,
    /// When each agent was down.
    pub downtime: Arc<Mutex<Downtime>>,
    http: reqwest::Client,
}

/// Whether host `i`'s backend has [`MODEL`] (even hosts do).
pub fn serves_model(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// Name of the agent on host `i`.
pub fn node_name(i: usize) -> String {
    format!("chaos-{i}")
}

impl<'lan> Fleet<'lan> {
    /// A fleet over every host of `lan` (nothing started yet). The calling
    /// thread must be in the switch namespace ([`Lan::enter_switch`]).
    pub fn new(lan: &'lan Lan, config: FleetConfig) -> Fleet<'lan> {
        let seed = data_dir();
        // The cluster is created by the build the hosts start with.
        let token = match &config.previous {
            Some(previous) => join_token_with(previous, &seed),
            None => join_token(&seed),
        };
        let hosts = (0..lan.len())
            .map(|i| Host {
                dir: if i == 0 { seed.clone() } else { data_dir() },
                sim: None,
                agent: None,
                stopped_sim: false,
                upgraded: false,
            })
            .collect();
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        Fleet {
            lan,
            config,
            seed,
            token,
            hosts,
            entries: Arc::new(RwLock::new(Vec::new())),
            downtime: Arc::default(),
            http,
        }
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Base URL of host `i`'s agent on the front network.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}:{API_PORT}", self.lan.front_addr(i))
    }

    /// Whether host `i`'s agent runs.
    pub fn is_up(&self, i: usize) -> bool {
        self.hosts[i].agent.is_some()
    }

    /// Hosts whose agent runs.
    pub fn up(&self) -> Vec<usize> {
        (0..self.len()).filter(|i| self.is_up(*i)).collect()
    }

    /// Starts host `i`'s sim (unless it runs) and agent, and makes it an
    /// entry for clients.
    pub async fn start(&mut self, i: usize) {
        let host_ns = self.lan.host(i).to_string();
        if self.hosts[i].sim.is_none() {
            // Odd hosts lack the model the load asks for, so every request
            // they take crosses the data plane to an even host.
            let models = if serves_model(i) { MODELS_HERE } else { MODEL_ELSEWHERE };
            let mut args = vec!["sim-backend", "--listen", "127.0.0.1:11434", "--models", models];
            args.extend(self.config.sim_args.iter().map(String::as_str));
            self.hosts[i].sim = Some(Proc::start_in_netns(&host_ns, &args).await);
        }
        let ip = self.lan.addr(i);
        let name = node_name(i);
        let dir = self.hosts[i].dir.to_str().expect("utf-8 temp path").to_string();
        let listen = format!("0.0.0.0:{API_PORT}");
        let mesh = format!("/ip4/{ip}/tcp/{}", API_PORT + 1);
        let data = format!("{ip}:{}", API_PORT + 2);
        let control = format!("{ip}:{}", API_PORT + 3);
        let mut args = vec![
            "agent",
            "--backend",
            "http://127.0.0.1:11434",
            "--listen",
            &listen,
            "--mesh-listen",
            &mesh,
            "--data-listen",
            &data,
            "--control-listen",
            &control,
            "--data-dir",
            &dir,
            "--name",
            &name,
            "--join",
            &self.token,
            "--no-mdns",
            "--dead-after",
            &self.config.dead_after,
        ];
        // Every node knows two others to start from, so any of them can
        // restart while another is down.
        let boots: Vec<String> = (0..self.len().min(3))
            .filter(|b| *b != i)
            .map(|b| format!("{}:{}", self.lan.addr(b), API_PORT + 1))
            .collect();
        for boot in &boots {
            args.extend_from_slice(&["--bootstrap", boot]);
        }
        let env: Vec<(&str, &str)> = self.config.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let program = match &self.config.previous {
            Some(previous) if !self.hosts[i].upgraded => previous.clone(),
            _ => binary(),
        };
        let agent = Proc::start_program(&program, Some(&host_ns), &args, &env).await;
        self.hosts[i].agent = Some(agent);
        self.downtime.lock().unwrap_or_else(PoisonError::into_inner).up(i);
        let url = self.url(i);
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if !entries.iter().any(|(host, _)| *host == i) {
            entries.push((i, url));
        }
    }

    /// SIGKILLs host `i`'s agent and sim: the box dies.
    pub async fn kill(&mut self, i: usize) {
        self.downtime.lock().unwrap_or_else(PoisonError::into_inner).down(i);
        let host = &mut self.hosts[i];
        if let Some(mut agent) = host.agent.take() {
            agent.kill().await;
        }
        if let Some(mut sim) = host.sim.take() {
            if host.stopped_sim {
                sim.freeze(false);
                host.stopped_sim = false;
            }
            sim.kill().await;
        }
    }

    /// From now on host `i`'s agent starts with this build.
    pub fn upgrade(&mut self, i: usize) {
        self.hosts[i].upgraded = true;
    }

    /// Whether hosts start with another build until upgraded.
    pub fn mixed_versions(&self) -> bool {
        self.config.previous.is_some()
    }

    /// SIGTERMs host `i`'s agent (it drains and exits); returns whether it
    /// exited cleanly. The sim keeps running, as Ollama would.
    pub async fn stop(&mut self, i: usize) -> bool {
        self.downtime.lock().unwrap_or_else(PoisonError::into_inner).down(i);
        match self.hosts[i].agent.take() {
            Some(mut agent) => match agent.terminate_why().await {
                Ok(()) => true,
                Err(why) => {
                    // The drill's verdict only counts; the log says why.
                    let logs = agent.logs();
                    let tail: Vec<&str> = logs.lines().rev().take(40).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    eprintln!("chaos: {} {why}; the end of its log:\n{}", node_name(i), tail.join("\n"));
                    false
                }
            },
            None => true,
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) host `i`'s sim: a backend that
    /// hangs accepts connections (the kernel does) and never answers.
    pub fn hang_backend(&mut self, i: usize, hang: bool) {
        let host = &mut self.hosts[i];
        if let Some(sim) = &host.sim {
            sim.freeze(hang);
            host.stopped_sim = hang;
        }
    }

    /// Cuts host `i` off the cluster network, or heals it.
    pub fn partition(&self, i: usize, cut: bool) -> Result<(), String> {
        if cut { self.lan.partition(i) } else { self.lan.heal(i) }
    }

    /// Process ids of the running agents, by host.
    pub fn agent_pids(&self) -> Vec<(usize, u32)> {
        self.hosts.iter().enumerate().filter_map(|(i, h)| h.agent.as_ref()?.pid().map(|p| (i, p))).collect()
    }

    /// Log of host `i`'s agent so far.
    pub fn logs(&self, i: usize) -> String {
        self.hosts[i].agent.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// `GET path` on host `i`'s agent.
    pub async fn get(&self, i: usize, path: &str) -> Option<Value> {
        let response = self.http.get(format!("{}{path}", self.url(i))).send().await.ok()?;
        response.json().await.ok()
    }

    /// Host `i`'s view of the Raft group and replicated state.
    pub async fn cluster(&self, i: usize) -> Option<Value> {
        self.get(i, "/mesh/v1/cluster").await.filter(|c| c["enabled"] == true)
    }

    /// The host whose agent leads, as every running agent agrees.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        for i in self.up() {
            let name = self.cluster(i).await?["leader"]["name"].as_str()?.to_string();
            let host = (0..self.len()).find(|h| node_name(*h) == name)?;
            if leader.is_some_and(|l| l != host) {
                return None;
            }
            leader = Some(host);
        }
        leader
    }

    /// Waits until every running agent agrees on one leader and sees every
    /// other running agent alive in gossip.
    pub async fn settle(&self, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        loop {
            let up = self.up();
            if let Some(leader) = self.leader().await {
                let mut all_seen = true;
                for i in &up {
                    let Some(nodes) = self.get(*i, "/mesh/v1/nodes").await else {
                        all_seen = false;
                        break;
                    };
                    let alive = nodes["nodes"]
                        .as_array()
                        .map(|n| n.iter().filter(|n| n["liveness"] == "alive" || n["self"] == true).count())
                        .unwrap_or(0);
                    all_seen &= alive >= up.len();
                }
                if all_seen {
                    return Ok(leader);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the mesh did not settle within {within:?} (hosts up: {up:?}); views: {}",
                    self.views().await
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Each running agent's leader and the nodes it does not see alive,
    /// for a failed [`Fleet::settle`].
    async fn views(&self) -> String {
        let mut views = Vec::new();
        for i in self.up() {
            let leader = match self.cluster(i).await {
                Some(cluster) => cluster["leader"]["name"].as_str().unwrap_or("none").to_string(),
                None => "unreachable".into(),
            };
            let not_alive: Vec<String> = match self.get(i, "/mesh/v1/nodes").await {
                Some(nodes) => nodes["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["liveness"] != "alive" && n["self"] != true)
                    .map(|n| format!("{} {}", n["name"].as_str().unwrap_or("?"), n["liveness"]))
                    .collect(),
                None => vec!["no node list".into()],
            };
            views.push(format!("{}: leader {leader}, not alive {not_alive:?}", node_name(i)));
        }
        views.join("; ")
    }

    /// Runs `llmesh ARGS --node <host i> --data-dir <seed> --json` inside
    /// host `i` (the admin CLI talks to the control plane, which is on the
    /// cluster network).
    pub fn admin(&self, i: usize, args: &[&str]) -> Result<Value, String> {
        let node = format!("http://{}:{API_PORT}", self.lan.addr(i));
        let mut all = args.to_vec();
        all.extend_from_slice(&["--node", &node, "--json", "--data-dir", self.seed.to_str().expect("utf-8")]);
        let out = self.lan.exec(i, &binary(), &all)?;
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    /// Stops every process (SIGKILL; a test that wants graceful exits
    /// calls [`Fleet::stop`] first).
    pub async fn shutdown(&mut self) {
        for i in 0..self.len() {
            self.kill(i).await;
        }
    }
}
