//! Coordinator benchmark (run by `scripts/bench/coordinator`): leader
//! failover time over repeated SIGKILLs, admin write commit latency on
//! loopback through the leader and through a follower, and a 20-node mesh
//! with 5 voters. Prints each figure beside its target.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmesh_proto::Route;
use llmesh_proto::admin_client::AdminClient;
use llmesh_tests::{Proc, agent_in_env, binary, data_dir, get_json};
use serde_json::Value;

struct Node {
    proc: Option<Proc>,
    dir: PathBuf,
    name: String,
}

struct Mesh {
    nodes: Vec<Node>,
    token: String,
    voters: String,
}

const ENV: &[(&str, &str)] = &[("LLMESH_MESH__REPLACE_VOTER_AFTER", "300s")];

impl Mesh {
    async fn start(n: usize, voters: usize, prefix: &str) -> Mesh {
        let mut mesh = Mesh { nodes: Vec::new(), token: String::new(), voters: voters.to_string() };
        for i in 0..n {
            let node = Node { proc: None, dir: data_dir(), name: format!("{prefix}-{i}") };
            mesh.nodes.push(node);
            mesh.launch(i).await;
            if i == 0 {
                let out = std::process::Command::new(binary())
                    .args(["init", "--data-dir"])
                    .arg(&mesh.nodes[0].dir)
                    .output()
                    .expect("init runs");
                mesh.token = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find(|l| l.starts_with("lmj2."))
                    .expect("token")
                    .to_string();
            }
        }
        mesh
    }

    async fn launch(&mut self, i: usize) {
        let boot = self.nodes.iter().find_map(|n| n.proc.as_ref()).map(Proc::p2p_addr);
        let node = &self.nodes[i];
        let mut args =
            vec!["--backend-kind", "sim", "--name", &node.name, "--voters", &self.voters, "--dead-after", "3s"];
        if let Some(boot) = &boot {
            args.extend_from_slice(&["--join", &self.token, "--bootstrap", boot]);
        }
        let proc = agent_in_env(&node.dir, "http://127.0.0.1:9", &args, ENV).await;
        self.nodes[i].proc = Some(proc);
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Proc)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.proc.as_ref().map(|p| (i, p)))
    }

    async fn views(&self) -> Vec<(usize, Value)> {
        let mut views = Vec::new();
        for (i, proc) in self.live() {
            views.push((i, get_json(&format!("{}/mesh/v1/cluster", proc.url)).await));
        }
        views
    }

    /// Waits until every live node agrees on one leader, `members` members
    /// of which the configured number are voters; returns the leader's index.
    async fn settled(&self, members: usize, limit: Duration) -> Option<usize> {
        let voters: usize = self.voters.parse().unwrap_or(3);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let views = self.views().await;
            let leaders: Vec<usize> = views.iter().filter(|(_, v)| v["role"] == "leader").map(|(i, _)| *i).collect();
            if let [leader] = leaders.as_slice() {
                let view = &views.iter().find(|(i, _)| i == leader).expect("leader view").1;
                let have_voters = view["voters"].as_array().map_or(0, Vec::len);
                let count = have_voters + view["learners"].as_array().map_or(0, Vec::len);
                let commit = &view["commit_index"];
                if count == members
                    && have_voters == voters.min(members)
                    && views.iter().all(|(_, v)| &v["commit_index"] == commit)
                {
                    return Some(*leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.nodes[0].dir.join("admin.token")).expect("admin token").trim().to_string()
    }

    async fn admin(&self, i: usize) -> AdminClient<tonic::transport::Channel> {
        let view = get_json(&format!("{}/mesh/v1/cluster", self.nodes[i].proc.as_ref().expect("live").url)).await;
        let port = view["control_port"].as_u64().expect("control port");
        AdminClient::connect(format!("http://127.0.0.1:{port}")).await.expect("admin connects")
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn write_latency(mesh: &Mesh, via: usize, writes: usize) -> Vec<Duration> {
    let mut client = mesh.admin(via).await;
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", mesh.admin_token()).parse().expect("header");
    let mut samples = Vec::with_capacity(writes);
    for n in 0..writes {
        let mut request = tonic::Request::new(Route { alias: format!("bench-{via}-{n}"), model: "qwen2.5:7b".into() });
        request.metadata_mut().insert("authorization", token.clone());
        let started = Instant::now();
        client.set_route(request).await.expect("write commits");
        samples.push(started.elapsed());
    }
    samples.sort();
    samples
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let kills = arg("--kills", 20);
    let writes = arg("--writes", 200);
    let big = arg("--big", 20);

    println!("## Leader failover: 5 nodes, 5 voters, {kills} SIGKILLs of the leader");
    let mut mesh = Mesh::start(5, 5, "fo").await;
    let mut leader = mesh.settled(5, Duration::from_secs(60)).await.expect("mesh settles");
    let mut times = Vec::new();
    for round in 0..kills {
        let old_term = get_json(&format!("{}/mesh/v1/cluster", mesh.nodes[leader].proc.as_ref().expect("live").url))
            .await["term"]
            .as_u64()
            .unwrap_or(0);
        if let Some(mut proc) = mesh.nodes[leader].proc.take() {
            proc.kill().await;
        }
        let killed = Instant::now();
        let took = loop {
            let views = mesh.views().await;
            let new: Vec<&Value> = views.iter().map(|(_, v)| v).filter(|v| v["role"] == "leader").collect();
            if let [view] = new.as_slice()
                && view["term"].as_u64().unwrap_or(0) > old_term
                && views.iter().all(|(_, v)| v["leader"]["raft_id"] == view["raft_id"])
            {
                break killed.elapsed();
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no new leader after 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        println!("kill {:>2}: new leader after {}", round + 1, ms(took));
        times.push(took);
        mesh.launch(leader).await;
        leader = mesh.settled(5, Duration::from_secs(60)).await.expect("mesh settles again");
    }
    times.sort();
    let median = percentile(&times, 0.5);
    println!(
        "failover: median {} (target <= 2000 ms, {:.2}x of target), max {}",
        ms(median),
        median.as_secs_f64() / 2.0,
        ms(*times.last().expect("samples"))
    );
    drop(mesh);

    println!("\n## Admin write commit latency on loopback: 3 voters, {writes} sequential writes");
    let mesh = Mesh::start(3, 3, "wl").await;
    let leader = mesh.settled(3, Duration::from_secs(60)).await.expect("mesh settles");
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    let via_leader = write_latency(&mesh, leader, writes).await;
    let via_follower = write_latency(&mesh, follower, writes).await;
    for (what, samples) in [("via the leader", &via_leader), ("via a follower", &via_follower)] {
        let p50 = percentile(samples, 0.5);
        println!(
            "{what:<15} p50 {} ({:.2}x of the 20 ms target), p99 {}, max {}",
            ms(p50),
            p50.as_secs_f64() / 0.020,
            ms(percentile(samples, 0.99)),
            ms(*samples.last().expect("samples"))
        );
    }
    drop(mesh);

    println!("\n## A {big}-node mesh with 5 voters on this machine");
    let started = Instant::now();
    let mesh = Mesh::start(big, 5, "big").await;
    let leader = mesh.settled(big, Duration::from_secs(180)).await.expect("the big mesh settles");
    let formed = started.elapsed();
    let views = mesh.views().await;
    let view = &views.iter().find(|(i, _)| *i == leader).expect("leader").1;
    let learner = views.iter().find(|(_, v)| v["role"] == "learner").map(|(i, _)| *i).expect("a learner");
    let samples = write_latency(&mesh, learner, writes.min(100)).await;
    let rss: Vec<u64> = mesh.live().filter_map(|(_, p)| p.pid()).map(rss_kib).collect();
    println!(
        "{big} nodes: {} voters, {} learners, all in the Raft group {:.1} s after the first start",
        view["voters"].as_array().map_or(0, Vec::len),
        view["learners"].as_array().map_or(0, Vec::len),
        formed.as_secs_f64()
    );
    println!(
        "writes via a learner: p50 {}, p99 {}; agent RSS median {:.1} MiB, max {:.1} MiB",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        {
            let mut r = rss.clone();
            r.sort();
            r.get(r.len() / 2).copied().unwrap_or(0) as f64 / 1024.0
        },
        rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0
    );
}
