//! `llmesh service install|uninstall`: the files written under a scratch root, the config read
//! back as `serve --config` reads it, and the units checked by `systemd-analyze verify` (installed
//! by scripts/test.sh; skipped with a note where there is no systemd).

use std::path::{Path, PathBuf};
use std::process::Command;

use llmesh::config::{Config, ModelEntry};
use llmesh::service::{self, ServicePaths};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llmesh"))
}

/// `systemd-analyze verify` on `unit`: no error and not a single warning.
fn verify(unit: &Path) {
    let Ok(output) = Command::new("systemd-analyze").arg("verify").arg(unit).output() else {
        eprintln!("skipped: no systemd-analyze here (Debian package systemd)");
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.trim().is_empty(), "{}: {stderr}", unit.display());
}

#[test]
fn a_system_service_runs_serve_with_its_config_and_verifies() {
    let root = tempfile::tempdir().unwrap();
    let paths = ServicePaths::new(false, root.path()).unwrap();
    assert_eq!(paths.unit, root.path().join("etc/systemd/system/llmesh.service"));
    let config = Config {
        api_key: Some("team-secret".into()),
        models: vec![
            ModelEntry { id: "smol".into(), path: "models/smol.gguf".into() },
            ModelEntry { id: "hub".into(), path: "hf:owner/repo/file.gguf".into() },
        ],
        drain_timeout: 60,
        ..Config::default()
    };
    let lines = service::install(&binary(), config.clone(), &paths).unwrap();
    assert!(
        lines.iter().any(|line| line.contains("systemctl daemon-reload && systemctl enable --now llmesh"))
    );
    assert!(lines.iter().any(|line| line.contains("journalctl -u llmesh")));

    let unit = std::fs::read_to_string(&paths.unit).unwrap();
    let exec = format!("ExecStart={} serve --config {}", binary().display(), paths.config.display());
    assert!(unit.contains(&exec), "{unit}");
    for line in [
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=75",
        "StateDirectory=llmesh",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing from\n{unit}");
    }
    verify(&paths.unit);

    // The config holds secrets: only its owner reads it. `serve --config` reads it back whole.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&paths.config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let read = Config::from_file(&paths.config).unwrap();
    assert_eq!(read, service::service_config(config, &paths).unwrap());
    assert_eq!(read.data_dir.as_deref(), Some(root.path().join("var/lib/llmesh").as_path()));
    let here = std::env::current_dir().unwrap();
    assert_eq!(read.models[0].path, here.join("models/smol.gguf").display().to_string());
    assert_eq!(read.models[1].path, "hf:owner/repo/file.gguf");

    let removed = service::uninstall(&paths).unwrap();
    assert!(removed[0].starts_with("removed"));
    assert!(!paths.unit.exists());
    assert!(paths.config.exists(), "uninstall keeps the settings");
    let again = service::uninstall(&paths).unwrap_err().to_string();
    assert!(again.contains("no llmesh service is installed"), "{again}");
}

#[test]
fn a_user_service_starts_with_the_session_and_verifies() {
    let root = tempfile::tempdir().unwrap();
    let paths = ServicePaths {
        user: true,
        unit: root.path().join("config/systemd/user/llmesh.service"),
        config: root.path().join("config/llmesh/config.toml"),
        data_dir: root.path().join("data/llmesh"),
    };
    let lines = service::install(&binary(), Config::default(), &paths).unwrap();
    assert!(lines.iter().any(|line| line.contains("systemctl --user daemon-reload")));
    let unit = std::fs::read_to_string(&paths.unit).unwrap();
    assert!(unit.lines().any(|line| line == "WantedBy=default.target"), "{unit}");
    assert!(!unit.contains("StateDirectory"), "a user service keeps its data in XDG_DATA_HOME");
    verify(&paths.unit);
    assert_eq!(Config::from_file(&paths.config).unwrap().data_dir, Some(paths.data_dir.clone()));
}

#[test]
fn a_relative_binary_path_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let paths = ServicePaths::new(false, root.path()).unwrap();
    let error = service::install(Path::new("llmesh"), Config::default(), &paths).unwrap_err();
    assert!(error.to_string().contains("absolute"), "{error}");
}
