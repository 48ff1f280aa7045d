//! What this machine has: CPU model and cores, memory, and the GPU where one can be read
//! (`nvidia-smi` for NVIDIA cards). Probed once at start; announced to the cluster.

use crate::p2p::Hardware;

pub fn probe() -> Hardware {
    let mut hardware = Hardware::default();
    match sysinfo::System::new_all() {
        Ok(system) => {
            hardware.cpu =
                system.cpus().first().map(|cpu| cpu.brand().trim().to_string()).unwrap_or_default();
            hardware.cores = system.cpus().len() as u32;
            hardware.memory_bytes = system.total_memory();
        }
        Err(error) => tracing::warn!(%error, "cannot read the machine's hardware"),
    }
    if hardware.cpu.is_empty() {
        hardware.cpu = std::env::consts::ARCH.to_string();
    }
    if let Some((name, memory)) = nvidia_gpu() {
        hardware.gpu = Some(name);
        hardware.gpu_memory_bytes = Some(memory);
    }
    hardware
}

/// The name of this machine, for `--name`'s default.
pub fn host_name() -> String {
    sysinfo::System::host_name()
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "llmesh-node".to_string())
}

/// The first NVIDIA GPU's name and memory in bytes, if `nvidia-smi` can tell.
fn nvidia_gpu() -> Option<(String, u64)> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let (name, mebibytes) = text.lines().next()?.split_once(',')?;
    Some((name.trim().to_string(), mebibytes.trim().parse::<u64>().ok()? * 1024 * 1024))
}
