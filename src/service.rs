//! `llmesh service install|uninstall`: run a node as a systemd service that starts at boot and
//! restarts on failure, for the whole system or (`--user`) for one user.
//!
//! `install` writes two files: the node's configuration (TOML, mode 0600: it may hold the API key
//! and the cluster secret), from the `serve` flags given, and a unit that runs
//! `llmesh serve --config FILE`. Logs go to the journal (systemd takes the node's stderr). A
//! stop is a SIGTERM, which drains the node (see `Node::drain`); systemd waits the drain timeout
//! plus a margin before it kills it.
//!
//! | | system | `--user` |
//! |---|---|---|
//! | unit | `/etc/systemd/system/llmesh.service` | `$XDG_CONFIG_HOME/systemd/user/llmesh.service` |
//! | config | `/etc/llmesh/config.toml` | `$XDG_CONFIG_HOME/llmesh/config.toml` |
//! | data dir | `/var/lib/llmesh` (systemd's `StateDirectory`) | `$XDG_DATA_HOME/llmesh` |

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::Config;

pub const UNIT_NAME: &str = "llmesh.service";

/// Where a service's files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePaths {
    pub user: bool,
    pub unit: PathBuf,
    pub config: PathBuf,
    pub data_dir: PathBuf,
}

impl ServicePaths {
    /// The standard places, under `root` (`/` but in tests).
    pub fn new(user: bool, root: &Path) -> anyhow::Result<Self> {
        if !user {
            return Ok(Self {
                user,
                unit: root.join("etc/systemd/system").join(UNIT_NAME),
                config: root.join("etc/llmesh/config.toml"),
                data_dir: root.join("var/lib/llmesh"),
            });
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")?;
        let xdg = |variable: &str, fallback: &str| match std::env::var_os(variable) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => home.join(fallback),
        };
        let (config_home, data_home) =
            (xdg("XDG_CONFIG_HOME", ".config"), xdg("XDG_DATA_HOME", ".local/share"));
        let under_root = |path: PathBuf| root.join(path.strip_prefix("/").unwrap_or(&path));
        Ok(Self {
            user,
            unit: under_root(config_home.join("systemd/user").join(UNIT_NAME)),
            config: under_root(config_home.join("llmesh/config.toml")),
            data_dir: under_root(data_home.join("llmesh")),
        })
    }

    fn systemctl(&self) -> &'static str {
        if self.user { "systemctl --user" } else { "systemctl" }
    }

    fn journalctl(&self) -> &'static str {
        if self.user { "journalctl --user" } else { "journalctl" }
    }
}

/// The unit that runs `binary serve --config CONFIG`.
pub fn render_unit(binary: &Path, paths: &ServicePaths, drain_timeout_secs: u64) -> String {
    let config = paths.config.display();
    let mut unit = format!(
        "# Written by `llmesh service install`; `llmesh service uninstall` removes it.\n\
         [Unit]\n\
         Description=llmesh node (OpenAI-compatible API over the team's pooled machines)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         ExecStart={binary} serve --config {config}\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         # SIGTERM drains the node: it finishes its answers for up to drain_timeout, then exits.\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec={stop}\n",
        binary = binary.display(),
        stop = drain_timeout_secs + 15,
    );
    if paths.user {
        unit.push_str("\n[Install]\nWantedBy=default.target\n");
    } else {
        unit.push_str(
            "StateDirectory=llmesh\n\
             StateDirectoryMode=0700\n\
             NoNewPrivileges=yes\n\
             ProtectSystem=full\n\
             PrivateTmp=yes\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
        );
    }
    unit
}

/// The configuration as the service reads it: the data dir set, relative model paths made
/// absolute (a service does not start in the directory `install` ran in).
pub fn service_config(mut config: Config, paths: &ServicePaths) -> anyhow::Result<Config> {
    let here = std::env::current_dir().context("cannot read the current directory")?;
    if config.data_dir.is_none() {
        config.data_dir = Some(paths.data_dir.clone());
    }
    for model in &mut config.models {
        if !model.path.starts_with("hf:") && Path::new(&model.path).is_relative() {
            model.path = here.join(&model.path).display().to_string();
        }
    }
    Ok(config)
}

/// Write the configuration and the unit; the lines to print after.
pub fn install(binary: &Path, config: Config, paths: &ServicePaths) -> anyhow::Result<Vec<String>> {
    if !binary.is_absolute() {
        bail!("the binary's path must be absolute: {}", binary.display());
    }
    let config = service_config(config, paths)?;
    let unit = render_unit(binary, paths, config.drain_timeout);
    let toml = toml::to_string_pretty(&config).context("cannot write the configuration as TOML")?;
    write_file(&paths.config, toml.as_bytes(), 0o600)?;
    write_file(&paths.unit, unit.as_bytes(), 0o644)?;
    let (systemctl, journalctl) = (paths.systemctl(), paths.journalctl());
    Ok(vec![
        format!("wrote {} (the node's settings; edit it, then restart)", paths.config.display()),
        format!("wrote {}", paths.unit.display()),
        format!(
            "start it now and at every boot: {systemctl} daemon-reload && {systemctl} enable --now llmesh"
        ),
        format!("stop it (drains first):          {systemctl} stop llmesh"),
        format!("read its logs:                   {journalctl} -u llmesh -f"),
    ])
}

/// Remove the unit (the configuration and the data dir stay); the lines to print after.
pub fn uninstall(paths: &ServicePaths) -> anyhow::Result<Vec<String>> {
    match std::fs::remove_file(&paths.unit) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("no llmesh service is installed at {}", paths.unit.display())
        }
        Err(error) => return Err(error).with_context(|| format!("cannot remove {}", paths.unit.display())),
    }
    let systemctl = paths.systemctl();
    Ok(vec![
        format!("removed {}", paths.unit.display()),
        format!("if it was running: {systemctl} disable --now llmesh; {systemctl} daemon-reload"),
        format!(
            "kept {} and {} (remove them to forget the node's settings and identity)",
            paths.config.display(),
            paths.data_dir.display()
        ),
    ])
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let parent = path.parent().context("a file path without a folder")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = options.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    file.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
