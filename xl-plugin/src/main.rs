//! `xl-snap`: the xensnap command line.
//!
//! Today it carries the `image` family (offline and served qcow2 images with disk
//! checkpoints). The domain-level commands (`checkpoint`, `save`, `restore`, `remus`,
//! `migrate`) arrive with the backend and the daemon.

mod control;
mod cpu;
mod domain;
mod image;
mod size;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "xl-snap", version, about = "Consistent memory+disk checkpoints for Xen domains")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work on qcow2 images: create, inspect, check, checkpoint, serve over NBD.
    #[command(subcommand)]
    Image(image::ImageCmd),
    #[command(flatten)]
    Domain(domain::DomainCmd),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XENSNAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Image(cmd) => image::run(cmd),
        Command::Domain(cmd) => domain::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xl-snap: {e}");
            ExitCode::FAILURE
        }
    }
}
