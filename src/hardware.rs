//! What this machine has: CPU model and cores, memory, and the GPU where one can be read
//! (`nvidia-smi` for NVIDIA cards). Probed once at start; announced to the cluster.

use crate::p2p::{Hardware, ResourceUsage};

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

/// Samples the machine's CPU and memory use (and the first NVIDIA GPU's, where `nvidia-smi`
/// answers). CPU use is measured between two samples, so the first one reads 0.
pub struct UsageSampler {
    system: Option<sysinfo::System>,
    gpu: bool,
}

impl UsageSampler {
    pub fn new(hardware: &Hardware) -> Self {
        Self { system: sysinfo::System::new().ok(), gpu: hardware.gpu.is_some() }
    }

    /// Blocking for the GPU query: call from a blocking thread.
    pub fn sample(&mut self) -> ResourceUsage {
        let mut usage = ResourceUsage::default();
        if let Some(system) = &mut self.system {
            system.refresh_cpu_usage();
            system.refresh_memory();
            usage.cpu_percent = system.global_cpu_usage();
            usage.memory_used_bytes = system.used_memory();
        }
        if self.gpu
            && let Some((percent, used)) = nvidia_gpu_usage()
        {
            usage.gpu_percent = Some(percent);
            usage.gpu_memory_used_bytes = Some(used);
        }
        usage
    }
}

fn nvidia_gpu_usage() -> Option<(f32, u64)> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let (percent, mebibytes) = text.lines().next()?.split_once(',')?;
    Some((percent.trim().parse().ok()?, mebibytes.trim().parse::<u64>().ok()? * 1024 * 1024))
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
