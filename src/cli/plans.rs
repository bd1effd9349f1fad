//! `tally plans`: check and show plan catalogs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::app::Settings;
use crate::domain::Catalog;

/// `tally plans …`
#[derive(Debug, clap::Subcommand)]
pub enum PlansCommand {
    /// Validate a catalog file; every problem is printed with its line.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the catalog in force as JSON.
    Show,
}

/// Runs a plans subcommand.
pub fn run(settings: &Settings, command: PlansCommand) -> anyhow::Result<ExitCode> {
    match command {
        PlansCommand::Check { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            match Catalog::parse(&text) {
                Ok(catalog) => {
                    outln!(
                        "{}: ok ({} resources, {} plans, default plan '{}')",
                        file.display(),
                        catalog.resources.len(),
                        catalog.plans.len(),
                        catalog.default_plan
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in errors.0 {
                        match e.line {
                            Some(line) => stderr_line!("{}:{line}: {}", file.display(), e.message),
                            None => stderr_line!("{}: {}", file.display(), e.message),
                        }
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PlansCommand::Show => {
            outln!("{}", serde_json::to_string_pretty(&settings.load_catalog()?)?)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
