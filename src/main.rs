//! The `llmesh` command: parse the command line, build the config, call the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llmesh::config::Config;
use llmesh::node::Node;

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the release and the git commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("LLMESH_COMMIT"), ")");

#[derive(Parser)]
#[command(version = VERSION, about = "Pool a team's machines into one OpenAI-compatible AI cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API and the local models.
    Serve(Box<ServeArgs>),
    /// Measure prompt and decode speed of a chat model on this machine.
    Bench(llmesh::bench::BenchArgs),
    /// List the cluster's nodes, as a running node sees them; `nodes revoke PEER_ID` throws one out.
    Nodes(llmesh::cli::NodesArgs),
    /// List the cluster's models and their hosts; `models load ID=PATH` / `models unload ID`
    /// change what a running node serves.
    Models(llmesh::cli::ModelsArgs),
    /// The cluster's API keys: `keys create NAME [--models a,b] [--rate TOKENS_PER_MIN]
    /// [--requests-per-min N] [--expires DURATION]`, `keys list`, `keys revoke NAME`.
    Keys(llmesh::cli::KeysArgs),
    /// Summarise a running node: the cluster, its health, routing statistics.
    Status(llmesh::cli::NodeArgs),
    /// Print a connection key (and QR code) that lets one more machine join the cluster.
    Invite(llmesh::cli::InviteArgs),
    /// Have a running node join a cluster with a connection key.
    Join(llmesh::cli::JoinArgs),
    /// Have a running node leave gently: it stops taking new work, finishes its answers (up to
    /// its --drain-timeout) and exits, as on SIGTERM.
    Drain(llmesh::cli::NodeArgs),
    /// Print a new random cluster secret (256 bits) for `--cluster-key`.
    ClusterKey,
    /// Run a node as a systemd service that starts at boot: `service install [--user] [serve
    /// flags...]`, `service uninstall [--user]`.
    #[command(subcommand)]
    Service(ServiceCommand),
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write the node's config file from the serve flags given, and a systemd unit that runs
    /// `llmesh serve --config FILE` (system-wide: /etc/systemd/system; --user: yours).
    Install {
        /// A user service (~/.config/systemd/user), not a system one.
        #[arg(long)]
        user: bool,
        #[command(flatten)]
        serve: Box<ServeArgs>,
    },
    /// Remove the unit (the config file and the data dir stay).
    Uninstall {
        #[arg(long)]
        user: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A name (or name:port) the HTTP API answers to besides localhost, 127.0.0.1 and [::1]: a
    /// reverse proxy's or a VPN name. Repeatable. Other names are refused on a node listening on
    /// loopback, and on any node once one is given.
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// A model to host, as ID=PATH (a .gguf file, an embeddings folder, or hf:owner/repo/file). Repeatable.
    #[arg(long = "model", value_name = "ID=PATH")]
    models: Vec<String>,
    /// Require `Authorization: Bearer KEY` on every /v1 route.
    #[arg(long, env = "LLMESH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The name shown for this node [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Where the node keeps its identity [default: the platform data directory].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overlay listen address, repeatable [default: /ip4/0.0.0.0/tcp/7690].
    #[arg(long = "p2p-listen", value_name = "MULTIADDR")]
    p2p_listen: Vec<String>,
    /// A peer to dial, e.g. /ip4/10.0.0.2/tcp/7690/p2p/12D3..., for networks where mDNS does not reach. Repeatable.
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<String>,
    /// Do not discover peers on the LAN with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// On SIGTERM or `llmesh drain`: seconds to let running answers finish before exiting
    /// [default: 30].
    #[arg(long, value_name = "SECONDS")]
    drain_timeout: Option<u64>,
    /// Neither relay for other members nor reserve relayed addresses on the peers (and no hole
    /// punching, which starts from a relayed connection).
    #[arg(long)]
    no_relay: bool,
    /// The cluster secret, at least 16 characters (`llmesh cluster-key` prints one); nodes without
    /// it cannot connect. Without one the overlay listens on loopback only.
    #[arg(long, env = "LLMESH_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
    /// With no cluster secret, listen on the overlay addresses anyway and let in any llmesh node
    /// that reaches them. Only for networks you control: every such node is a full member.
    #[arg(long)]
    open_cluster: bool,
    /// Join a cluster with a connection key from `llmesh invite` (needed once: the node remembers).
    #[arg(long, value_name = "KEY")]
    join: Option<String>,
    /// An address others can reach this node at (a VPN address, a port forward), put into the
    /// connection keys it issues. Repeatable.
    #[arg(long = "external-address", value_name = "MULTIADDR")]
    external_addresses: Vec<String>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve_config(*args).and_then(|config| {
            size_compute_threads(config.limits.compute_threads);
            block_on(serve(config))
        }),
        Command::Bench(args) => {
            size_compute_threads(0);
            block_on(llmesh::bench::run(args))
        }
        Command::Nodes(args) => block_on(ask_node(move || llmesh::cli::nodes(&args))),
        Command::Models(args) => block_on(ask_node(move || llmesh::cli::models(&args))),
        Command::Status(args) => block_on(ask_node(move || llmesh::cli::status(&args))),
        Command::Invite(args) => block_on(ask_node(move || llmesh::cli::invite(&args))),
        Command::Keys(args) => block_on(ask_node(move || llmesh::cli::keys(&args))),
        Command::Join(args) => block_on(ask_node(move || llmesh::cli::join(&args))),
        Command::Drain(args) => block_on(ask_node(move || llmesh::cli::drain(&args))),
        Command::Service(ServiceCommand::Install { user, serve }) => service_install(user, *serve),
        Command::Service(ServiceCommand::Uninstall { user }) => {
            llmesh::service::ServicePaths::new(user, std::path::Path::new("/"))
                .and_then(|paths| llmesh::service::uninstall(&paths))
                .map(|lines| lines.iter().for_each(|line| println!("{line}")))
        }
        Command::ClusterKey => {
            println!("{}", llmesh::config::new_cluster_key());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain of causes, without a backtrace: these messages are for users.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Size the engine's compute threads (0: the default) while the process has one thread: candle
/// takes its share from environment variables, which only then are safe to set.
fn size_compute_threads(configured: usize) {
    let threads = llmesh::engine::kernels::pool::configure_threads(configured);
    // SAFETY: no runtime and no other thread has started yet.
    unsafe { llmesh::engine::kernels::candle_pools::configure(threads) };
}

fn block_on(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(command)
}

/// The node commands use a blocking HTTP client.
async fn ask_node(command: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(command).await?
}

/// The configuration file with the flags over it.
fn serve_config(args: ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.allowed_hosts.extend(args.allowed_hosts);
    if args.api_key.is_some() {
        config.api_key = args.api_key;
    }
    for flag in &args.models {
        config.add_model_flag(flag)?;
    }
    if args.name.is_some() {
        config.name = args.name;
    }
    if args.data_dir.is_some() {
        config.data_dir = args.data_dir;
    }
    if !args.p2p_listen.is_empty() {
        config.p2p_listen = args.p2p_listen;
    }
    config.peers.extend(args.peers);
    if args.no_mdns {
        config.mdns = false;
    }
    if let Some(seconds) = args.drain_timeout {
        config.drain_timeout = seconds;
    }
    if args.no_relay {
        config.relay = false;
    }
    if args.cluster_key.is_some() {
        config.cluster_key = args.cluster_key;
    }
    if args.open_cluster {
        config.open_cluster = true;
    }
    if args.join.is_some() {
        config.join = args.join;
    }
    config.external_addresses.extend(args.external_addresses);
    Ok(config)
}

fn service_install(user: bool, serve: ServeArgs) -> anyhow::Result<()> {
    let config = serve_config(serve)?;
    let paths = llmesh::service::ServicePaths::new(user, std::path::Path::new("/"))?;
    let binary = std::env::current_exe().context("cannot find this program's path")?;
    for line in llmesh::service::install(&binary, config, &paths)? {
        println!("{line}");
    }
    Ok(())
}

/// Serve until SIGTERM / Ctrl-C or `llmesh drain`, then drain; a second signal exits at once.
async fn serve(config: Config) -> anyhow::Result<()> {
    let timeout = std::time::Duration::from_secs(config.drain_timeout);
    let node = Node::spawn(config).await.context("cannot start the node")?;
    let router = node.router().clone();
    tokio::select! {
        signal = shutdown_signal() => signal?,
        () = router.drain_requested() => {}
    }
    tracing::info!(timeout_s = timeout.as_secs(), "draining; a second SIGTERM or Ctrl-C exits at once");
    tokio::select! {
        result = node.drain(timeout) => result?,
        signal = shutdown_signal() => {
            signal?;
            tracing::warn!("second signal: exiting now");
        }
    }
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
