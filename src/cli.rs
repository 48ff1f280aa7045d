//! `llmesh nodes`, `llmesh models` (and `models load` / `models unload`), `llmesh keys`
//! (`keys.rs`) and `llmesh status`: ask a running node over its HTTP API and print readable
//! tables, or the JSON with `--json`. Errors say what to do next.

mod keys;

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

pub use keys::{KeysAction, KeysArgs, keys};

#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// The node to ask.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "LLMESH_NODE", global = true)]
    pub node: String,
    /// The node's API key, if it has one.
    #[arg(long, env = "LLMESH_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Print the node's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// GET a JSON document from the node, turning transport and auth failures into advice.
fn fetch(args: &NodeArgs, path: &str) -> anyhow::Result<Value> {
    call(args, path, None)
}

/// GET (or POST `body`) and read the JSON answer.
fn call(args: &NodeArgs, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    match body {
        None => send(args, "GET", path, None),
        Some(body) => send(args, "POST", path, Some(body)),
    }
}

/// Send `method` to `path` (with a JSON `body`, or none) and read the JSON answer.
fn send(args: &NodeArgs, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("{}{path}", args.node.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let authorization = args.api_key.as_ref().map(|key| format!("Bearer {key}"));
    let sent = match (method, body) {
        ("GET", _) => {
            let mut request = agent.get(&url);
            if let Some(value) = &authorization {
                request = request.header("Authorization", value);
            }
            request.call()
        }
        ("DELETE", _) => {
            // The operator's routes take only JSON requests (a web page cannot forge one).
            let mut request = agent.delete(&url).header("Content-Type", "application/json");
            if let Some(value) = &authorization {
                request = request.header("Authorization", value);
            }
            request.call()
        }
        (_, body) => {
            let mut request = agent.post(&url).header("Content-Type", "application/json");
            if let Some(value) = &authorization {
                request = request.header("Authorization", value);
            }
            request.send(body.unwrap_or(Value::Null).to_string())
        }
    };
    let mut response = sent.map_err(|error| {
        anyhow!(
            "no llmesh node answers at {}: {error}\nIs it running? Start one with `llmesh serve`, or point --node at it.",
            args.node
        )
    })?;
    let status = response.status();
    let body = response.body_mut().read_to_string().context("reading the node's answer")?;
    match status.as_u16() {
        200..=299 => serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON")),
        401 if args.api_key.is_none() => {
            bail!("the node needs an API key: pass --api-key KEY or set LLMESH_API_KEY")
        }
        401 => bail!("the node refused the API key: check --api-key / LLMESH_API_KEY"),
        code => {
            // The node's own message, where it sent an OpenAI-shaped error.
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|answer| answer["error"]["message"].as_str().map(str::to_string));
            match (code, message) {
                (_, Some(message)) => bail!("{message} ({code})"),
                (404, None) => bail!("{url} is not an llmesh node's API (404); check --node"),
                (_, None) => bail!("the node answered {code}: {body}"),
            }
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// The connection key from `llmesh invite` on a member.
    pub key: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Have a running node join with a connection key; it moves to the key's cluster unless it was
/// started with `--cluster-key` for another one.
pub fn join(args: &JoinArgs) -> anyhow::Result<()> {
    let answer = call(&args.node, "/api/join", Some(serde_json::json!({"key": args.key.trim()})))?;
    if args.node.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("joined: admitted by {}", text(&answer["inviter"]));
    }
    Ok(())
}

/// Ask a running node to drain: it stops taking new work, finishes what it runs and exits.
pub fn drain(args: &NodeArgs) -> anyhow::Result<()> {
    let answer = call(args, "/api/drain", Some(serde_json::json!({})))?;
    let line = match answer["started"].as_bool() {
        Some(false) => "the node was draining already",
        _ => "draining: the node takes no new work, finishes its answers and exits",
    };
    print_answer(args, &answer, line)
}

#[derive(Debug, Clone, clap::Args)]
pub struct InviteArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// How many machines may join with the key.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// How long the key is valid, in hours.
    #[arg(long, default_value_t = 24)]
    pub valid_hours: u64,
    /// Also write the key as a QR code to this PNG file.
    #[arg(long, value_name = "FILE")]
    pub qr: Option<std::path::PathBuf>,
}

/// Ask the node for a connection key; print it with a QR code for phones and other screens.
pub fn invite(args: &InviteArgs) -> anyhow::Result<()> {
    let body = serde_json::json!({"uses": args.uses, "valid_hours": args.valid_hours});
    let answer = call(&args.node, "/api/invitations", Some(body))?;
    if args.node.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let key = answer["key"].as_str().context("the node's answer has no key")?;
    let code = qrcode::QrCode::new(key.as_bytes()).context("the key is too long for a QR code")?;
    let terminal = code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .build();
    println!("{terminal}\n");
    println!("{key}\n");
    println!(
        "Valid for {} use(s) until {} (Unix time). On the new machine run:\n  llmesh serve --join '{key}'",
        args.uses, answer["expires_at"]
    );
    if let Some(path) = &args.qr {
        let image = code.render::<image::Luma<u8>>().min_dimensions(400, 400).build();
        image.save(path).with_context(|| format!("cannot write {}", path.display()))?;
        println!("QR code written to {}", path.display());
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct NodesArgs {
    #[command(subcommand)]
    pub action: Option<NodesAction>,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodesAction {
    /// Throw a node out of the cluster: its connections are closed and refused from now on, on
    /// every node, even if it still holds the cluster secret or a connection key.
    Revoke {
        /// The node's peer id (see `llmesh nodes`).
        peer_id: String,
    },
}

pub fn nodes(args: &NodesArgs) -> anyhow::Result<()> {
    match &args.action {
        None => list_nodes(&args.node),
        Some(NodesAction::Revoke { peer_id }) => {
            let answer = call(&args.node, &format!("/api/nodes/{peer_id}/revoke"), Some(Value::Null))?;
            if args.node.json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else if answer["newly_revoked"] == true {
                println!("revoked {peer_id}: its connections are closed and refused on every node");
            } else {
                println!("{peer_id} was already revoked");
            }
            Ok(())
        }
    }
}

fn list_nodes(args: &NodeArgs) -> anyhow::Result<()> {
    let nodes = fetch(args, "/api/nodes")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    let mut rows =
        vec![row(["NAME", "STATUS", "VERSION", "MODELS", "CPU", "MEMORY", "GPU", "LOAD", "PEER ID"])];
    let mut skewed = Vec::new();
    for node in items(&nodes) {
        let name = format!("{}{}", text(&node["name"]), if node["this_node"] == true { " *" } else { "" });
        let version = if node["version_skew"] == true {
            skewed.push(format!("{} runs {}", text(&node["name"]), text(&node["version"])));
            format!("{} (differs)", text(&node["version"]))
        } else {
            text(&node["version"])
        };
        let status = match node["degraded"].as_str() {
            Some(reason) => format!("degraded ({reason})"),
            None => text(&node["status"]),
        };
        let models = list(&node["models"]);
        let cpu = format!(
            "{:.0}% of {}",
            node["usage"]["cpu_percent"].as_f64().unwrap_or(0.0),
            node["hardware"]["cores"]
        );
        let memory = format!(
            "{} / {}",
            gib(node["usage"]["memory_used_bytes"].as_u64()),
            gib(node["hardware"]["memory_bytes"].as_u64())
        );
        let gpu = node["hardware"]["gpu"].as_str().unwrap_or("-").to_string();
        let load = format!("{} running, {} queued", node["load"]["in_flight"], node["load"]["queued"]);
        rows.push(row([
            &name,
            &status,
            &version,
            &models,
            &cpu,
            &memory,
            &gpu,
            &load,
            &text(&node["peer_id"]),
        ]));
    }
    print_table(&rows);
    if !skewed.is_empty() {
        println!(
            "\nversion skew: {}; nodes of different versions share models only where their protocols match",
            skewed.join(", ")
        );
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub action: Option<ModelsAction>,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ModelsAction {
    /// Load a model on the running node, as `--model ID=PATH` does at start (a .gguf file, an
    /// embeddings folder, or hf:owner/repo/file). Waits, showing progress, until it serves.
    Load {
        /// ID=PATH: the name clients use, and where the model is on the node's machine.
        #[arg(value_name = "ID=PATH")]
        model: String,
        /// Return once the node has started loading instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop serving a model on the running node: new requests are refused at once, answers
    /// being generated finish first. Waits until it is gone.
    Unload {
        id: String,
        /// End the answers being generated now, with an error, instead of letting them finish.
        #[arg(long)]
        force: bool,
        /// Return once the node has started unloading instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
}

/// How often `models load` / `models unload` ask how far the node got.
const MODEL_POLL: Duration = Duration::from_millis(250);

pub fn models(args: &ModelsArgs) -> anyhow::Result<()> {
    match &args.action {
        None => list_models(&args.node),
        Some(ModelsAction::Load { model, no_wait }) => {
            let (id, path) =
                model.split_once('=').filter(|(id, path)| !id.is_empty() && !path.is_empty()).ok_or_else(
                    || anyhow!("expected ID=PATH, e.g. qwen=/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"),
                )?;
            let answer =
                send(&args.node, "POST", "/api/models", Some(serde_json::json!({"id": id, "path": path})))?;
            if *no_wait {
                return print_answer(&args.node, &answer, &format!("loading {id} from {path}"));
            }
            let ready = wait_for_model(&args.node, id, |state| {
                let Some(state) = state else { return Ok(None) };
                match state["state"].as_str() {
                    Some("ready") => Ok(Some(state.clone())),
                    Some("failed") => bail!("{id} did not load: {}", text(&state["error"])),
                    _ => {
                        if !args.node.json {
                            eprint!(
                                "\rloading {id}: {}% of {} MiB   ",
                                text(&state["percent"]).split('.').next().unwrap_or("0"),
                                state["total_bytes"].as_u64().unwrap_or(0) >> 20
                            );
                        }
                        Ok(None)
                    }
                }
            })?;
            if !args.node.json {
                eprintln!();
            }
            let info = &ready["info"];
            print_answer(
                &args.node,
                &ready,
                &format!(
                    "{id} is served: {} {}, {} parameters, context {}",
                    text(&info["architecture"]),
                    text(&info["quantization"]),
                    text(&info["parameters"]),
                    text(&info["context_length"])
                ),
            )
        }
        Some(ModelsAction::Unload { id, force, no_wait }) => {
            let path = format!("/api/models/{id}{}", if *force { "?force=true" } else { "" });
            let answer = send(&args.node, "DELETE", &path, None)?;
            if !*no_wait {
                wait_for_model(&args.node, id, |state| Ok(state.is_none().then_some(Value::Null)))?;
            }
            print_answer(&args.node, &answer, &format!("{id} is unloaded"))
        }
    }
}

/// Ask `/api/models` until `done` says the model `id` (its entry, or `None` once absent) is there.
fn wait_for_model(
    args: &NodeArgs,
    id: &str,
    mut done: impl FnMut(Option<&Value>) -> anyhow::Result<Option<Value>>,
) -> anyhow::Result<Value> {
    loop {
        let states = fetch(args, "/api/models")?;
        let states = items(&states);
        if let Some(finished) = done(states.iter().find(|state| state["id"] == id))? {
            return Ok(finished);
        }
        std::thread::sleep(MODEL_POLL);
    }
}

fn print_answer(args: &NodeArgs, answer: &Value, line: &str) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        println!("{line}");
    }
    Ok(())
}

fn list_models(args: &NodeArgs) -> anyhow::Result<()> {
    let models = fetch(args, "/v1/models")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    let mut rows = vec![row([
        "MODEL",
        "KIND",
        "ARCHITECTURE",
        "PARAMETERS",
        "QUANTIZATION",
        "SIZE",
        "CONTEXT",
        "HOSTS",
    ])];
    for model in items(&models) {
        let details = &model["llmesh"];
        let hosts: Vec<String> =
            details["hosts"].as_array().into_iter().flatten().map(|h| text(&h["name"])).collect();
        rows.push(row([
            &text(&model["id"]),
            &text(&details["kind"]),
            &text(&details["architecture"]),
            &human_count(details["parameters"].as_u64().unwrap_or(0)),
            &text(&details["quantization"]),
            &human_bytes(details["file_bytes"].as_u64().unwrap_or(0)),
            &text(&details["context_length"]),
            &hosts.join(", "),
        ]));
    }
    print_table(&rows);
    Ok(())
}

pub fn status(args: &NodeArgs) -> anyhow::Result<()> {
    let nodes = fetch(args, "/api/nodes")?;
    let models = fetch(args, "/v1/models")?;
    let stats = fetch(args, "/api/stats")?;
    if args.json {
        let all = serde_json::json!({"nodes": nodes, "models": models, "stats": stats});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let nodes = items(&nodes);
    if let Some(this) = nodes.iter().find(|node| node["this_node"] == true) {
        println!(
            "node {} ({}), llmesh {}",
            text(&this["name"]),
            text(&this["peer_id"]),
            text(&this["version"])
        );
    }
    let degraded: Vec<String> = nodes
        .iter()
        .filter_map(|node| {
            node["degraded"].as_str().map(|reason| format!("{}: {reason}", text(&node["name"])))
        })
        .collect();
    println!(
        "cluster: {} node(s) online, {} model(s), {}",
        nodes.iter().filter(|node| node["status"] != "offline").count(),
        items(&models).len(),
        if degraded.is_empty() {
            "all healthy".to_string()
        } else {
            format!("degraded: {}", degraded.join("; "))
        }
    );
    let mut rows =
        vec![row(["MODEL", "REQUESTS", "ERRORS", "RETRIES", "FAILOVERS", "TOKENS", "TTFT P50", "TOTAL P95"])];
    for (model, counters) in stats["models"].as_object().into_iter().flatten() {
        rows.push(row([
            model,
            &text(&counters["requests"]),
            &text(&counters["errors"]),
            &text(&counters["retries"]),
            &text(&counters["failovers"]),
            &text(&counters["tokens"]),
            &millis(&counters["first_token_ms"]["p50"]),
            &millis(&counters["total_ms"]["p95"]),
        ]));
    }
    if rows.len() > 1 {
        println!();
        print_table(&rows);
    }
    Ok(())
}

fn items(list: &Value) -> Vec<Value> {
    list["data"].as_array().cloned().unwrap_or_default()
}

/// A value from a node, as printed: what a terminal would act on (escape sequences, newlines)
/// is replaced, whoever put it there.
fn text(value: &Value) -> String {
    match value {
        Value::String(text) => crate::p2p::printable(text),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn list(value: &Value) -> String {
    let names: Vec<String> = value.as_array().into_iter().flatten().map(text).collect();
    if names.is_empty() { "-".into() } else { names.join(", ") }
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |bytes| format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64))
}

fn millis(value: &Value) -> String {
    value.as_f64().map_or("-".into(), |ms| format!("{ms:.0} ms"))
}

/// 134515008 → "135M"; 0 (unknown) → "-".
fn human_count(count: u64) -> String {
    match count {
        0 => "-".to_string(),
        1..1_000_000 => format!("{:.0}K", count as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.0}M", count as f64 / 1e6),
        _ => format!("{:.1}B", count as f64 / 1e9),
    }
}

/// Bytes in MiB or GiB; 0 (unknown) → "-".
fn human_bytes(bytes: u64) -> String {
    match bytes {
        0 => "-".to_string(),
        1..0x4000_0000 => format!("{} MiB", bytes.div_ceil(1 << 20)),
        _ => format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30)),
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|cell| cell.to_string()).collect()
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_nodes_are_printed_without_terminal_escapes() {
        let hostile = Value::String("laptop\u{1b}[2J\nfake line\u{202e}".into());
        let printed = text(&hostile);
        assert!(!printed.contains(['\u{1b}', '\n', '\u{202e}']), "{printed:?}");
        assert!(printed.starts_with("laptop"));
        assert_eq!(list(&serde_json::json!(["a\rb"])), "a\u{fffd}b");
    }
}
