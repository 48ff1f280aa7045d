//! The `llmesh` command: parse the command line, build the config, call the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llmesh::config::Config;
use llmesh::node::Node;

#[derive(Parser)]
#[command(version, about = "Pool a team's machines into one OpenAI-compatible AI cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API and the local models.
    Serve(ServeArgs),
    /// Measure prompt and decode speed of a chat model on this machine.
    Bench(llmesh::bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A model to host, as ID=PATH (a .gguf file, an embeddings folder, or hf:owner/repo/file). Repeatable.
    #[arg(long = "model", value_name = "ID=PATH")]
    models: Vec<String>,
    /// Require `Authorization: Bearer KEY` on every /v1 route.
    #[arg(long, env = "LLMESH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Bench(args) => llmesh::bench::run(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.api_key.is_some() {
        config.api_key = args.api_key;
    }
    for flag in &args.models {
        config.add_model_flag(flag)?;
    }
    let node = Node::spawn(config).await.context("cannot start the node")?;
    shutdown_signal().await?;
    tracing::info!("shutting down");
    node.shutdown();
    node.join().await?;
    Ok(())
}

/// Ctrl-C, or SIGTERM where there is one.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
