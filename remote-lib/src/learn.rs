//! Learned speeds: from the build history, how fast each machine builds
//! relative to the others (the same derivation names built on several
//! machines), and how long each derivation name is expected to build. Pure:
//! the caller reads the records ([`crate::history::History::read_tail`]) and
//! hands them in.
//!
//! The rules, exactly (`docs/operations.md` says the same):
//!
//! - Only the last [`MAX_RECORDS`] records are used; of those only `built`
//!   ones with a finite build time. A derivation is keyed by system and name.
//! - Speed: per key and machine, the median build time of its last
//!   [`RECENT`] builds of at least [`MIN_BUILD_SECS`] (shorter ones measure
//!   the start-up, not the machine). A key built on ≥ 2 machines is
//!   *comparable*; its reference time is the geometric median (the median of
//!   the logarithms) of those machines' times, and each machine's ratio for
//!   it is reference ÷ own time (above 1: faster than the others). A
//!   machine's relative speed is the geometric median of its ratios, clamped
//!   to [1/16, 16]; it is *learned* once it comes from ≥ [`MIN_NAMES`]
//!   comparable keys, else the machine keeps its configured speed factor.
//! - Effective speed: a learned machine's relative speed scaled so that the
//!   learned machines of the list keep the geometric mean of their
//!   configured factors (the learned speeds replace the configured ones
//!   without changing their scale next to machines with none learned); any
//!   other machine's configured factor.
//! - Expected duration of a key: the median of its last [`RECENT`] builds
//!   (any length), each multiplied by the relative speed of the machine it
//!   ran on (1 when none is learned): the time on a machine of average
//!   speed. It is *long* from [`LONG_BUILD_SECS`].

use crate::history::Record;
use std::collections::BTreeMap;

/// Records used, newest last.
pub const MAX_RECORDS: usize = 2000;
/// Bytes of history read for them (a built record is about 400 bytes).
pub const MAX_BYTES: u64 = 1 << 20;
/// Builds per key (and machine) that count: the newest ones.
pub const RECENT: usize = 9;
/// Shorter builds do not measure a machine's speed.
pub const MIN_BUILD_SECS: f64 = 1.0;
/// Comparable derivation names a machine needs before its learned speed is used.
pub const MIN_NAMES: usize = 3;
/// A build expected to take this long (on a machine of average speed) is long.
pub const LONG_BUILD_SECS: f64 = 60.0;
/// Bounds of a relative speed.
const CLAMP: f64 = 16.0;

/// A derivation as the history knows it: system and name.
pub type Key = (String, String);

/// The key of a record.
pub fn key(r: &Record) -> Key {
    (r.system.clone(), r.name.clone())
}

/// What the history says about one machine's speed.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineSpeed {
    /// Relative to the other machines (1: as fast as their median).
    pub relative: f64,
    /// Comparable keys it was measured on.
    pub names: usize,
    /// Builds of those keys on this machine.
    pub builds: usize,
}

/// How long a key is expected to build.
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    /// Seconds on a machine of relative speed 1.
    pub secs: f64,
    /// Builds it comes from.
    pub builds: usize,
}

/// Which speed ranks a machine, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Speed {
    pub effective: f64,
    pub configured: f64,
    /// Set when the history's measure is used.
    pub learned: Option<MachineSpeed>,
}

impl std::fmt::Display for Speed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.learned {
            None => write!(f, "speed factor {} (configured)", self.configured),
            Some(l) => write!(f, "speed {:.2} (learned from {} builds of {} names; configured {})", self.effective, l.builds, l.names, self.configured),
        }
    }
}

/// What the history taught: machines' relative speeds and keys' durations.
#[derive(Clone, Debug, Default)]
pub struct Learned {
    /// Every machine with a comparable key, learned or not yet.
    machines: BTreeMap<String, MachineSpeed>,
    durations: BTreeMap<Key, Expected>,
}

impl Learned {
    /// Learns from `records` (oldest first; only the last [`MAX_RECORDS`] count).
    pub fn from_records(records: &[Record]) -> Learned {
        let records = &records[records.len().saturating_sub(MAX_RECORDS)..];
        let built = || records.iter().filter(|r| r.result == "built" && r.build_secs.is_finite() && r.build_secs >= 0.0);
        // key → machine → build times, oldest first
        let mut times: BTreeMap<Key, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
        for r in built().filter(|r| r.build_secs >= MIN_BUILD_SECS) {
            times.entry(key(r)).or_default().entry(r.machine.as_str()).or_default().push(r.build_secs);
        }
        // machine → (log ratios, builds)
        let mut ratios: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
        for per_machine in times.values().filter(|m| m.len() >= 2) {
            let own: Vec<(&str, f64, usize)> = per_machine.iter().map(|(m, t)| (*m, median(newest(t)).ln(), newest(t).len())).collect();
            let reference = median_of(own.iter().map(|o| o.1).collect());
            for (m, t, n) in own {
                let e = ratios.entry(m).or_default();
                e.0.push(reference - t);
                e.1 += n;
            }
        }
        let machines: BTreeMap<String, MachineSpeed> = ratios
            .into_iter()
            .map(|(m, (logs, builds))| {
                let names = logs.len();
                (m.to_string(), MachineSpeed { relative: median_of(logs).exp().clamp(1.0 / CLAMP, CLAMP), names, builds })
            })
            .collect();
        let rel = |m: &str| machines.get(m).filter(|s| s.names >= MIN_NAMES).map_or(1.0, |s| s.relative);
        let mut normalised: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
        for r in built() {
            normalised.entry(key(r)).or_default().push(r.build_secs * rel(&r.machine));
        }
        let durations = normalised
            .into_iter()
            .map(|(k, v)| {
                let v = newest(&v);
                (k, Expected { secs: median(v), builds: v.len() })
            })
            .collect();
        Learned { machines, durations }
    }

    /// A machine's learned relative speed, once it rests on enough names.
    pub fn relative(&self, uri: &str) -> Option<&MachineSpeed> {
        self.machines.get(uri).filter(|s| s.names >= MIN_NAMES)
    }

    /// The speed of each machine `(uri, configured factor)` of a list, in order.
    pub fn speeds(&self, machines: &[(&str, f64)]) -> Vec<Speed> {
        let learned: Vec<(f64, f64)> = machines.iter().filter_map(|(m, c)| self.relative(m).map(|s| (s.relative, *c))).collect();
        let geo = |v: &mut dyn Iterator<Item = f64>| {
            let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x.max(f64::MIN_POSITIVE).ln(), n + 1));
            if n == 0 {
                1.0
            } else {
                (sum / n as f64).exp()
            }
        };
        let scale = geo(&mut learned.iter().map(|l| l.1)) / geo(&mut learned.iter().map(|l| l.0));
        machines
            .iter()
            .map(|(m, c)| match self.relative(m) {
                Some(s) => Speed { effective: s.relative * scale, configured: *c, learned: Some(s.clone()) },
                None => Speed { effective: *c, configured: *c, learned: None },
            })
            .collect()
    }

    /// How long `key` is expected to build on a machine of average speed.
    pub fn expected(&self, key: &Key) -> Option<&Expected> {
        self.durations.get(key)
    }

    /// Whether `key` is a long build by its history.
    pub fn is_long(&self, key: &Key) -> bool {
        self.expected(key).is_some_and(|e| e.secs >= LONG_BUILD_SECS)
    }

    /// Expected seconds of `key` on machine `uri` (its relative speed applied).
    pub fn expected_on(&self, key: &Key, uri: &str) -> Option<f64> {
        self.expected(key).map(|e| e.secs / self.relative(uri).map_or(1.0, |s| s.relative))
    }
}

/// The newest [`RECENT`] of `v` (oldest first).
fn newest(v: &[f64]) -> &[f64] {
    &v[v.len().saturating_sub(RECENT)..]
}

fn median(v: &[f64]) -> f64 {
    median_of(v.to_vec())
}

/// The median (the mean of the middle two for an even count); 0 when empty.
pub(crate) fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(machine: &str, name: &str, secs: f64) -> Record {
        Record { name: name.into(), system: "x86_64-linux".into(), machine: machine.into(), build_secs: secs, result: "built".into(), ..Default::default() }
    }
    fn k(name: &str) -> Key {
        ("x86_64-linux".into(), name.into())
    }

    /// `names` derivations, each built on a (`fast` s) and b (`slow` s).
    fn pairs(names: usize, fast: f64, slow: f64) -> Vec<Record> {
        (0..names).flat_map(|i| [built("ssh://a", &format!("p{i}"), fast * (i + 1) as f64), built("ssh://b", &format!("p{i}"), slow * (i + 1) as f64)]).collect()
    }

    #[test]
    fn too_few_samples_keep_the_configured_factor() {
        let l = Learned::from_records(&pairs(MIN_NAMES - 1, 10.0, 20.0));
        assert_eq!(l.relative("ssh://a"), None);
        let s = l.speeds(&[("ssh://a", 1.0), ("ssh://b", 3.0)]);
        assert_eq!(s[0], Speed { effective: 1.0, configured: 1.0, learned: None });
        assert_eq!(s[1].effective, 3.0);
        assert_eq!(s[0].to_string(), "speed factor 1 (configured)");
        // Builds on one machine only compare with nothing.
        let one: Vec<Record> = (0..10).map(|i| built("ssh://a", &format!("p{i}"), 30.0)).collect();
        assert!(Learned::from_records(&one).speeds(&[("ssh://a", 2.0)])[0].learned.is_none());
    }

    #[test]
    fn a_machine_twice_as_fast_gets_twice_the_speed_on_the_configured_scale() {
        let l = Learned::from_records(&pairs(4, 10.0, 20.0));
        let (a, b) = (l.relative("ssh://a").unwrap(), l.relative("ssh://b").unwrap());
        assert!((a.relative / b.relative - 2.0).abs() < 1e-9, "{a:?} {b:?}");
        assert_eq!((a.names, a.builds), (4, 4));
        let s = l.speeds(&[("ssh://a", 1.0), ("ssh://b", 1.0), ("ssh://c", 5.0)]);
        assert!((s[0].effective - 2f64.sqrt()).abs() < 1e-9 && (s[1].effective - 1.0 / 2f64.sqrt()).abs() < 1e-9, "{s:?}");
        assert!(s[2].learned.is_none() && s[2].effective == 5.0, "no history: configured");
        assert_eq!(s[0].to_string(), "speed 1.41 (learned from 4 builds of 4 names; configured 1)");
        // Configured 4 and 1, measured 2x: the scale (geometric mean 2) stays, the ratio is the measured one.
        let s = l.speeds(&[("ssh://a", 4.0), ("ssh://b", 1.0)]);
        assert!((s[0].effective - 2.0 * 2f64.sqrt()).abs() < 1e-9 && (s[1].effective - 2f64.sqrt()).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn outliers_short_builds_and_failures_are_ignored() {
        let mut rs = pairs(5, 10.0, 20.0);
        // one stalled build of p0 on a among its normal ones: the median holds
        rs.extend([built("ssh://a", "p0", 10.0), built("ssh://a", "p0", 5000.0), built("ssh://a", "p0", 10.0)]);
        // one name where b was far faster (say, a cache warm there): outvoted by the other four
        rs.extend([built("ssh://a", "odd", 100.0), built("ssh://b", "odd", 1.0)]);
        // failures and lost attempts, however long, count for nothing
        for result in ["failed", "lost", "refused", "local"] {
            rs.push(Record { result: result.into(), ..built("ssh://a", "p1", 9999.0) });
        }
        // sub-second builds measure the start-up: b is not faster at them
        rs.extend((0..5).flat_map(|i| [built("ssh://a", &format!("t{i}"), 0.5), built("ssh://b", &format!("t{i}"), 0.1)]));
        let l = Learned::from_records(&rs);
        let (a, b) = (l.relative("ssh://a").unwrap(), l.relative("ssh://b").unwrap());
        assert!((a.relative / b.relative - 2.0).abs() < 1e-9, "{a:?} {b:?}");
        assert_eq!(a.names, 6);
        assert_eq!(l.expected(&k("p1")).unwrap().builds, 2, "the failed attempts are not durations");
    }

    #[test]
    fn expected_durations_are_normalised_by_the_machine_that_built() {
        let mut rs = pairs(3, 10.0, 20.0);
        // "big" built only on a (the fast one, relative √2): 50 s there is ≈70.7 s at average speed.
        rs.extend([built("ssh://a", "big", 50.0), built("ssh://a", "big", 50.0)]);
        let l = Learned::from_records(&rs);
        let e = l.expected(&k("big")).unwrap();
        assert!((e.secs - 50.0 * 2f64.sqrt()).abs() < 1e-9 && e.builds == 2, "{e:?}");
        assert!(l.is_long(&k("big")));
        assert!((l.expected_on(&k("big"), "ssh://b").unwrap() - 100.0).abs() < 1e-9);
        assert!(!l.is_long(&k("p0")), "p0 takes 10 s and 20 s");
        assert!(!l.is_long(&k("never-built")));
        assert_eq!(l.expected(&("aarch64-linux".into(), "big".into())), None, "another system is another derivation");
    }

    #[test]
    fn only_the_newest_records_count() {
        // Long ago a was slow; the newest MAX_RECORDS say it is 2x faster.
        let mut rs: Vec<Record> = (0..MAX_RECORDS).map(|i| built("ssh://a", &format!("p{}", i % 5), 40.0)).collect();
        rs.extend((0..MAX_RECORDS / 2).flat_map(|i| [built("ssh://a", &format!("p{}", i % 5), 10.0), built("ssh://b", &format!("p{}", i % 5), 20.0)]));
        let l = Learned::from_records(&rs);
        let (a, b) = (l.relative("ssh://a").unwrap(), l.relative("ssh://b").unwrap());
        assert!((a.relative / b.relative - 2.0).abs() < 1e-9, "{a:?} {b:?}");
    }
}
