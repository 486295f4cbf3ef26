//! Test harness: starts real `llmesh` processes (agents, simulated
//! backends, the demo) on loopback with OS-assigned ports, and helpers to
//! talk to them. Processes die with their handles.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// How long to wait for conditions; `LLMESH_TEST_PATIENCE` (a factor)
/// stretches it on slow machines.
pub fn patience() -> Duration {
    let factor = std::env::var("LLMESH_TEST_PATIENCE").ok().and_then(|f| f.parse::<f64>().ok()).unwrap_or(1.0);
    Duration::from_secs_f64(15.0 * factor.max(0.1))
}

/// The `llmesh` binary: `LLMESH_BIN`, or the workspace's debug build
/// (built on first use, so `cargo test` alone is enough).
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("LLMESH_BIN") {
            return PathBuf::from(path);
        }
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "llmesh", "--bin", "llmesh"])
            .current_dir(manifest.join(".."))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the llmesh binary failed");
        let exe = std::env::current_exe().expect("test executable path");
        // target/debug/deps/<test> or target/debug/<harness binary> →
        // target/debug/llmesh
        let mut dir = exe.parent().expect("target dir");
        if dir.ends_with("deps") {
            dir = dir.parent().expect("target dir");
        }
        dir.join("llmesh")
    })
    .clone()
}

/// A running `llmesh` process and its HTTP base URL.
pub struct Proc {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Everything the process printed on stdout before it was ready.
    pub banner: String,
    /// The node's data directory, when the harness made one.
    pub data_dir: Option<PathBuf>,
    child: Child,
    _stdout: BufReader<ChildStdout>,
    log: tempfile::NamedTempFile,
}

impl Proc {
    /// Starts `llmesh ARGS` and waits until it prints its listening URL.
    pub async fn start(args: &[&str]) -> Proc {
        Proc::start_with_env(args, &[]).await
    }

    /// Like [`Proc::start`] with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start_in(None, args, env).await
    }

    /// Starts `llmesh ARGS` inside network namespace `netns` (via `ip netns
    /// exec`, which execs llmesh in place, so killing the child kills it).
    pub async fn start_in_netns(netns: &str, args: &[&str]) -> Proc {
        Proc::start_in(Some(netns), args, &[]).await
    }

    /// Like [`Proc::start_in_netns`] with extra environment variables.
    pub async fn start_in_netns_env(netns: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start_in(Some(netns), args, env).await
    }

    async fn start_in(netns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start_program(&binary(), netns, args, env).await
    }

    /// Starts `program ARGS` (an `llmesh` binary, maybe another build of
    /// it), inside `netns` when given, and waits until it prints its URL.
    pub async fn start_program(
        program: &std::path::Path,
        netns: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let stderr = log.reopen().expect("log handle");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,llmesh=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .expect("llmesh starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut banner = String::new();
        let deadline = Instant::now() + patience();
        let url = loop {
            let mut line = String::new();
            let read = tokio::time::timeout_at(deadline.into(), stdout.read_line(&mut line)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {
                    banner.push_str(&line);
                    if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                        // The demo prints its URL before the rest of its banner.
                        if !line.contains("listening on") {
                            while !banner.contains("Ctrl-C") {
                                let mut more = String::new();
                                if stdout.read_line(&mut more).await.unwrap_or(0) == 0 {
                                    break;
                                }
                                banner.push_str(&more);
                            }
                        }
                        break url.trim_end_matches("/v1").to_string();
                    }
                }
                _ => {
                    let logs = std::fs::read_to_string(log.path()).unwrap_or_default();
                    panic!("llmesh {args:?} did not become ready; stdout:\n{banner}\nstderr:\n{logs}");
                }
            }
        };
        Proc { url, banner, data_dir: None, child, _stdout: stdout, log }
    }

    /// The libp2p address the agent printed (`llmesh mesh listening on …`).
    pub fn p2p_addr(&self) -> String {
        self.banner
            .lines()
            .find_map(|l| l.strip_prefix("llmesh mesh listening on "))
            .map(|a| a.trim().to_string())
            .unwrap_or_else(|| panic!("no mesh address in:\n{}", self.banner))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the process: a backend that
    /// stops answering without closing its sockets.
    pub fn freeze(&self, frozen: bool) {
        if let Some(pid) = self.pid() {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let _ = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
        }
    }

    /// The process's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM and waits for exit, returning whether it exited 0.
    pub async fn terminate(&mut self) -> bool {
        self.terminate_why().await.is_ok()
    }

    /// [`Proc::terminate`], saying why when the exit was not clean: still
    /// running after the patience, or the exit status.
    pub async fn terminate_why(&mut self) -> Result<(), String> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        match tokio::time::timeout(patience(), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("exited with {status}")),
            Ok(Err(err)) => Err(format!("cannot wait for it: {err}")),
            Err(_) => Err(format!("still running {:?} after SIGTERM", patience())),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of llmesh at {} ----\n{}", self.url, self.logs());
        }
    }
}

pub mod aggregator;
pub mod chaos;
pub mod netns;
pub mod probe;

/// Runs `llmesh init` on `dir` (creating its cluster if it has none) and
/// returns the join token it prints.
pub fn join_token(dir: &std::path::Path) -> String {
    join_token_with(&binary(), dir)
}

/// [`join_token`] with another `llmesh` binary (an older build).
pub fn join_token_with(program: &std::path::Path, dir: &std::path::Path) -> String {
    let out =
        std::process::Command::new(program).args(["init", "--data-dir"]).arg(dir).output().expect("llmesh init runs");
    assert!(out.status.success(), "llmesh init failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout
        .lines()
        .find(|l| l.starts_with("lmj2."))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no token in:\n{stdout}"))
}

/// Starts a simulated backend with extra flags.
pub async fn sim(args: &[&str]) -> Proc {
    let mut all = vec!["sim-backend", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Proc::start(&all).await
}

/// A fresh data directory that outlives the processes using it (a node
/// restarted on it keeps its identity). It is removed when the test process
/// exits, unless `LLMESH_KEEP_TEST_DIRS` is set (to read a failed test's
/// agent files).
pub fn data_dir() -> PathBuf {
    let dir = tempfile::Builder::new().prefix("llmesh-test-").tempdir().expect("tempdir").keep();
    if std::env::var_os("LLMESH_KEEP_TEST_DIRS").is_none() {
        remove_at_exit(dir.clone());
    }
    dir
}

/// Directories [`remove_test_dirs`] removes when the process exits.
static TEST_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Registers `dir` for removal at exit; the first call installs the hook.
/// An exit hook rather than a guard value because the directories are
/// handed around as plain paths and must outlive every agent a test
/// restarts on them.
fn remove_at_exit(dir: PathBuf) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    #[allow(unsafe_code)]
    HOOK.call_once(|| {
        // SAFETY: `remove_test_dirs` is a plain `extern "C"` function that
        // does not unwind; registering it has no other precondition.
        unsafe { libc::atexit(remove_test_dirs) };
    });
    TEST_DIRS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(dir);
}

extern "C" fn remove_test_dirs() {
    let dirs = std::mem::take(&mut *TEST_DIRS.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Starts an agent in front of `backend_url` (Ollama kind) with extra flags,
/// with its own data directory (so its own cluster secret unless `--join`
/// says otherwise), no mDNS, and libp2p on a loopback port of the OS's choice.
pub async fn agent(backend_url: &str, args: &[&str]) -> Proc {
    let dir = data_dir();
    agent_in(&dir, backend_url, args).await
}

/// Like [`agent`] with a given data directory (to restart a node as itself).
pub async fn agent_in(dir: &std::path::Path, backend_url: &str, args: &[&str]) -> Proc {
    agent_in_env(dir, backend_url, args, &[]).await
}

/// Like [`agent_in`] with extra environment variables (`LLMESH_*` settings
/// that have no flag).
pub async fn agent_in_env(dir: &std::path::Path, backend_url: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let dir_text = dir.to_str().expect("utf-8 temp path").to_string();
    let mut all = vec![
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend_url,
        "--data-dir",
        &dir_text,
        "--no-mdns",
        "--mesh-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data-listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
    ];
    if !args.contains(&"--name") {
        all.extend_from_slice(&["--name", "test-node"]);
    }
    all.extend_from_slice(args);
    let mut proc = Proc::start_with_env(&all, env).await;
    proc.data_dir = Some(dir.to_path_buf());
    proc
}

/// A sim and an agent in front of it.
pub async fn sim_and_agent(sim_args: &[&str], agent_args: &[&str]) -> (Proc, Proc) {
    let backend = sim(sim_args).await;
    let front = agent(&backend.url, agent_args).await;
    (backend, front)
}

/// A client with no proxy and a generous timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(patience()).build().expect("client")
}

/// `GET url` as JSON.
pub async fn get_json(url: &str) -> Value {
    client().get(url).send().await.expect("GET").json().await.expect("JSON body")
}

/// The sim's counters.
pub async fn sim_stats(sim: &Proc) -> Value {
    get_json(&format!("{}/sim/stats", sim.url)).await
}

/// Polls `check` until it returns true or patience runs out.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + patience();
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
        .collect()
}

/// Parses an NDJSON body into values.
pub fn ndjson_lines(body: &str) -> Vec<Value> {
    body.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("NDJSON line")).collect()
}

/// A sim and the agent in front of it, one box of a test mesh.
pub struct MeshNode {
    /// The simulated backend.
    pub sim: Proc,
    /// The agent.
    pub agent: Proc,
}

/// Starts nodes named `specs[i].0` whose sims take `specs[i].1`; the first
/// creates the cluster and the others join it. Returns once every node
/// sees every other alive with a data plane.
pub async fn mesh(specs: &[(&str, &[&str])]) -> Vec<MeshNode> {
    let mut nodes: Vec<MeshNode> = Vec::new();
    let mut token = String::new();
    let mut boot = String::new();
    for (i, (name, sim_args)) in specs.iter().enumerate() {
        let sim = sim(sim_args).await;
        // The agents know their sims' parallel slots, as an operator would
        // set OLLAMA_NUM_PARALLEL's value.
        let slots = sim_args.iter().position(|a| *a == "--slots").map_or("4", |i| sim_args[i + 1]);
        let agent = if i == 0 {
            agent(&sim.url, &["--name", name, "--parallel-slots", slots]).await
        } else {
            agent(&sim.url, &["--name", name, "--join", &token, "--bootstrap", &boot, "--parallel-slots", slots]).await
        };
        if i == 0 {
            token = join_token(agent.data_dir.as_deref().expect("data dir"));
            boot = agent.p2p_addr();
        }
        nodes.push(MeshNode { sim, agent });
    }
    let n = nodes.len();
    for node in &nodes {
        eventually("every node sees every other", || async {
            let listed = get_json(&format!("{}/mesh/v1/nodes", node.agent.url)).await;
            let ready = listed["nodes"]
                .as_array()
                .map(|a| a.iter().filter(|n| n["liveness"] == "alive" && n["addresses"]["data"] != "").count());
            ready == Some(n)
        })
        .await;
    }
    nodes
}
