//! The `canary` command line: `agent` runs the daemon, the other commands talk to a
//! running agent over its control socket.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::{
    api::{self, Request, Status},
    config::{self, Config},
};

#[derive(Debug, Parser)]
#[command(name = "canary", version, about = "Kernel-level canary deployments")]
pub struct Cli {
    /// Control socket of the agent (default: the config's control_socket, else
    /// /run/canary/agent.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Agent configuration file (TOML).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the datapath, apply --config, serve the control API.
    Agent,
    /// Set a service's canary share, 0 to 100 percent in steps of 0.01.
    SetWeight {
        service: String,
        #[arg(value_parser = parse_percent)]
        percent: u16,
    },
    /// Show services, weights and per-backend counters.
    Status {
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// Parses "12.5" or "12.5%" into basis points.
pub fn parse_percent(s: &str) -> Result<u16, String> {
    let n = s.strip_suffix('%').unwrap_or(s);
    let v: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number (expected a percentage such as 12.5)"))?;
    config::percent_to_bp(v)
}

impl Cli {
    fn socket(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        match &self.config {
            Some(path) => Ok(Config::load(path)?.agent.control_socket),
            None => Ok(config::DEFAULT_SOCKET.into()),
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canary: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Agent => {
            let path = cli
                .config
                .clone()
                .context("`canary agent` needs --config FILE")?;
            let mut config = Config::load(&path)?;
            if let Some(s) = &cli.socket {
                config.agent.control_socket = s.clone();
            }
            init_tracing();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(crate::agent::run(config))
        }
        Command::SetWeight { service, percent } => {
            let v = api::call(
                &cli.socket()?,
                &Request::SetWeight {
                    service: service.clone(),
                    weight_bp: *percent,
                },
            )?;
            let status: Status = serde_json::from_value(v)?;
            println!("{service}: canary weight {}%", status.services[0].weight);
            Ok(())
        }
        Command::Status { service, json } => {
            let v = api::call(
                &cli.socket()?,
                &Request::Status {
                    service: service.clone(),
                },
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_status(&serde_json::from_value(v)?));
            }
            Ok(())
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Human-readable status table.
pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    for s in &status.services {
        out += &format!(
            "{} {}/{}  canary {}%  mode {}  sticky {}\n",
            s.name, s.listen, s.protocol, s.weight, s.mode, s.sticky
        );
        out += &format!(
            "  {:<7} {:<28} {:>10} {:>12} {:>12} {:>14} {:>14}\n",
            "group", "backend", "conns", "pkts in", "pkts out", "bytes in", "bytes out"
        );
        for b in &s.backends {
            out += &format!(
                "  {:<7} {:<28} {:>10} {:>12} {:>12} {:>14} {:>14}\n",
                b.group,
                b.address,
                b.connections,
                b.packets_in,
                b.packets_out,
                b.bytes_in,
                b.bytes_out
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("canary").chain(args.iter().copied()))
    }

    #[test]
    fn set_weight_accepts_hundredths() {
        let cli = parse(&["set-weight", "web", "12.34"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::SetWeight { percent: 1234, .. }
        ));
        let cli = parse(&["--socket", "/tmp/s", "set-weight", "web", "5%"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::SetWeight { percent: 500, .. }
        ));
        assert_eq!(cli.socket.as_deref(), Some(std::path::Path::new("/tmp/s")));
    }

    #[test]
    fn bad_arguments_are_errors_that_say_why() {
        let e = parse(&["set-weight", "web", "100.5"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 0 and 100"), "{e}");
        let e = parse(&["set-weight", "web", "1.001"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("two decimals"), "{e}");
        let e = parse(&["set-weight", "web", "ten"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");
        assert!(parse(&["set-weight", "web"]).is_err());
        assert!(parse(&["status", "--jsn"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn agent_without_config_is_a_clear_error() {
        let err = execute(parse(&["agent"]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("needs --config"), "{err}");
    }
}
