//! `llmesh --version` names the release and the git commit the binary was built from.

use std::process::Command;

#[test]
fn the_version_names_the_release_and_the_commit() {
    let output = Command::new(env!("CARGO_BIN_EXE_llmesh")).arg("--version").output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map_or_else(
            || "unknown".to_string(),
            |output| String::from_utf8(output.stdout).unwrap().trim().to_string(),
        );
    let expected = format!("llmesh {} (commit {commit})\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(printed, expected);
}
