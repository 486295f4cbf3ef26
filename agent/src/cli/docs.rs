//! `llmesh man`: man pages generated from the command line's own
//! definition, so they never drift from `--help`.

use std::path::Path;

use clap::CommandFactory as _;

use crate::cli::args::Cli;

/// Prints `llmesh.1` to stdout, or writes `llmesh.1` and one page per
/// subcommand (`llmesh-agent.1`, …) into `dir`.
pub fn man(dir: Option<&Path>) -> std::io::Result<()> {
    let command = Cli::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page)?;
        // stdout may be a closed pipe (`| head`); nobody to tell then.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &page);
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let mut top = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut top)?;
    std::fs::write(dir.join("llmesh.1"), top)?;
    for sub in command.get_subcommands() {
        let name = format!("llmesh-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().display_name(name.clone())).title(name.clone()).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
    }
    Ok(())
}
