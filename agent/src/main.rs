//! The `llmesh` binary: parse, load config, run, wait for a signal, drain.

use std::io::Write;
use std::process::ExitCode;

mod cli;

use clap::Parser;
use cli::args::{Cli, Command};
use cli::{admin, demo, status};
use llmesh::config::{Config, LogConfig};
use llmesh::telemetry;
use tokio_util::sync::CancellationToken;

// Every request allocates and frees small buffers across worker threads
// (headers, JSON, body chunks); glibc's malloc spent about a sixth of the
// agent's CPU on them under load, mimalloc's thread-local free lists much less.
// Built without transparent huge pages (`no_thp`): with them, where the
// kernel grants THP on request, each arena mimalloc touched became 2 MiB
// pages, and an idle agent held 43 MiB instead of 28.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llmesh: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("llmesh: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_now(text: &str) {
    let mut out = std::io::stdout().lock();
    // stdout may be a closed pipe; there is nobody to tell then.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    match cli.command {
        Command::Agent(args) => {
            let config = match Config::load(args.config.as_deref(), args.overrides()) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("llmesh: {err}");
                    return Ok(ExitCode::from(2));
                }
            };
            if args.print_config {
                print!("{}", config.to_toml());
                return Ok(ExitCode::SUCCESS);
            }
            let traces = telemetry::init_with_traces(&config.log, &config.telemetry, &config.node.name);
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let ran = cli::sim::run_agent(config, shutdown, |ready| {
                if let Some(p2p) = ready.p2p.first() {
                    print_now(&format!("llmesh mesh listening on {p2p}"));
                }
                print_now(&format!("llmesh agent listening on http://{}", ready.http));
                if let Some(api) = ready.advertised.as_ref().filter(|a| **a != ready.http) {
                    print_now(&format!("other boxes reach this API at http://{api}"));
                }
            })
            .await;
            // The exporter's last batch goes out with a blocking client.
            tokio::task::block_in_place(|| traces.shutdown());
            ran?;
        }
        Command::SimBackend(args) => {
            telemetry::init(&LogConfig { format: args.log_format, ..LogConfig::default() });
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            cli::sim::run_backend(args.listen, args.sim, shutdown, |addr| {
                print_now(&format!("llmesh sim-backend listening on http://{addr}"));
            })
            .await?;
        }
        Command::Init(args) => return Ok(status::init(&args)),
        Command::Status(args) => return Ok(status::status(&args).await),
        Command::Keys { command, admin: args } => return Ok(admin::run_keys(&command, &args).await),
        Command::Route { command, admin: args } => return Ok(admin::run_route(&command, &args).await),
        Command::Node { command, admin: args } => return Ok(admin::run_node(&command, &args).await),
        Command::Token { command, admin: args } => return Ok(admin::run_token(&command, &args).await),
        Command::Completions { shell } => {
            let mut command = <cli::args::Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "llmesh", &mut script);
            // stdout may be a closed pipe (`| head`); nobody to tell then.
            let _ = std::io::stdout().write_all(&script);
        }
        Command::Man { dir } => cli::docs::man(dir.as_deref())?,
        Command::Models { command, api } => return Ok(cli::models::run(&command, &api).await),
        Command::Demo(args) => {
            telemetry::init(&LogConfig { filter: "warn".into(), ..LogConfig::default() });
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            demo::run(&args, shutdown, print_now).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down; finishing in-flight requests");
    shutdown.cancel();
}
