//! Running the network-namespace scripts from `cargo test`: the script gets the binary cargo just
//! built, its MEASURE lines are printed, exit status 77 (no `ip netns` here) passes after saying it
//! was skipped, anything else but 0 fails with the script's output.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};

/// What a script's exit status 77 means: the machine cannot create network namespaces.
const SKIPPED: i32 = 77;

/// Run `scripts/<name>` against `binary` and judge its exit status.
pub fn run_script(name: &str, binary: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = format!("{root}/scripts/{name}");
    // One pipe for stdout and stderr keeps the script's lines and its tools' errors in order.
    let (mut reader, writer) = std::io::pipe().expect("cannot create a pipe");
    let mut child = Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .env("LLMESH_BIN", binary)
        .stdin(Stdio::null())
        .stdout(writer.try_clone().expect("cannot clone the pipe"))
        .stderr(writer)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {script}: {error}"));
    // The Command is gone and the child holds the only writers: the read ends when the script does.
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).expect("cannot read the script's output");
    let status = child.wait().expect("cannot wait for the script");
    let output = String::from_utf8_lossy(&bytes);

    for line in output.lines().filter(|line| line.starts_with("MEASURE ")) {
        println!("{line}");
    }
    match status.code() {
        Some(0) => {}
        Some(SKIPPED) => {
            let reason =
                output.lines().find_map(|line| line.strip_prefix("SKIP: ")).unwrap_or("no reason given");
            eprintln!("SKIPPED: {script}: {reason}");
        }
        _ => panic!("{script} failed ({status}):\n{output}"),
    }
}
