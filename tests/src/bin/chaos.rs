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
    /// Drills to run (`all`: every one, the soak last).
    #[arg(required = true)]
    scenarios: Vec<Which>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    All,
    Kill,
    PartitionLeader,
    HangBackend,
    RestartAll,
    AddNodes,
    Soak,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut scenarios = Vec::new();
    for which in &args.scenarios {
        let add: Vec<Scenario> = match which {
            Which::All => Scenario::ALL.to_vec(),
            Which::Kill => vec![Scenario::Kill],
            Which::PartitionLeader => vec![Scenario::PartitionLeader],
            Which::HangBackend => vec![Scenario::HangBackend],
            Which::RestartAll => vec![Scenario::RestartAll],
            Which::AddNodes => vec![Scenario::AddNodes],
            Which::Soak => vec![Scenario::Soak],
        };
        for s in add {
            if !scenarios.contains(&s) {
                scenarios.push(s);
            }
        }
    }
    let mut failed = Vec::new();
    let mut tables = Vec::new();
    for scenario in scenarios {
        let seconds = if scenario == Scenario::Soak { args.soak_duration } else { args.duration };
        let options = Options {
            nodes: if scenario == Scenario::Soak { args.nodes.min(3) } else { args.nodes },
            duration: Duration::from_secs(seconds),
            clients: args.clients,
            every: Duration::from_secs_f64(args.every),
            hold: Duration::from_secs_f64(args.hold),
        };
        eprintln!("chaos: running {} ({seconds} s of load)…", scenario.name());
        match run(scenario, &options) {
            Ok(report) => {
                let table = report.render();
                println!("{table}");
                if !report.passed() {
                    failed.push(scenario.name());
                }
                tables.push(table);
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
