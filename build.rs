//! Stamps the binary with the git commit it was built from (`llmesh --version`), or "unknown"
//! outside a git checkout (a source tarball, `cargo install` from crates.io).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok().filter(|output| output.status.success())?;
    Some(String::from_utf8_lossy(&output.stdout).trim().to_string()).filter(|text| !text.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LLMESH_COMMIT={commit}");
    // Every commit and checkout appends to the log of HEAD (a worktree has its own git dir).
    // When git could not be asked (busy, missing) in a checkout, watch `.git` itself: otherwise
    // "unknown" would stay cached until build.rs changed.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/logs/HEAD");
    } else if std::path::Path::new(".git").exists() {
        println!("cargo:rerun-if-changed=.git");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
