//! Scale, simulated: `cargo run --example scale -- 5 10 25 50 100` starts N model-less nodes in
//! this one process on loopback (port 0, mDNS off, a cluster key so that membership is real), each
//! with the node started before it as its only `--peer`, and prints one markdown row per N:
//!
//! - how long after the last node started every node lists every other one;
//! - over an idle window (`LLMESH_SCALE_IDLE_SECS`, default 20) once they do: CPU time and memory
//!   growth of the process per node, and bytes on the loopback interface per node and second
//!   (meaningful only where loopback carries nothing else: `scripts/scale-sim.sh` runs this in a
//!   network namespace of its own);
//! - how long a revocation (the first node revokes the last) and a departure (a node in the middle
//!   of the chain stops) take to reach every other node.
//!
//! Timing, not assertions: nothing here fails on a slow result. `RUST_LOG` shows the nodes' logs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use llmesh::config::Config;
use llmesh::engine::{LocalEngine, QueueLimits};
use llmesh::node::Node;

const CLUSTER_KEY: &str = "llmesh-scale-simulation-cluster-key";
const POLL: Duration = Duration::from_millis(100);
/// How long every node may take to list every other one.
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(120);
/// How long a departure or a revocation may take to reach every node.
const SPREAD_LIMIT: Duration = Duration::from_secs(60);
/// Linux reports process CPU time in /proc in these ticks per second (USER_HZ, fixed at 100).
const TICKS_PER_SECOND: f64 = 100.0;

/// What one run of N nodes measured; `None` where it did not happen within its limit.
struct Row {
    nodes: usize,
    converged: Option<Duration>,
    overlay_bytes_per_node_second: f64,
    cpu_percent_per_node: f64,
    rss_growth_mib_per_node: f64,
    process_rss_mib: f64,
    announcement_kib: f64,
    connections_per_node: f64,
    revocation: Spread,
    departure: Spread,
}

/// How long news of one node took to reach the others, and how many of them listed that node
/// beforehand (the rest had nothing to learn: fewer than all when the cluster never converged).
struct Spread {
    took: Option<Duration>,
    listed_by: usize,
    of: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let parsed: Result<Vec<usize>, _> = std::env::args().skip(1).map(|arg| arg.parse()).collect();
    let sizes = match parsed {
        Ok(sizes) if !sizes.is_empty() => sizes,
        Ok(_) => vec![5, 10, 25, 50, 100],
        Err(error) => bail!("usage: scale [N ...] (node counts): {error}"),
    };
    let idle = std::env::var("LLMESH_SCALE_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    println!(
        "| nodes | all list all after | overlay bytes/s per node | CPU per idle node | RSS per node | \
         process RSS | announcement | connections per node | revocation reaches all | departure reaches all |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for nodes in sizes.into_iter().filter(|n| *n >= 3) {
        let row = measure(nodes, Duration::from_secs(idle)).await?;
        println!("{}", row.markdown());
    }
    Ok(())
}

async fn measure(count: usize, idle: Duration) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let rss_before = process_rss_bytes()?;
    let mut nodes: Vec<Node> = Vec::with_capacity(count);
    for index in 0..count {
        let peers = nodes.last().map(|previous| previous.p2p_addresses().to_vec()).unwrap_or_default();
        let engine = LocalEngine::load(&[], QueueLimits::default(), &candle_core::Device::Cpu)?;
        let node = Node::spawn_with_engine(config(index, &dir, peers), Arc::new(engine)).await?;
        nodes.push(node);
    }
    let ids: Vec<String> = nodes.iter().map(|node| node.router().node().peer_id.clone()).collect();

    let started = Instant::now();
    let every: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let converged = wait_until(&nodes, CONVERGENCE_LIMIT, |node| {
        let listed = node.router().cluster_nodes();
        let own = node.router().node().peer_id.as_str();
        let seen: HashSet<&str> = listed.iter().map(|n| n.announcement.peer_id.as_str()).collect();
        every.iter().all(|peer| *peer == own || seen.contains(peer))
    })
    .await
    .then(|| started.elapsed());

    let (cpu_before, bytes_before) = (process_cpu_seconds()?, loopback_bytes()?);
    let window = Instant::now();
    tokio::time::sleep(idle).await;
    let seconds = window.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds()? - cpu_before;
    let bytes = loopback_bytes()?.saturating_sub(bytes_before) as f64;
    let rss_after = process_rss_bytes()?;
    let announcement_kib = nodes[0]
        .router()
        .cluster_nodes()
        .iter()
        .map(|record| bincode::serde::encode_to_vec(&record.announcement, bincode::config::standard()))
        .filter_map(Result::ok)
        .map(|bytes| bytes.len())
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    let mut connections = 0;
    for node in &nodes {
        connections += node.router().connected_peers().await.len();
    }

    // The first node revokes the last: the end of the chain, so the rest stays connected.
    let revoked = ids[count - 1].clone();
    let others = &nodes[..count - 1];
    let listed_by = others.iter().filter(|node| lists(node, &revoked)).count();
    let started = Instant::now();
    nodes[0].router().revoke(&revoked).await.context("revoke")?;
    let took =
        wait_until(others, SPREAD_LIMIT, |node| !lists(node, &revoked)).await.then(|| started.elapsed());
    let revocation = Spread { took, listed_by, of: others.len() };

    let middle = count / 2;
    let departed = ids[middle].clone();
    let leaving = nodes.remove(middle);
    let rest = &nodes[..nodes.len() - 1];
    let listed_by = rest.iter().filter(|node| lists(node, &departed)).count();
    let started = Instant::now();
    leaving.shutdown();
    leaving.join().await?;
    let took =
        wait_until(rest, SPREAD_LIMIT, |node| !lists(node, &departed)).await.then(|| started.elapsed());
    let departure = Spread { took, listed_by, of: rest.len() };

    for node in &nodes {
        node.shutdown();
    }
    for node in nodes {
        node.join().await?;
    }
    Ok(Row {
        nodes: count,
        converged,
        overlay_bytes_per_node_second: bytes / count as f64 / seconds,
        cpu_percent_per_node: 100.0 * cpu / count as f64 / seconds,
        rss_growth_mib_per_node: rss_after.saturating_sub(rss_before) as f64 / count as f64 / MIB,
        process_rss_mib: rss_after as f64 / MIB,
        announcement_kib,
        connections_per_node: connections as f64 / count as f64,
        revocation,
        departure,
    })
}

fn config(index: usize, dir: &tempfile::TempDir, peers: Vec<String>) -> Config {
    let name = format!("scale-{index}");
    Config {
        listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!("a literal address")),
        data_dir: Some(dir.path().join(&name)),
        name: Some(name),
        p2p_listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        peers,
        mdns: false,
        cluster_key: Some(CLUSTER_KEY.into()),
        ..Config::default()
    }
}

/// Whether `node` lists `peer` as online.
fn lists(node: &Node, peer: &str) -> bool {
    node.router().cluster_nodes().iter().any(|record| record.announcement.peer_id == peer)
}

/// Poll until `holds` is true of every node, for at most `limit`; returns whether it came true.
/// A node it held for once is not asked again: asking copies the node's whole cluster view, which
/// at a hundred nodes would itself load the machine being measured.
async fn wait_until(nodes: &[Node], limit: Duration, holds: impl Fn(&Node) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut waiting: Vec<&Node> = nodes.iter().collect();
    loop {
        waiting.retain(|node| !holds(node));
        if waiting.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// User plus system CPU time of this process, in seconds.
fn process_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after_name = stat.rsplit_once(')').context("/proc/self/stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |field: usize| -> Result<f64> { Ok(fields.get(field - 3).context("short stat")?.parse()?) };
    Ok((ticks(14)? + ticks(15)?) / TICKS_PER_SECOND)
}

fn process_rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS")?.parse()?;
    Ok(kib * 1024)
}

/// Bytes sent on the loopback interface so far (each also counts as received on it).
fn loopback_bytes() -> Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev")?;
    let counters = dev
        .lines()
        .find_map(|line| line.trim_start().strip_prefix("lo:"))
        .context("no loopback interface in /proc/net/dev")?;
    // Received: bytes packets errs drop fifo frame compressed multicast; then sent: bytes ...
    Ok(counters.split_whitespace().nth(8).context("short /proc/net/dev line")?.parse()?)
}

impl Row {
    fn markdown(&self) -> String {
        let time = |at: Option<Duration>, limit: Duration| match at {
            Some(at) => format!("{:.1} s", at.as_secs_f64()),
            None => format!("not within {} s", limit.as_secs()),
        };
        let spread = |spread: &Spread| match spread.listed_by == spread.of {
            true => time(spread.took, SPREAD_LIMIT),
            false => format!(
                "{} ({} of {} listed it)",
                time(spread.took, SPREAD_LIMIT),
                spread.listed_by,
                spread.of
            ),
        };
        format!(
            "| {} | {} | {:.1} KiB/s | {:.1} % of a core | {:.1} MiB | {:.0} MiB | {:.1} KiB | {:.1} | {} | {} |",
            self.nodes,
            time(self.converged, CONVERGENCE_LIMIT),
            self.overlay_bytes_per_node_second / 1024.0,
            self.cpu_percent_per_node,
            self.rss_growth_mib_per_node,
            self.process_rss_mib,
            self.announcement_kib,
            self.connections_per_node,
            spread(&self.revocation),
            spread(&self.departure),
        )
    }
}
