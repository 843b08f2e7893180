//! Replays a recorded build history on a list of machines under a ranking
//! rule — Nix's, or the learned one ([`crate::learn`]) — and reports the
//! makespan. Pure: records, machines and what was learned are handed in.
//!
//! The model: every `built` record is one job, arriving when its `try`
//! began (`start - slot_wait`), or all at once in that order (a bulk build
//! of the same derivations), and queued first come, first served while no
//! machine for its system has a free slot. A job occupies one slot for its
//! build time on the machine it is given: the median of that name's recorded
//! builds there, else its recorded time scaled by the two machines' learned
//! relative speeds (1 when not learned). Uploads, downloads and dependencies
//! between builds are not modelled; the learned rule knows the whole
//! history it replays (an in-sample comparison).

use crate::history::Record;
use crate::learn::{self, Key, Learned};
use crate::select::{self, Candidate};
use std::collections::{BTreeMap, VecDeque};

/// A machine of the list, as the simulation needs it.
#[derive(Clone, Debug)]
pub struct SimMachine {
    pub uri: String,
    pub systems: Vec<String>,
    pub slots: u64,
    /// The configured speed factor.
    pub speed: f64,
}

/// Which ranking the replay uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Nix's: lowest load/speed by the configured factors ([`select::best`]).
    Nix,
    /// Learned speeds, long builds to the fastest free machine ([`select::best_for`]).
    Learned,
}

/// When the jobs arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrivals {
    /// When their `try` began, as recorded.
    Recorded,
    /// All at the first one's time, in the recorded order.
    AtOnce,
}

/// What a replay gives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Jobs replayed.
    pub builds: usize,
    /// Recorded builds no machine of the list builds (their system).
    pub skipped: usize,
    /// From the first arrival to the last build's end, in seconds.
    pub makespan: f64,
    /// Mean seconds from a job's arrival to its end (waiting included).
    pub mean_turnaround: f64,
    /// Builds given to each machine, in list order.
    pub per_machine: Vec<usize>,
}

struct Job {
    arrival: f64,
    key: Key,
    machine: String,
    secs: f64,
}

/// Replays `records` on `machines` under `rule`.
pub fn simulate(records: &[Record], machines: &[SimMachine], learned: &Learned, rule: Rule, arrivals: Arrivals) -> Outcome {
    let builds_on = |m: &SimMachine, system: &str| m.slots > 0 && (system.is_empty() || system == "builtin" || m.systems.iter().any(|s| s == system));
    let mut jobs: Vec<Job> = Vec::new();
    let mut out = Outcome { per_machine: vec![0; machines.len()], ..Default::default() };
    let mut recorded: BTreeMap<(Key, &str), Vec<f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.result == "built" && r.build_secs.is_finite() && r.build_secs >= 0.0) {
        recorded.entry((learn::key(r), r.machine.as_str())).or_default().push(r.build_secs);
        if machines.iter().any(|m| builds_on(m, &r.system)) {
            jobs.push(Job { arrival: r.start - r.slot_wait, key: learn::key(r), machine: r.machine.clone(), secs: r.build_secs });
        } else {
            out.skipped += 1;
        }
    }
    jobs.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    out.builds = jobs.len();
    let Some(first) = jobs.first().map(|j| j.arrival) else { return out };
    if arrivals == Arrivals::AtOnce {
        for j in &mut jobs {
            j.arrival = first;
        }
    }
    let rel = |uri: &str| learned.relative(uri).map_or(1.0, |s| s.relative);
    let duration = |j: &Job, m: &SimMachine| match recorded.get(&(j.key.clone(), m.uri.as_str())) {
        Some(v) => median(v),
        None => j.secs * rel(&j.machine) / rel(&m.uri),
    };
    let speeds: Vec<f64> = match rule {
        Rule::Nix => machines.iter().map(|m| m.speed).collect(),
        Rule::Learned => learned.speeds(&machines.iter().map(|m| (m.uri.as_str(), m.speed)).collect::<Vec<_>>()).iter().map(|s| s.effective).collect(),
    };
    // Each machine's running builds, by the time they end.
    let mut running: Vec<Vec<f64>> = vec![Vec::new(); machines.len()];
    let mut queue: VecDeque<usize> = VecDeque::new();
    let (mut next, mut t, mut end, mut turnaround) = (0, first, first, 0.0);
    loop {
        for r in &mut running {
            r.retain(|e| *e > t);
        }
        while next < jobs.len() && jobs[next].arrival <= t {
            queue.push_back(next);
            next += 1;
        }
        let mut i = 0;
        while i < queue.len() {
            let j = &jobs[queue[i]];
            let cands: Vec<Candidate> = machines
                .iter()
                .enumerate()
                .filter(|(k, m)| builds_on(m, &j.key.0) && (running[*k].len() as u64) < m.slots)
                .map(|(k, _)| Candidate { index: k, load: running[k].len() as u64, speed: speeds[k] })
                .collect();
            let pick = match rule {
                Rule::Nix => select::best(&cands),
                Rule::Learned => select::best_for(&cands, learned.is_long(&j.key)),
            };
            match pick {
                Some(c) => {
                    let e = t + duration(j, &machines[c.index]);
                    running[c.index].push(e);
                    out.per_machine[c.index] += 1;
                    end = end.max(e);
                    turnaround += e - j.arrival;
                    queue.remove(i);
                }
                None => i += 1,
            }
        }
        let soonest_end = running.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let arrival = jobs.get(next).map_or(f64::INFINITY, |j| j.arrival);
        t = soonest_end.min(arrival);
        if !t.is_finite() {
            break;
        }
    }
    out.makespan = end - first;
    out.mean_turnaround = turnaround / jobs.len() as f64;
    out
}

fn median(v: &[f64]) -> f64 {
    crate::learn::median_of(v.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(machine: &str, name: &str, start: f64, secs: f64) -> Record {
        Record { start, name: name.into(), system: "x86_64-linux".into(), machine: machine.into(), build_secs: secs, result: "built".into(), ..Default::default() }
    }
    fn machine(uri: &str, slots: u64, speed: f64) -> SimMachine {
        SimMachine { uri: uri.into(), systems: vec!["x86_64-linux".into()], slots, speed }
    }
    fn both(rs: &[Record], ms: &[SimMachine]) -> (Outcome, Outcome) {
        let l = Learned::from_records(rs);
        (simulate(rs, ms, &l, Rule::Nix, Arrivals::Recorded), simulate(rs, ms, &l, Rule::Learned, Arrivals::Recorded))
    }

    /// a and b configured equal; b measured twice as fast on three names
    /// (one at a time, far apart); then a long build and two short ones
    /// arrive together.
    fn history() -> Vec<Record> {
        let mut rs = Vec::new();
        for (i, n) in ["p0", "p1", "p2"].iter().enumerate() {
            rs.push(built("ssh://a", n, 1000.0 * i as f64, 20.0));
            rs.push(built("ssh://b", n, 1000.0 * i as f64 + 500.0, 10.0));
        }
        rs.push(built("ssh://b", "big", 3000.0, 100.0));
        rs.push(built("ssh://a", "small0", 3000.0, 6.0));
        rs.push(built("ssh://b", "small1", 3000.0, 3.0));
        rs
    }

    #[test]
    fn learned_speeds_shorten_the_replay_when_a_machine_is_faster_than_configured() {
        let ms = [machine("ssh://a", 1, 1.0), machine("ssh://b", 1, 1.0)];
        let (nix, learned) = both(&history(), &ms);
        // Nix: each p alone goes to a (list order, 20 s); at 3000 "big" takes a
        // (200 s there), small0 b (3 s at b's speed), small1 waits for b.
        assert_eq!(nix.per_machine, vec![7, 2]);
        assert_eq!(nix.builds, 9);
        assert!((nix.makespan - 3200.0).abs() < 1e-9, "{nix:?}");
        // Learned: b (effective √2 against a's 1/√2) takes each p (10 s) and
        // "big" (100 s ≥ 60 s: the fastest free machine); the small ones go
        // to a then wait for it.
        assert!((learned.makespan - 3100.0).abs() < 1e-9, "{learned:?}");
        assert_eq!(learned.per_machine, vec![2, 7]);
        // Turnaround: p 20 s each x6, big 200, small0 3, small1 6 (waited 3) against
        // p 10 s x6, big 100, small0 6, small1 12 (waited 6 for a).
        assert!((nix.mean_turnaround - 329.0 / 9.0).abs() < 1e-9, "{nix:?}");
        assert!((learned.mean_turnaround - 178.0 / 9.0).abs() < 1e-9, "{learned:?}");
    }

    #[test]
    fn all_at_once_queues_every_build_at_the_first_arrival() {
        let rs = history();
        let ms = [machine("ssh://a", 1, 1.0), machine("ssh://b", 1, 1.0)];
        let l = Learned::from_records(&rs);
        let nix = simulate(&rs, &ms, &l, Rule::Nix, Arrivals::AtOnce);
        let learned = simulate(&rs, &ms, &l, Rule::Learned, Arrivals::AtOnce);
        // Nix: a p0 0-20, b p0 0-10, b p1 10-20; at 20 both free: a p1 20-40
        // (list order), b p2 20-30, b p2 30-40; at 40 both free: a big 40-240,
        // b small0 40-43, b small1 43-46.
        assert_eq!(nix.per_machine, vec![3, 6]);
        assert!((nix.makespan - 240.0).abs() < 1e-9, "{nix:?}");
        // Learned: b p0 0-10, a p0 0-20, b p1 10-20; at 20: b p1 20-30 (faster),
        // a p2 20-40, b p2 30-40; at 40: b big 40-140 (long), a small0 40-46,
        // a small1 46-52.
        assert_eq!(learned.per_machine, vec![4, 5]);
        assert!((learned.makespan - 140.0).abs() < 1e-9, "{learned:?}");
    }

    #[test]
    fn with_one_machine_or_no_comparable_history_both_rules_are_equal() {
        let (nix, learned) = both(&history(), &[machine("ssh://a", 2, 1.0)]);
        assert_eq!(nix, learned);
        assert!((nix.makespan - 3200.0).abs() < 1e-9, "big: 100 s on b is 200 s on a: {nix:?}");
        // Every name built on one machine only: nothing learned, the same choices.
        let rs: Vec<Record> = (0..20).map(|i| built(if i % 2 == 0 { "ssh://a" } else { "ssh://b" }, &format!("n{i}"), (i / 4) as f64, 5.0 + i as f64)).collect();
        let (nix, learned) = both(&rs, &[machine("ssh://a", 2, 1.0), machine("ssh://b", 1, 2.0)]);
        assert_eq!(nix, learned);
    }

    #[test]
    fn builds_no_machine_can_take_are_skipped() {
        let mut rs = history();
        rs.push(Record { system: "aarch64-linux".into(), ..built("ssh://arm", "x", 0.0, 5.0) });
        rs.push(Record { result: "failed".into(), ..built("ssh://a", "y", 0.0, 5.0) });
        let (nix, _) = both(&rs, &[machine("ssh://a", 1, 1.0), machine("ssh://b", 1, 1.0)]);
        assert_eq!((nix.builds, nix.skipped), (9, 1));
        assert_eq!(simulate(&[], &[], &Learned::default(), Rule::Nix, Arrivals::AtOnce), Outcome::default());
    }
}
