//! GPU telemetry from NVML. On a machine without the NVIDIA driver (or
//! without a GPU) NVML does not load; the node then reports no GPUs, says so
//! once in the log, and carries on.

use llmesh_proto::GpuInfo;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;

/// Reads GPU figures, or nothing where there is no NVIDIA GPU.
pub struct GpuProbe {
    nvml: Option<Nvml>,
}

impl GpuProbe {
    /// Tries to load NVML once.
    pub fn new() -> GpuProbe {
        match Nvml::init() {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                tracing::info!(gpus = count, "NVML loaded");
                GpuProbe { nvml: Some(nvml) }
            }
            Err(err) => {
                tracing::info!(reason = %err, "no NVIDIA GPU: GPU figures will be reported as absent");
                GpuProbe { nvml: None }
            }
        }
    }

    /// Whether NVML is available.
    pub fn present(&self) -> bool {
        self.nvml.is_some()
    }

    /// Current figures of every GPU; empty without NVML. A GPU whose
    /// figures cannot be read is skipped (logged at debug, since it would
    /// repeat every second).
    pub fn read(&self) -> Vec<GpuInfo> {
        let Some(nvml) = &self.nvml else { return Vec::new() };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let read = || -> Result<GpuInfo, nvml_wrapper::error::NvmlError> {
                    let device = nvml.device_by_index(index)?;
                    let memory = device.memory_info()?;
                    Ok(GpuInfo {
                        name: device.name()?,
                        utilization_percent: device.utilization_rates()?.gpu,
                        memory_used_bytes: memory.used,
                        memory_total_bytes: memory.total,
                        temperature_c: device.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                    })
                };
                read().map_err(|e| tracing::debug!(index, error = %e, "cannot read GPU")).ok()
            })
            .collect()
    }
}

impl Default for GpuProbe {
    fn default() -> Self {
        GpuProbe::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These machines have no NVIDIA driver: the probe must degrade to "no
    /// GPU" rather than fail. (On a GPU box it reports what NVML sees.)
    #[test]
    fn degrades_to_no_gpu_without_the_driver() {
        let probe = GpuProbe::new();
        let gpus = probe.read();
        if probe.present() {
            assert!(gpus.iter().all(|g| g.memory_total_bytes > 0));
        } else {
            assert!(gpus.is_empty());
        }
    }
}
