//! Memory and file-descriptor samples of running agents, and whether they
//! grow after warm-up.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One agent's resident memory (KiB) and open descriptors at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the soak began.
    pub at_s: f64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// Entries in /proc/PID/fd.
    pub fds: u64,
}

/// Reads `pid`'s resident memory and descriptor count from /proc.
pub fn sample(pid: u32, at_s: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample { at_s, rss_kib, fds })
}

/// Growth limits: after warm-up, the median of the last quarter of the
/// samples may exceed the median of the first quarter by at most this.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Allowed memory growth, as a fraction of the warm memory.
    pub rss_fraction: f64,
    /// Allowed memory growth in KiB on top (allocator noise on a small heap).
    pub rss_slack_kib: u64,
    /// Allowed extra descriptors.
    pub fds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { rss_fraction: 0.10, rss_slack_kib: 4096, fds: 8 }
    }
}

/// One agent's verdict.
#[derive(Debug, Clone)]
pub struct Growth {
    /// Median RSS of the first warm quarter, KiB.
    pub rss_start_kib: u64,
    /// Median RSS of the last quarter, KiB.
    pub rss_end_kib: u64,
    /// Largest RSS seen, KiB.
    pub rss_max_kib: u64,
    /// Median descriptors of the first warm quarter.
    pub fds_start: u64,
    /// Median descriptors of the last quarter.
    pub fds_end: u64,
    /// Whether both stayed within the limits.
    pub within: bool,
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Judges one agent's samples taken after `warmup_s`.
pub fn growth(samples: &[Sample], warmup_s: f64, limits: Limits) -> Option<Growth> {
    let warm: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= warmup_s).collect();
    if warm.len() < 4 {
        return None;
    }
    let quarter = warm.len() / 4;
    let (first, last) = (&warm[..quarter], &warm[warm.len() - quarter..]);
    let rss_start_kib = median(first.iter().map(|s| s.rss_kib).collect());
    let rss_end_kib = median(last.iter().map(|s| s.rss_kib).collect());
    let fds_start = median(first.iter().map(|s| s.fds).collect());
    let fds_end = median(last.iter().map(|s| s.fds).collect());
    let allowed_rss = rss_start_kib + (rss_start_kib as f64 * limits.rss_fraction) as u64 + limits.rss_slack_kib;
    Some(Growth {
        rss_start_kib,
        rss_end_kib,
        rss_max_kib: warm.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        fds_start,
        fds_end,
        within: rss_end_kib <= allowed_rss && fds_end <= fds_start + limits.fds,
    })
}

/// The per-agent growth table.
pub fn table(verdicts: &BTreeMap<String, Option<Growth>>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  agent      RSS warm   RSS end    RSS max    fds warm  fds end  verdict");
    for (name, verdict) in verdicts {
        match verdict {
            Some(g) => {
                let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
                let _ = writeln!(
                    out,
                    "  {name:<10} {:<10} {:<10} {:<10} {:<9} {:<8} {}",
                    mib(g.rss_start_kib),
                    mib(g.rss_end_kib),
                    mib(g.rss_max_kib),
                    g.fds_start,
                    g.fds_end,
                    if g.within { "flat" } else { "GROWS" }
                );
            }
            None => {
                let _ = writeln!(out, "  {name:<10} too few samples after warm-up");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: impl Fn(usize) -> u64, fds: impl Fn(usize) -> u64) -> Vec<Sample> {
        (0..40).map(|i| Sample { at_s: i as f64, rss_kib: rss(i), fds: fds(i) }).collect()
    }

    #[test]
    fn flat_memory_with_noise_passes_and_a_leak_does_not() {
        let flat = series(|i| 40_000 + (i as u64 * 7919) % 900, |_| 30);
        assert!(growth(&flat, 5.0, Limits::default()).expect("enough samples").within);
        let leak = series(|i| 40_000 + i as u64 * 400, |_| 30);
        assert!(!growth(&leak, 5.0, Limits::default()).expect("enough samples").within);
        let fd_leak = series(|_| 40_000, |i| 30 + i as u64);
        assert!(!growth(&fd_leak, 5.0, Limits::default()).expect("enough samples").within);
    }

    #[test]
    fn samples_before_warmup_do_not_count() {
        let warming = series(|i| if i < 10 { 10_000 } else { 40_000 }, |_| 30);
        assert!(growth(&warming, 10.0, Limits::default()).expect("enough samples").within);
        assert!(growth(&warming[..3], 0.0, Limits::default()).is_none());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = sample(std::process::id(), 0.0).expect("own /proc entry");
        assert!(me.rss_kib > 0 && me.fds > 0);
    }
}
