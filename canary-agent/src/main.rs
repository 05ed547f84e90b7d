use clap::Parser;

fn main() -> std::process::ExitCode {
    canary_agent::cli::run(canary_agent::cli::Cli::parse())
}
