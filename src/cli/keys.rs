//! `llmesh keys create NAME [--models a,b] [--rate TOKENS_PER_MIN] [--requests-per-min N]
//! [--expires DURATION]`, `llmesh keys list`, `llmesh keys revoke NAME`: the cluster's API keys,
//! through a running node's `/api/keys` (its admin key in `--api-key`).

use anyhow::bail;
use serde_json::{Value, json};

use super::{NodeArgs, call, fetch, print_table, text};

#[derive(Debug, Clone, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysAction {
    /// Make a key that works on every node; its secret is printed once and kept nowhere.
    Create {
        /// 1 to 64 letters, digits, '.', '_' or '-' (shown in usage, logs and metrics).
        name: String,
        /// The models it may use, comma-separated [default: every model].
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Tokens (prompt and completion) per minute, counted across the cluster.
        #[arg(long, value_name = "TOKENS_PER_MIN")]
        rate: Option<u32>,
        /// Requests per minute, counted across the cluster.
        #[arg(long, value_name = "N")]
        requests_per_min: Option<u32>,
        /// How long it works: e.g. 90m, 12h, 30d, 2w.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<u64>,
    },
    /// List the keys, revoked ones included, with their use.
    List,
    /// Stop a key working, on every node.
    Revoke { name: String },
}

pub fn keys(args: &KeysArgs) -> anyhow::Result<()> {
    let node = &args.node;
    let answer = match &args.action {
        KeysAction::Create { name, models, rate, requests_per_min, expires } => {
            let body = json!({
                "name": name,
                "models": models,
                "tokens_per_minute": rate,
                "requests_per_minute": requests_per_min,
                "expires_in_seconds": expires,
            });
            call(node, "/api/keys", Some(body))?
        }
        KeysAction::List => fetch(node, "/api/keys")?,
        KeysAction::Revoke { name } => call(node, &format!("/api/keys/{name}/revoke"), Some(json!({})))?,
    };
    if node.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    match &args.action {
        KeysAction::Create { name, .. } => {
            println!("{}", text(&answer["secret"]));
            eprintln!(
                "made the key '{name}' ({}); the secret above is shown this once. It works on every \
                 node of the cluster within seconds.",
                limits(&answer)
            );
        }
        KeysAction::List => print_keys(&answer),
        KeysAction::Revoke { name } => match answer["newly_revoked"].as_bool() {
            Some(true) => println!("revoked '{name}': it stops working on every node within seconds"),
            _ => println!("'{name}' was already revoked"),
        },
    }
    Ok(())
}

fn print_keys(answer: &Value) {
    let mut rows = vec![
        ["NAME", "MODELS", "LIMITS", "EXPIRES", "STATE", "REQUESTS", "TOKENS"].map(String::from).to_vec(),
    ];
    let now = crate::p2p::unix_now();
    for key in answer["data"].as_array().into_iter().flatten() {
        let state = match (key["revoked_at"].as_u64(), key["expires_at"].as_u64()) {
            (Some(_), _) => "revoked",
            (None, Some(at)) if at <= now => "expired",
            _ => "active",
        };
        let usage = &key["usage"];
        let tokens =
            usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0);
        rows.push(vec![
            text(&key["name"]),
            models(key),
            limits(key),
            key["expires_at"].as_u64().map_or("never".into(), |at| in_words(at.saturating_sub(now))),
            state.into(),
            usage["requests"].as_u64().unwrap_or(0).to_string(),
            tokens.to_string(),
        ]);
    }
    print_table(&rows);
}

fn models(key: &Value) -> String {
    match key["models"].as_array() {
        Some(models) if !models.is_empty() => models.iter().map(text).collect::<Vec<_>>().join(","),
        _ => "all".into(),
    }
}

fn limits(key: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(requests) = key["requests_per_minute"].as_u64() {
        parts.push(format!("{requests} req/min"));
    }
    if let Some(tokens) = key["tokens_per_minute"].as_u64() {
        parts.push(format!("{tokens} tok/min"));
    }
    match parts.is_empty() {
        true => "no limits".into(),
        false => parts.join(", "),
    }
}

/// "in 3d", "in 5h", "in 12m", or "now".
fn in_words(seconds: u64) -> String {
    match seconds {
        0 => "now".into(),
        s if s >= 86_400 => format!("in {}d", s / 86_400),
        s if s >= 3_600 => format!("in {}h", s / 3_600),
        s => format!("in {}m", s.div_ceil(60)),
    }
}

/// `90s`, `45m`, `12h`, `30d`, `2w` in seconds.
fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let Ok(number) = number.parse::<u64>() else { bail!("'{text}' is not a duration such as 90m, 12h, 30d") };
    let unit_seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => bail!("'{text}': the unit must be s, m, h, d or w (e.g. 30d)"),
    };
    match number.checked_mul(unit_seconds) {
        Some(seconds) if seconds > 0 => Ok(seconds),
        _ => bail!("'{text}' is not a usable duration"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("45m").unwrap(), 2_700);
        assert_eq!(parse_duration("30d").unwrap(), 2_592_000);
        assert_eq!(parse_duration("2w").unwrap(), 1_209_600);
        for bad in ["", "d", "10", "10y", "0h", "-5m", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_and_models_are_summarised() {
        let key = json!({"models": ["a", "b"], "requests_per_minute": 5, "tokens_per_minute": null});
        assert_eq!((models(&key), limits(&key)), ("a,b".to_string(), "5 req/min".to_string()));
        assert_eq!((models(&json!({})), limits(&json!({}))), ("all".to_string(), "no limits".to_string()));
    }
}
