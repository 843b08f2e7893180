//! Choosing a machine for a `try` (as Nix's own hook, `src/build-remote/build-remote.cc` in the Nix source): eligibility and ranking are
//! pure functions here, so every rule of Nix's built-in hook is unit-tested;
//! the caller probes slots and health and feeds the results in.

use crate::hook_protocol::TryRequest;
use crate::machines::Machine;

/// Facts about the local machine that decide postpone versus decline.
#[derive(Clone, Debug, Default)]
pub struct LocalCapability {
    pub system: String,
    pub extra_platforms: Vec<String>,
    pub system_features: Vec<String>,
    pub max_jobs: u64,
}

impl LocalCapability {
    /// Nix 2.14+'s `couldBuildLocally`.
    pub fn could_build(&self, req: &TryRequest) -> bool {
        self.max_jobs > 0
            && (req.needed_system == self.system || self.extra_platforms.contains(&req.needed_system))
            && req.required_features.iter().all(|f| self.system_features.contains(f))
    }
}

/// Why a machine cannot take a request, for the "why was this refused" report.
#[derive(Clone, Debug, PartialEq)]
pub enum Ineligible {
    System {
        wanted: String,
        has: Vec<String>,
    },
    MissingFeatures(Vec<String>),
    MandatoryNotRequired(Vec<String>),
    /// max-jobs is 0: the machine is listed but never used.
    NoJobs,
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ineligible::System { wanted, has } => write!(f, "builds for {} only, not {wanted}", has.join(",")),
            Ineligible::MissingFeatures(v) => write!(f, "lacks the required features {}", v.join(",")),
            Ineligible::MandatoryNotRequired(v) => write!(f, "only takes builds that require {}", v.join(",")),
            Ineligible::NoJobs => write!(f, "max-jobs is 0, so it takes no builds"),
        }
    }
}

/// Nix's eligibility rule: system (or `builtin`), supported ⊇ required,
/// mandatory ⊆ required. Unlike Nix, a machine with max-jobs 0 is not of the
/// right type at all: Nix would postpone forever waiting for a slot it can
/// never have.
pub fn eligible(m: &Machine, req: &TryRequest) -> Result<(), Ineligible> {
    if m.max_jobs == 0 {
        return Err(Ineligible::NoJobs);
    }
    if req.needed_system != "builtin" && !m.systems.contains(&req.needed_system) {
        return Err(Ineligible::System { wanted: req.needed_system.clone(), has: m.systems.clone() });
    }
    let missing: Vec<_> = req.required_features.iter().filter(|f| !m.supported_features.contains(f) && !m.mandatory_features.contains(f)).cloned().collect();
    if !missing.is_empty() {
        return Err(Ineligible::MissingFeatures(missing));
    }
    let extra: Vec<_> = m.mandatory_features.iter().filter(|f| !req.required_features.contains(f)).cloned().collect();
    if !extra.is_empty() {
        return Err(Ineligible::MandatoryNotRequired(extra));
    }
    Ok(())
}

/// A machine with a free slot and how loaded it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Index into the machine list.
    pub index: usize,
    /// Busy slots.
    pub load: u64,
    /// The speed it is ranked by: the configured speed factor, or the
    /// effective speed learned from the history ([`crate::learn`]).
    pub speed: f64,
}

/// Picks the best candidate as Nix 2.20+ does: lowest load/speed (a real
/// ratio), then higher speed, then lower load; the first in list order wins
/// ties.
pub fn best(candidates: &[Candidate]) -> Option<Candidate> {
    let mut best: Option<Candidate> = None;
    for c in candidates {
        let better = match best {
            None => true,
            Some(b) => {
                let (r, br) = (c.load as f64 / c.speed, b.load as f64 / b.speed);
                r < br || (r == br && c.speed > b.speed) || (r == br && c.speed == b.speed && c.load < b.load)
            }
        };
        if better {
            best = Some(*c);
        }
    }
    best
}

/// The learned rule: a build that is long by its history
/// ([`crate::learn::Learned::is_long`]) goes to the fastest candidate (the
/// highest speed; among equally fast ones, [`best`]); any other build is
/// ranked by [`best`]. With no history the speeds are the configured
/// factors and nothing is long, so this is Nix's rule.
pub fn best_for(candidates: &[Candidate], long: bool) -> Option<Candidate> {
    if !long {
        return best(candidates);
    }
    let top = candidates.iter().map(|c| c.speed).fold(f64::NEG_INFINITY, f64::max);
    let fastest: Vec<Candidate> = candidates.iter().filter(|c| c.speed == top).copied().collect();
    best(&fastest)
}

/// The answer when no machine has a free slot (Nix's rule): postpone if some
/// machine of the right type exists and the build cannot run locally.
pub fn when_all_full(right_type: bool, can_build_locally: bool) -> crate::hook_protocol::Reply {
    if right_type && !can_build_locally {
        crate::hook_protocol::Reply::Postpone
    } else {
        crate::hook_protocol::Reply::Decline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook_protocol::Reply;

    use crate::machines::test_machine as machine;
    fn req(system: &str, features: &[&str]) -> TryRequest {
        TryRequest { am_willing: false, needed_system: system.into(), drv_path: "/nix/store/x.drv".into(), required_features: features.iter().map(|s| s.to_string()).collect() }
    }
    fn c(index: usize, load: u64, speed: f64) -> Candidate {
        Candidate { index, load, speed }
    }

    #[test]
    fn eligibility_rules() {
        let m = machine("b mips-linux - 1 1 big kvm");
        assert!(eligible(&m, &req("builtin", &["kvm"])).is_ok());
        assert!(matches!(eligible(&m, &req("x86_64-linux", &["kvm"])), Err(Ineligible::System { .. })));
        assert!(matches!(eligible(&m, &req("mips-linux", &[])), Err(Ineligible::MandatoryNotRequired(_))));
        assert!(eligible(&m, &req("mips-linux", &["kvm", "big"])).is_ok());
        assert_eq!(eligible(&m, &req("mips-linux", &["kvm", "cuda"])), Err(Ineligible::MissingFeatures(vec!["cuda".into()])));
        let idle = machine("b mips-linux - 0 1");
        assert_eq!(eligible(&idle, &req("mips-linux", &[])), Err(Ineligible::NoJobs));
    }

    #[test]
    fn ranking_matches_the_table_of_section_4_4_with_real_division() {
        // A(4,1) load 0; B(4,3) load 0 -> B (higher speed wins equal ratio)
        assert_eq!(best(&[c(0, 0, 1.0), c(1, 0, 3.0)]).unwrap().index, 1);
        // A(4,1) load 0; B(4,3) load 2 -> A with a real ratio (Nix <2.20 picked B)
        assert_eq!(best(&[c(0, 0, 1.0), c(1, 2, 3.0)]).unwrap().index, 0);
        // A(4,1) load 0; B(4,3) load 3 -> A
        assert_eq!(best(&[c(0, 0, 1.0), c(1, 3, 3.0)]).unwrap().index, 0);
        // A(4,1) load 1; B(4,3) load 3 -> B (equal ratio, higher speed)
        assert_eq!(best(&[c(0, 1, 1.0), c(1, 3, 3.0)]).unwrap().index, 1);
        // A(4,2) load 1; B(4,2) load 0 -> B
        assert_eq!(best(&[c(0, 1, 2.0), c(1, 0, 2.0)]).unwrap().index, 1);
        // equal -> list order
        assert_eq!(best(&[c(0, 1, 2.0), c(1, 1, 2.0)]).unwrap().index, 0);
        assert_eq!(best(&[]), None);
    }

    #[test]
    fn a_long_build_goes_to_the_fastest_free_machine() {
        // A(speed 1) idle; B(speed 3) with 2 busy: Nix's rule takes A, a long build B.
        let cs = [c(0, 0, 1.0), c(1, 2, 3.0)];
        assert_eq!(best_for(&cs, false).unwrap().index, 0);
        assert_eq!(best_for(&cs, true).unwrap().index, 1);
        // Equally fast: Nix's rule among them (lower load/speed wins).
        assert_eq!(best_for(&[c(0, 1, 1.0), c(1, 1, 3.0), c(2, 0, 3.0)], true).unwrap().index, 2);
        assert_eq!(best_for(&[], true), None);
    }

    #[test]
    fn postpone_versus_decline() {
        assert_eq!(when_all_full(true, false), Reply::Postpone);
        assert_eq!(when_all_full(true, true), Reply::Decline);
        assert_eq!(when_all_full(false, false), Reply::Decline);
        let local = LocalCapability { system: "x86_64-linux".into(), max_jobs: 1, ..Default::default() };
        assert!(local.could_build(&req("x86_64-linux", &[])));
        assert!(!local.could_build(&req("aarch64-linux", &[])));
        assert!(!local.could_build(&req("x86_64-linux", &["kvm"])));
        assert!(!LocalCapability { max_jobs: 0, ..local }.could_build(&req("x86_64-linux", &[])));
    }
}
