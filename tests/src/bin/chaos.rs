//! `llmesh-chaos`: runs chaos drills against a real mesh on namespaced
//! hosts and prints each drill's accounting table. Exits 1 when a promise
//! broke. Needs root (network namespaces); `scripts/chaos.sh` runs it.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llmesh_tests::chaos::{Options, Scenario, run};

/// Chaos drills for llmesh.
#[derive(Parser)]
#[command(name = "llmesh-chaos")]
struct Args {
    /// Drills to run: kill, kill-mid-stream, partition-leader, hang-backend,
    /// restart-all, add-nodes, rolling-upgrade, soak, or all (every one, the soak last).
    #[arg(required = true)]
    scenarios: Vec<String>,
    /// Nodes (add-nodes grows from 3 to this).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Load duration of each drill, in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Load duration of the soak, in seconds.
    #[arg(long, default_value_t = 600)]
    soak_duration: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds between faults.
    #[arg(long, default_value_t = 4.0)]
    every: f64,
    /// Seconds a fault lasts.
    #[arg(long, default_value_t = 6.0)]
    hold: f64,
    /// Clients ask that broken streams not be resumed on another node.
    #[arg(long)]
    no_resume: bool,
    /// rolling-upgrade starts every host on this llmesh binary (the
    /// previous release, see scripts/build-previous.sh) and upgrades each
    /// to this build: a mixed-version mesh under load.
    #[arg(long, value_name = "PATH")]
    from_binary: Option<std::path::PathBuf>,
}

/// One drill by name, or every drill for `all`.
fn parse_drill(name: &str) -> Result<Vec<Scenario>, String> {
    if name == "all" {
        return Ok(Scenario::ALL.to_vec());
    }
    Scenario::ALL.into_iter().find(|s| s.name() == name).map(|s| vec![s]).ok_or_else(|| {
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        format!("unknown drill '{name}' (one of: {}, all)", names.join(", "))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut scenarios = Vec::new();
    for name in &args.scenarios {
        match parse_drill(name) {
            Ok(drills) => scenarios.extend(drills.into_iter().filter(|d| !scenarios.contains(d)).collect::<Vec<_>>()),
            Err(err) => {
                eprintln!("llmesh-chaos: {err}");
                return ExitCode::from(2);
            }
        }
    }
    let mut failed = Vec::new();
    for scenario in scenarios {
        let seconds = if scenario == Scenario::Soak { args.soak_duration } else { args.duration };
        let options = Options {
            nodes: if scenario == Scenario::Soak { args.nodes.min(3) } else { args.nodes },
            duration: Duration::from_secs(seconds),
            clients: args.clients,
            every: Duration::from_secs_f64(args.every),
            hold: Duration::from_secs_f64(args.hold),
            resume_off: args.no_resume,
            from_binary: args.from_binary.clone(),
        };
        eprintln!("chaos: running {} ({seconds} s of load)…", scenario.name());
        match run(scenario, &options) {
            Ok(report) => {
                let table = report.render();
                println!("{table}");
                if !report.passed() {
                    failed.push(scenario.name());
                }
            }
            Err(err) => {
                println!("== chaos: {} — could not run: {err}\n  => FAIL\n", scenario.name());
                failed.push(scenario.name());
            }
        }
    }
    if failed.is_empty() {
        println!("chaos: every drill held its promises");
        ExitCode::SUCCESS
    } else {
        println!("chaos: promises broken in: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
