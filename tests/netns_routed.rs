//! Nodes on "hosts" in two subnets joined by a router (Linux network namespaces; multicast does not
//! cross the router) join with a connection key, route requests both ways, rejoin after a restart,
//! are refused a used or expired key and are thrown out by revocation:
//! `scripts/netns-routed.sh` does the work, this test runs it on the binary cargo just built. The
//! script needs root for `ip netns`; where it cannot have that it exits 77 and the test passes
//! after saying it was skipped.

use std::io::Read;
use std::process::{Command, Stdio};

/// What the script's exit status 77 means: the machine cannot create network namespaces.
const SKIPPED: i32 = 77;

#[test]
fn nodes_join_across_a_router_with_a_connection_key_and_are_revoked() {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = format!("{root}/scripts/netns-routed.sh");
    // One pipe for stdout and stderr keeps the script's lines and its tools' errors in order.
    let (mut reader, writer) = std::io::pipe().expect("cannot create a pipe");
    let mut child = Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .env("LLMESH_BIN", env!("CARGO_BIN_EXE_llmesh"))
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
