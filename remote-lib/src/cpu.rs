//! How much of this machine's CPU sat idle while a copy or a probe ran
//! (`/proc/stat`), so that compression is chosen only when a core is free to
//! compress with.

use std::time::Instant;

/// Cumulative CPU time of the whole machine, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// Idle and I/O-wait ticks, over every CPU.
    pub idle: u64,
    /// All ticks (user, nice, system, idle, iowait, irq, softirq, steal).
    pub total: u64,
    /// How many CPUs `/proc/stat` lists.
    pub cpus: u32,
}

/// Fewer ticks than this per CPU between two readings say too little (one
/// tick is 10 ms: the count is off by up to one tick per CPU).
const MIN_TICKS_PER_CPU: u64 = 4;

/// Parses `/proc/stat`: its aggregate `cpu` line and the number of `cpuN`
/// lines. `None` when the text is not in that form.
pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let mut lines = text.lines();
    let mut first = lines.next()?.split_ascii_whitespace();
    if first.next()? != "cpu" {
        return None;
    }
    let mut v = [0u64; 8];
    for x in v.iter_mut() {
        *x = first.next()?.parse().ok()?;
    }
    // user nice system idle iowait irq softirq steal (guest time is already
    // counted in user).
    let total = v.iter().try_fold(0u64, |a, x| a.checked_add(*x))?;
    let idle = v[3].checked_add(v[4])?;
    let cpus = lines.filter(|l| l.strip_prefix("cpu").and_then(|r| r.chars().next()).is_some_and(|c| c.is_ascii_digit())).count();
    let cpus = u32::try_from(cpus).ok().filter(|n| *n > 0)?;
    Some(CpuTimes { idle, total, cpus })
}

/// This machine's CPU times now (`None` without a readable `/proc/stat`).
pub fn now() -> Option<CpuTimes> {
    parse_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// How many CPUs' worth sat idle between two readings: `None` when too
/// little time passed to tell, or the readings do not fit together.
pub fn idle_cores(before: &CpuTimes, after: &CpuTimes) -> Option<f64> {
    if before.cpus != after.cpus {
        return None;
    }
    let dt = after.total.checked_sub(before.total)?;
    let di = after.idle.checked_sub(before.idle)?;
    if dt < MIN_TICKS_PER_CPU * u64::from(after.cpus) || di > dt {
        return None;
    }
    Some(di as f64 / dt as f64 * f64::from(after.cpus))
}

/// Wall time and idle CPU since it was started.
#[derive(Clone, Copy, Debug)]
pub struct Stopwatch {
    at: Instant,
    cpu: Option<CpuTimes>,
}

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch { cpu: now(), at: Instant::now() }
    }
    /// When it was started.
    pub fn started(&self) -> Instant {
        self.at
    }
    pub fn secs(&self) -> f64 {
        self.at.elapsed().as_secs_f64()
    }
    pub fn elapsed(&self) -> std::time::Duration {
        self.at.elapsed()
    }
    /// Idle CPUs on average since the start ([`idle_cores`]).
    pub fn idle_cores(&self) -> Option<f64> {
        idle_cores(self.cpu.as_ref()?, &now()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4705 150 1120 16250 520 0 25 3 0 0\ncpu0 2355 75 560 8125 260 0 12 1 0 0\ncpu1 2350 75 560 8125 260 0 13 2 0 0\nintr 1234\nctxt 99\n";

    #[test]
    fn reads_the_aggregate_line_and_counts_the_cpus() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(t, CpuTimes { idle: 16250 + 520, total: 4705 + 150 + 1120 + 16250 + 520 + 25 + 3, cpus: 2 });
        assert_eq!(parse_stat("intr 1\n"), None);
        assert_eq!(parse_stat("cpu 1 2 3\ncpu0 1 2 3\n"), None, "too few fields");
        assert_eq!(parse_stat("cpu 1 2 3 4 5 6 7 8\n"), None, "no cpuN line");
        assert_eq!(parse_stat("cpu 18446744073709551615 1 0 0 0 0 0 0\ncpu0 0\n"), None, "overflow");
    }

    #[test]
    fn idle_cores_over_an_interval() {
        let a = CpuTimes { idle: 1000, total: 2000, cpus: 2 };
        // 20 ticks passed on 2 CPUs, 5 of them idle: a quarter of 2 CPUs.
        let b = CpuTimes { idle: 1005, total: 2020, cpus: 2 };
        assert_eq!(idle_cores(&a, &b), Some(0.5));
        assert_eq!(idle_cores(&a, &CpuTimes { idle: 1020, total: 2020, cpus: 2 }), Some(2.0));
        assert_eq!(idle_cores(&a, &CpuTimes { idle: 1001, total: 2004, cpus: 2 }), None, "too short to tell");
        assert_eq!(idle_cores(&b, &a), None, "backwards");
        assert_eq!(idle_cores(&a, &CpuTimes { idle: 1005, total: 2020, cpus: 4 }), None);
    }

    #[test]
    fn this_machine_can_be_read() {
        let t = now().expect("/proc/stat");
        assert!(t.cpus >= 1 && t.idle <= t.total);
    }
}
