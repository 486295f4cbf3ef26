//! Chaos drills on namespaced hosts: a real mesh under steady, bounded
//! load while nodes die, links break and backends hang; every request is
//! accounted for, and the replicated state is checked afterwards.
//!
//! Needs root (network namespaces). `llmesh-chaos` runs one drill or all
//! of them from the command line; `scripts/chaos.sh` builds and runs it.

pub mod accounting;
pub mod fleet;
pub mod load;
pub mod soak;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom as _;
use serde_json::Value;

use accounting::Tally;
use fleet::{Fleet, FleetConfig, node_name};
use load::{Load, LoadConfig};

use crate::netns::Lan;

/// The drills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// SIGKILL a random node (agent and backend) every few seconds and
    /// restart it a moment later.
    Kill,
    /// Cut the Raft leader off the cluster network, again and again.
    PartitionLeader,
    /// Freeze a random node's backend (SIGSTOP) for a while, then thaw it.
    HangBackend,
    /// Stop every agent (SIGTERM, then once more with SIGKILL) and start
    /// them all again.
    RestartAll,
    /// Start with three nodes and add the rest one by one.
    AddNodes,
    /// Plain load for a long time; agents' memory and descriptors must not
    /// grow.
    Soak,
    /// Long streams (200+ tokens) while nodes that serve the model are
    /// SIGKILLed: every stream whose entry stayed up must complete.
    KillMidStream,
    /// A package upgrade, one node at a time: drain it, stop it with
    /// SIGTERM, start it again on the same data directory, undrain it.
    RollingUpgrade,
}

impl Scenario {
    /// Every drill, in the order `all` runs them.
    pub const ALL: [Scenario; 8] = [
        Scenario::Kill,
        Scenario::KillMidStream,
        Scenario::PartitionLeader,
        Scenario::HangBackend,
        Scenario::RestartAll,
        Scenario::AddNodes,
        Scenario::RollingUpgrade,
        Scenario::Soak,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::PartitionLeader => "partition-leader",
            Scenario::HangBackend => "hang-backend",
            Scenario::RestartAll => "restart-all",
            Scenario::AddNodes => "add-nodes",
            Scenario::Soak => "soak",
            Scenario::KillMidStream => "kill-mid-stream",
            Scenario::RollingUpgrade => "rolling-upgrade",
        }
    }
}

/// Size and pace of a drill.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes (for add-nodes: the size it grows to).
    pub nodes: usize,
    /// How long the load runs.
    pub duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    /// Time between faults.
    pub every: Duration,
    /// How long a fault lasts (a node down, a link cut, a backend frozen).
    pub hold: Duration,
    /// Clients turn stream resuming off (`x-llmesh-resume: off`).
    pub resume_off: bool,
    /// rolling-upgrade: hosts start on this `llmesh` build (the previous
    /// release) and are upgraded to this one.
    pub from_binary: Option<std::path::PathBuf>,
}

/// What a drill found.
pub struct Report {
    /// Which drill.
    pub scenario: Scenario,
    /// What was done, in one line.
    pub summary: String,
    /// Every request's outcome.
    pub tally: Tally,
    /// Other promises: description, held, detail.
    pub checks: Vec<(String, bool, String)>,
    /// Extra tables (the soak's growth table).
    pub extra: String,
}

impl Report {
    /// Whether every promise held.
    pub fn passed(&self) -> bool {
        self.tally.holds() && self.checks.iter().all(|(_, ok, _)| *ok)
    }

    /// The accounting table and the checks.
    pub fn render(&self) -> String {
        let mut out = format!("== chaos: {} — {}\n", self.scenario.name(), self.summary);
        out.push_str(&self.tally.table());
        out.push_str(&self.extra);
        for (what, ok, detail) in &self.checks {
            let _ = writeln!(out, "  [{}] {what}{}", if *ok { "ok" } else { "FAIL" }, detail_suffix(detail));
        }
        let _ = writeln!(out, "  => {}", if self.passed() { "PASS" } else { "FAIL" });
        out
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() { String::new() } else { format!(": {detail}") }
}

/// Runs one drill on a fresh set of namespaced hosts, removed afterwards
/// whatever happens.
pub fn run(scenario: Scenario, options: &Options) -> Result<Report, String> {
    let lan = Lan::with_front(options.nodes)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // This thread (and the runtime's threads it starts) is the
                // client on the front network.
                lan.enter_switch()?;
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    tokio::select! {
                        report = drill(&lan, scenario, options) => report,
                        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
                    }
                })
            })
            .join()
            .map_err(|_| "the drill panicked".to_string())?
    })
}

async fn drill(lan: &Lan, scenario: Scenario, options: &Options) -> Result<Report, String> {
    let previous = options.from_binary.clone().filter(|_| scenario == Scenario::RollingUpgrade);
    let mut fleet = Fleet::new(lan, FleetConfig { previous, ..FleetConfig::default() });
    let result = drill_on(&mut fleet, scenario, options).await;
    if result.is_err() {
        for i in fleet.up() {
            eprintln!("---- log of {} ----\n{}", node_name(i), tail(&fleet.logs(i), 60));
        }
    }
    fleet.shutdown().await;
    result
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Patience for the mesh to converge after a fault.
const SETTLE: Duration = Duration::from_secs(60);

async fn drill_on(fleet: &mut Fleet<'_>, scenario: Scenario, options: &Options) -> Result<Report, String> {
    let initial = if scenario == Scenario::AddNodes { 3.min(fleet.len()) } else { fleet.len() };
    for i in 0..initial {
        fleet.start(i).await;
    }
    fleet.settle(SETTLE).await?;
    write_route(fleet, 0, "chaos-sentinel")?;
    // Clients on another machine need a key; it also makes every node's
    // admission depend on the replicated key table.
    let key = fleet.admin(0, &["keys", "create", "--name", "chaos-load"])?;
    let secret = key["secret"].as_str().ok_or_else(|| format!("no secret in {key}"))?.to_string();
    let long_streams = scenario == Scenario::KillMidStream;
    let load_config = LoadConfig {
        clients: options.clients,
        duration: options.duration,
        deadline: Duration::from_secs(45),
        api_key: Some(secret),
        model: fleet::MODEL.into(),
        tokens: if long_streams { (200, 240) } else { (8, 48) },
        all_streamed: long_streams,
        resume_off: options.resume_off,
        ..LoadConfig::default()
    };
    let mut checks = Vec::new();
    let mut extra = String::new();
    let load = Load::start(load_config, fleet.entries.clone());
    let began = Instant::now();
    let ends = began + options.duration;
    let mut faults = 0u32;
    let mut routes_written = vec!["chaos-sentinel".to_string()];
    let mut rng = rand::rngs::StdRng::from_entropy();
    use rand::SeedableRng as _;
    let summary;
    match scenario {
        Scenario::KillMidStream => {
            while Instant::now() + options.every < ends {
                tokio::time::sleep(options.every).await;
                let servers: Vec<usize> = fleet.up().into_iter().filter(|i| fleet::serves_model(*i)).collect();
                // Keep one server up: the rest of every stream needs a home.
                if servers.len() < 2 {
                    continue;
                }
                let Some(&victim) = servers.choose(&mut rng) else { break };
                fleet.kill(victim).await;
                faults += 1;
                tokio::time::sleep(options.hold).await;
                fleet.start(victim).await;
            }
            summary = format!(
                "{} nodes, {} clients, {:?}; streams of 200-240 tokens; SIGKILLed a node that serves the model every {:?}, restarted {:?} later ({faults} kills)",
                fleet.len(),
                options.clients,
                options.duration,
                options.every,
                options.hold
            );
        }
        Scenario::Kill => {
            while Instant::now() + options.every < ends {
                tokio::time::sleep(options.every).await;
                let Some(&victim) = fleet.up().choose(&mut rng) else { break };
                fleet.kill(victim).await;
                faults += 1;
                tokio::time::sleep(options.hold).await;
                fleet.start(victim).await;
            }
            summary = format!(
                "{} nodes, {} clients, {:?}; SIGKILLed a random node every {:?} and restarted it {:?} later ({faults} kills)",
                fleet.len(),
                options.clients,
                options.duration,
                options.every,
                options.hold
            );
        }
        Scenario::PartitionLeader => {
            let mut new_leaders = 0;
            while Instant::now() + options.every + options.hold < ends {
                tokio::time::sleep(options.every).await;
                let Some(leader) = fleet.leader().await else { continue };
                fleet.partition(leader, true)?;
                faults += 1;
                let cut_at = Instant::now();
                // The majority elects a leader of its own and commits.
                let route = format!("chaos-cut-{faults}");
                let majority = (0..fleet.len()).find(|i| *i != leader).unwrap_or(0);
                // However long the fault, give the election up to 20 s.
                let mut committed = false;
                while cut_at.elapsed() < options.hold.max(Duration::from_secs(20)) {
                    if fleet.admin(majority, &["route", "set", &route, fleet::MODEL]).is_ok() {
                        committed = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let elected_in = cut_at.elapsed();
                let remaining = options.hold.saturating_sub(cut_at.elapsed());
                tokio::time::sleep(remaining).await;
                let other_leader =
                    fleet.cluster(majority).await.and_then(|c| c["leader"]["name"].as_str().map(String::from));
                if committed && other_leader.as_deref() != Some(node_name(leader).as_str()) {
                    new_leaders += 1;
                    routes_written.push(route);
                }
                fleet.partition(leader, false)?;
                checks.push((
                    format!(
                        "cut #{faults}: the majority elected a new leader and committed without {}",
                        node_name(leader)
                    ),
                    committed,
                    format!("committed after {:.1} s", elected_in.as_secs_f64()),
                ));
            }
            summary = format!(
                "{} nodes, {} clients, {:?}; cut the leader off the cluster network for {:?} every {:?} ({faults} cuts, {new_leaders} new leaders)",
                fleet.len(),
                options.clients,
                options.duration,
                options.hold,
                options.every
            );
        }
        Scenario::HangBackend => {
            // Longer than the agents' response timeout (8 s), so requests
            // that reached the frozen backend time out and fail over
            // instead of just waiting for the thaw.
            let hold = options.hold.max(Duration::from_secs(12));
            while Instant::now() + options.every + hold < ends {
                tokio::time::sleep(options.every).await;
                // A backend that holds the model the load asks for.
                let holders: Vec<usize> = fleet.up().into_iter().filter(|i| fleet::serves_model(*i)).collect();
                let Some(&victim) = holders.choose(&mut rng) else { break };
                fleet.hang_backend(victim, true);
                faults += 1;
                tokio::time::sleep(hold).await;
                fleet.hang_backend(victim, false);
            }
            summary = format!(
                "{} nodes, {} clients, {:?}; froze a random serving node's backend (SIGSTOP) for {:?} every {:?} ({faults} hangs)",
                fleet.len(),
                options.clients,
                options.duration,
                hold,
                options.every
            );
        }
        Scenario::RestartAll => {
            let before = filled_raft_state(fleet).await?;
            for (round, graceful) in [(1, true), (2, false)] {
                tokio::time::sleep(options.every).await;
                let hosts = fleet.up();
                if graceful {
                    let mut clean = 0;
                    for i in &hosts {
                        clean += usize::from(fleet.stop(*i).await);
                    }
                    checks.push((
                        format!("round {round}: every agent drained and exited 0 on SIGTERM"),
                        clean == hosts.len(),
                        format!("{clean}/{}", hosts.len()),
                    ));
                } else {
                    for i in &hosts {
                        fleet.kill(*i).await;
                    }
                }
                faults += 1;
                tokio::time::sleep(options.hold).await;
                for i in &hosts {
                    fleet.start(*i).await;
                }
                fleet.settle(SETTLE).await?;
                let route = format!("chaos-restart-{round}");
                write_route(fleet, 0, &route)?;
                routes_written.push(route);
            }
            let after = raft_state(fleet).await?;
            let kept = before.routes.iter().all(|(k, v)| after.routes.get(k) == Some(v));
            checks.push((
                "Raft state survived both restarts: every earlier route, the same voters, the log only grew".into(),
                kept && after.voters == before.voters && after.commit >= before.commit && after.term >= before.term,
                format!(
                    "term {}→{}, commit {}→{}, voters {:?}→{:?}",
                    before.term, after.term, before.commit, after.commit, before.voters, after.voters
                ),
            ));
            summary = format!(
                "{} nodes, {} clients, {:?}; stopped every agent with SIGTERM, restarted them, then with SIGKILL, restarted them",
                fleet.len(),
                options.clients,
                options.duration
            );
        }
        Scenario::RollingUpgrade => {
            for i in fleet.up() {
                tokio::time::sleep(options.every).await;
                let step = rolling_step(fleet, i).await;
                faults += 1;
                checks.push((
                    format!("{}: drained, exited 0 on SIGTERM, restarted, undrained, the mesh converged", node_name(i)),
                    step.is_ok(),
                    step.err().unwrap_or_default(),
                ));
            }
            let remaining = ends.saturating_duration_since(Instant::now());
            tokio::time::sleep(remaining).await;
            let from = if fleet.mixed_versions() { " from the previous release to this build" } else { "" };
            summary = format!(
                "{} nodes, {} clients, {:?}; upgraded one node at a time{from}: drain, SIGTERM, start on the same data directory, undrain",
                fleet.len(),
                options.clients,
                options.duration
            );
        }
        Scenario::AddNodes => {
            for i in initial..fleet.len() {
                tokio::time::sleep(options.every).await;
                fleet.start(i).await;
                faults += 1;
            }
            let remaining = ends.saturating_duration_since(Instant::now());
            tokio::time::sleep(remaining).await;
            summary = format!(
                "{initial} nodes growing to {}, {} clients, {:?}; one node added every {:?}",
                fleet.len(),
                options.clients,
                options.duration,
                options.every
            );
        }
        Scenario::Soak => {
            let pids = fleet.agent_pids();
            let mut samples: BTreeMap<String, Vec<soak::Sample>> = BTreeMap::new();
            while Instant::now() < ends {
                let at = began.elapsed().as_secs_f64();
                for (i, pid) in &pids {
                    if let Some(sample) = soak::sample(*pid, at) {
                        samples.entry(node_name(*i)).or_default().push(sample);
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let warmup = (options.duration.as_secs_f64() / 5.0).min(60.0);
            let verdicts: BTreeMap<String, Option<soak::Growth>> = samples
                .iter()
                .map(|(name, s)| (name.clone(), soak::growth(s, warmup, soak::Limits::default())))
                .collect();
            extra = soak::table(&verdicts);
            let all_flat = verdicts.values().all(|v| v.as_ref().is_some_and(|g| g.within));
            checks.push((
                format!("no agent's memory or descriptors grew after {warmup:.0} s of warm-up"),
                all_flat,
                "limits: +10% RSS + 4 MiB, +8 descriptors (median of the last quarter vs the first)".into(),
            ));
            summary =
                format!("{} nodes, {} clients, {:?} of steady load", fleet.len(), options.clients, options.duration);
        }
    }
    let (sent, records) = load.finish().await;
    let downtime = fleet.downtime.lock().map(|d| d.clone()).unwrap_or_default();
    let mut tally = Tally { sent, ..Tally::default() };
    for record in &records {
        tally.add(record, &downtime);
    }

    // Afterwards: every node back, one leader, the replicated state whole.
    let settled = fleet.settle(SETTLE).await;
    checks.push((
        "the mesh converged: one leader, every node alive in every view".into(),
        settled.is_ok(),
        settled.err().unwrap_or_default(),
    ));
    // A write must commit once the mesh has settled (a leader elected in
    // the last moment may need one more election timeout).
    let written = write_route(fleet, 0, "chaos-after");
    checks.push(("a write commits after the drill".into(), written.is_ok(), written.err().unwrap_or_default()));
    routes_written.push("chaos-after".into());
    // Followers apply a commit a heartbeat or so after the leader.
    let mut missing = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        missing.clear();
        for i in fleet.up() {
            let routes = fleet.cluster(i).await.map(|c| c["routes"].clone()).unwrap_or(Value::Null);
            for route in &routes_written {
                if routes.get(route).is_none() {
                    missing.push(format!("{} lacks {route}", node_name(i)));
                }
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    checks.push((
        format!("every node holds every committed route ({} written)", routes_written.len()),
        missing.is_empty(),
        missing.join(", "),
    ));
    if scenario == Scenario::AddNodes {
        let idle: Vec<String> = (initial..fleet.len())
            .filter(|i| !tally.by_entry.contains_key(i) && !tally.served_by.contains_key(&node_name(*i)))
            .map(node_name)
            .collect();
        checks.push(("every added node took or served requests".into(), idle.is_empty(), idle.join(", ")));
    }
    if scenario == Scenario::RollingUpgrade {
        let reached = tally.sent - tally.entry_down;
        checks.push((
            "every request whose entry node was up completed".into(),
            tally.complete == reached,
            format!("{} of {reached}", tally.complete),
        ));
    }
    if scenario == Scenario::KillMidStream && !options.resume_off {
        let reached = tally.sent - tally.entry_down;
        checks.push((
            "every stream whose entry node stayed up completed, resumed on another node where its own died".into(),
            tally.complete == reached,
            format!("{} of {reached}", tally.complete),
        ));
    }
    // A drill where nothing got through proves nothing.
    let reached = tally.sent - tally.entry_down;
    let share = if reached == 0 { 0.0 } else { tally.complete as f64 / reached as f64 };
    checks.push((
        "at least half the requests that reached a running node completed".into(),
        share >= 0.5,
        format!("{:.1}% of {reached}", share * 100.0),
    ));
    if faults == 0 && scenario != Scenario::Soak {
        checks.push(("the drill injected at least one fault".into(), false, "the duration is too short".into()));
    }
    Ok(Report { scenario, summary, tally, checks, extra })
}

/// One node's upgrade, as an operator (or a package's maintainer scripts)
/// would do it: drain through another node, SIGTERM, start again on the
/// same data directory, wait for the mesh to converge, undrain.
async fn rolling_step(fleet: &mut Fleet<'_>, i: usize) -> Result<(), String> {
    let name = node_name(i);
    let other = (0..fleet.len()).find(|h| *h != i && fleet.is_up(*h)).unwrap_or(i);
    fleet.admin(other, &["node", "drain", &name])?;
    // Let the drain reach every entry before the node stops taking work.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if !fleet.stop(i).await {
        return Err(format!("{name} did not exit 0 on SIGTERM"));
    }
    fleet.upgrade(i);
    fleet.start(i).await;
    fleet.settle(SETTLE).await?;
    let mut undrained = Err(String::new());
    for _ in 0..3 {
        undrained = fleet.admin(other, &["node", "undrain", &name]).map(drop);
        if undrained.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    undrained
}

/// Sets route `name` through host `i`, trying three times: a write can
/// time out once while a leader elected a moment ago settles in.
fn write_route(fleet: &Fleet<'_>, i: usize, name: &str) -> Result<(), String> {
    let mut result = Err(String::new());
    for _ in 0..3 {
        result = fleet.admin(i, &["route", "set", name, fleet::MODEL]).map(drop);
        if result.is_ok() {
            break;
        }
    }
    result
}

/// The replicated state that must survive restarts.
struct RaftState {
    term: u64,
    commit: u64,
    voters: Vec<String>,
    routes: BTreeMap<String, Value>,
}

/// The agents' default voter target (`mesh.voters`).
const TARGET_VOTERS: usize = 3;

/// The Raft state once the leader has promoted its voters: a settled mesh
/// may still be adding learners and promoting them one change at a time,
/// and a snapshot taken halfway would read a later promotion as a changed
/// voter set.
async fn filled_raft_state(fleet: &Fleet<'_>) -> Result<RaftState, String> {
    let want = TARGET_VOTERS.min(fleet.up().len());
    let deadline = Instant::now() + SETTLE;
    loop {
        let late = Instant::now() > deadline;
        match raft_state(fleet).await {
            Ok(state) if state.voters.len() >= want => return Ok(state),
            Ok(state) if late => {
                return Err(format!("the leader promoted only {:?} of {want} voters within {SETTLE:?}", state.voters));
            }
            Err(err) if late => return Err(err),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn raft_state(fleet: &Fleet<'_>) -> Result<RaftState, String> {
    let leader = fleet.leader().await.ok_or("no agreed leader")?;
    let view = fleet.cluster(leader).await.ok_or("the leader does not answer")?;
    let mut voters: Vec<String> = view["voters"]
        .as_array()
        .map(|v| v.iter().filter_map(|m| m["name"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    voters.sort();
    let routes = view["routes"].as_object().map(|r| r.clone().into_iter().collect()).unwrap_or_default();
    Ok(RaftState {
        term: view["term"].as_u64().unwrap_or(0),
        commit: view["commit_index"].as_u64().unwrap_or(0),
        voters,
        routes,
    })
}
