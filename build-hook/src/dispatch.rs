//! The dispatcher: for each `try`, choose a machine and answer (accepting
//! before connecting when the builder is known healthy), then run the
//! accepted job through `remote_lib::job`, moving it to another builder when
//! the chosen one is lost, and map the outcome to Nix's exit status.

use crate::config::Config;
use crate::out::{self, Activity, NixEvents};
use crate::signals;
use remote_lib::drain::Drains;
use remote_lib::health::{self, HealthStore};
use remote_lib::history::{self, History};
use remote_lib::hook_protocol::{Accepted, Reply, Settings, TryRequest};
use remote_lib::job::{Context, Job, JobError, Plan, Stats};
use remote_lib::learn::{self, Learned, Speed};
use remote_lib::local_store::LocalStore;
use remote_lib::machines::{self, Machine, Severity};
use remote_lib::nixlog::Level;
use remote_lib::select::{self, Candidate, LocalCapability};
use remote_lib::session::{self, Session, SessionError, Timeouts};
use remote_lib::slots::{LoadDir, Slot};
use remote_lib::transport::{self, SshConfig};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub struct Dispatcher {
    /// What was wrong in the machines list (already skipped).
    pub diagnostics: Vec<machines::Diagnostic>,
    /// Where the machines list came from, for messages.
    pub machines_source: String,
    pub cfg: Config,
    settings: Settings,
    pub machines: Vec<Machine>,
    pub local: LocalStore,
    pub load: LoadDir,
    pub health: HealthStore,
    pub history: History,
    pub drains: Drains,
    pub ssh: SshConfig,
    local_cap: LocalCapability,
    /// Machines that failed in this process, with why.
    failed: BTreeMap<usize, String>,
    /// What the history says, read the first time more than one machine
    /// has a free slot.
    learned: Option<(Learned, Vec<Speed>)>,
}

/// A machine chosen for a request, with its slot held.
pub struct Accept {
    index: usize,
    slot: Slot,
    session: Option<Session>,
    /// Seconds spent waiting for the slot.
    waited: f64,
}

enum Choice {
    /// No machine now: the reply Nix's rules give, and why for each machine.
    None(Reply, Vec<String>),
    Chosen(usize, Slot),
}

impl Dispatcher {
    pub fn new(cfg: Config, settings: Settings) -> Dispatcher {
        let local = cfg.local_store(settings.store());
        let load = LoadDir::new(cfg.load_dir(&local));
        let health = HealthStore::new(load.private_dir("health"));
        let (history, drains) = (History::new(load.private_dir("")), Drains::new(load.path.join("build-hook/drain")));
        let control_dir = if cfg.control_persist > 0 { transport::control_dir(&load) } else { None };
        let ssh = SshConfig {
            program: cfg.ssh_program.clone(),
            connect_timeout: cfg.connect_timeout,
            server_alive_interval: cfg.server_alive_interval,
            server_alive_count_max: cfg.server_alive_count_max,
            control_dir,
            control_persist: cfg.control_persist,
            known_hosts_dir: load.private_dir("known-hosts"),
            extra_opts: transport::split_sshopts(&cfg.sshopts),
            ciphers: None,
            bridge: std::env::current_exe().ok(),
        };
        let (text, source) = cfg.builders(&settings);
        let system = settings.system();
        let parsed = machines::parse(&text, &source, &system, &mut |p: &str| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        });
        let local_cap = LocalCapability { system, extra_platforms: settings.extra_platforms(), system_features: settings.system_features(), max_jobs: settings.max_jobs() };
        Dispatcher {
            diagnostics: parsed.diagnostics,
            machines_source: source,
            cfg,
            settings,
            machines: parsed.machines,
            local,
            load,
            health,
            history,
            drains,
            ssh,
            local_cap,
            failed: BTreeMap::new(),
            learned: None,
        }
    }

    /// What the history says about the machines' speeds and the derivations'
    /// durations, with each machine's speed (in list order).
    pub fn learn(&self) -> (Learned, Vec<Speed>) {
        let learned = Learned::from_records(&self.history.read_tail(learn::MAX_RECORDS, learn::MAX_BYTES));
        let speeds = learned.speeds(&self.machines.iter().map(|m| (m.uri.as_str(), m.speed_factor)).collect::<Vec<_>>());
        (learned, speeds)
    }

    /// Sends the machines-list diagnostics to Nix (notes are for `check`).
    pub fn report_diagnostics(&self) {
        for d in &self.diagnostics {
            let level = match d.severity {
                Severity::Error => Level::Error,
                Severity::Warning => Level::Warn,
                Severity::Note => continue,
            };
            out::msg(level, &format!("build-hook: {d}"));
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        self.cfg.timeouts(self.settings.build_options().max_silent_time)
    }

    /// Answers one `try`. Returns the accepted machine after `# accept` was sent.
    pub fn handle_try(&mut self, req: &TryRequest) -> anyhow::Result<Option<Accept>> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.cfg.slot_wait_ms);
        let mut poll = Duration::from_millis(5);
        loop {
            let (index, slot) = match self.choose(req, req.am_willing)? {
                // All machines of the right type are busy: rather than send Nix to
                // sleep for its poll interval (5 s), wait here briefly for a slot.
                Choice::None(Reply::Postpone, _) if Instant::now() < deadline => {
                    std::thread::sleep(poll);
                    poll = (poll * 2).min(Duration::from_millis(10));
                    continue;
                }
                Choice::None(r, reasons) => {
                    self.explain(req, &r, &reasons);
                    out::reply(&r);
                    return Ok(None);
                }
                Choice::Chosen(i, s) => (i, s),
            };
            let m = &self.machines[index];
            if self.health.get(&m.uri).recently_good(health::now(), self.cfg.healthy_window) {
                out::reply(&Reply::Accept { machine: m.uri.clone() });
                return Ok(Some(Accept { index, slot, session: None, waited: started.elapsed().as_secs_f64() }));
            }
            let act = Activity::start(Level::Talkative, &format!("connecting to '{}'", m.uri));
            let res = self.connect(index);
            drop(act);
            match res {
                Ok(s) => {
                    out::reply(&Reply::Accept { machine: self.machines[index].uri.clone() });
                    return Ok(Some(Accept { index, slot, session: Some(s), waited: started.elapsed().as_secs_f64() }));
                }
                Err(e) => {
                    out::msg(Level::Error, &format!("build-hook: cannot build on '{}': {e}", self.machines[index].uri));
                    self.mark_failed(index, &e.to_string());
                    drop(slot);
                }
            }
        }
    }

    fn choose(&mut self, req: &TryRequest, am_willing: bool) -> anyhow::Result<Choice> {
        let main = self.load.main_lock()?;
        let now = health::now();
        let mut right_type = false;
        let mut cands = Vec::new();
        let mut slots = BTreeMap::new();
        let mut reasons = Vec::new();
        for (i, m) in self.machines.iter().enumerate() {
            if let Some(why) = self.failed.get(&i) {
                reasons.push(format!("{}: failed earlier in this build: {why}", m.uri));
                continue;
            }
            if let Err(why) = select::eligible(m, req) {
                reasons.push(format!("{}: {why}", m.uri));
                continue;
            }
            let h = self.health.get(&m.uri);
            if h.backing_off(now) {
                reasons.push(format!("{}: skipped for {} more s after {} failed connection(s): {}", m.uri, h.retry_after - now, h.failures, h.reason));
                continue;
            }
            right_type = true;
            if let Some(until) = self.drains.drained(&m.uri, now) {
                // Like a busy machine: the build waits or goes elsewhere.
                reasons.push(format!("{}: drained{}", m.uri, if until > 0 { format!(" for {} more s", until - now) } else { " (build-hook undrain to end it)".into() }));
                continue;
            }
            let (slot, busy) = self.load.probe(&m.uri, m.max_jobs)?;
            match slot {
                Some(s) => {
                    cands.push(Candidate { index: i, load: busy, speed: m.speed_factor });
                    slots.insert(i, s);
                }
                None => reasons.push(format!("{}: all {} slot(s) busy", m.uri, m.max_jobs)),
            }
        }
        if cands.len() > 1 && self.learned.is_none() {
            // Read the history once, without holding the main lock (a few
            // milliseconds for a full one), then probe again.
            drop(slots);
            drop(main);
            self.learned = Some(self.learn());
            return self.choose(req, am_willing);
        }
        let pick = if cands.len() > 1 { self.rank_learned(req, &mut cands) } else { select::best(&cands) };
        if let Some(slot) = pick.and_then(|best| slots.remove(&best.index).map(|s| (best.index, s))) {
            slot.1.lock.touch();
            return Ok(Choice::Chosen(slot.0, slot.1));
        }
        let reply = select::when_all_full(right_type, am_willing && self.local_cap.could_build(req));
        Ok(Choice::None(reply, reasons))
    }

    /// Ranks free machines by their learned speeds, a long build first to
    /// the fastest ([`select::best_for`]); says so when that differs from
    /// Nix's rule.
    fn rank_learned(&self, req: &TryRequest, cands: &mut [Candidate]) -> Option<Candidate> {
        let Some((learned, speeds)) = self.learned.as_ref() else { return select::best(cands) };
        let nix = select::best(cands);
        for c in cands.iter_mut() {
            c.speed = speeds[c.index].effective;
        }
        let key = (req.needed_system.clone(), history::drv_name(&req.drv_path));
        let long = learned.is_long(&key);
        let pick = select::best_for(cands, long);
        if let (Some(p), Some(n)) = (pick, nix) {
            if p.index != n.index {
                let why = match learned.expected(&key) {
                    Some(e) if long => format!("a long build (about {:.0} s by {} earlier build(s)) goes to the fastest free machine", e.secs, e.builds),
                    _ => "ranked by learned speeds".into(),
                };
                out::msg(
                    Level::Talkative,
                    &format!(
                        "build-hook: '{}' goes to '{}', {}, rather than '{}', {}: {why}",
                        req.drv_path, self.machines[p.index].uri, speeds[p.index], self.machines[n.index].uri, speeds[n.index]
                    ),
                );
            }
        }
        pick
    }

    /// Tells the user why a request was declined or postponed.
    fn explain(&self, req: &TryRequest, reply: &Reply, reasons: &[String]) {
        if *reply == Reply::Decline {
            let level = if self.local_cap.could_build(req) { Level::Chatty } else { Level::Warn };
            out::msg(
                level,
                &format!(
                    "build-hook: no remote machine can build '{}' (system {}, features [{}]):\n  {}",
                    req.drv_path,
                    req.needed_system,
                    req.required_features.join(","),
                    reasons.join("\n  ")
                ),
            );
        } else {
            out::msg(Level::Talkative, &format!("build-hook: all machines for '{}' are busy; waiting:\n  {}", req.drv_path, reasons.join("\n  ")));
        }
    }

    /// Opens a session to machine `index`, recording a success in the shared
    /// health state (a failure is recorded by the caller, once).
    fn connect(&mut self, index: usize) -> Result<Session, SessionError> {
        let m = &self.machines[index];
        let res = self.open_session(m);
        if res.is_ok() {
            self.health.update(&m.uri, |h| h.succeeded(health::now()));
        }
        res
    }

    /// A session with `m`, with AES-GCM first for a new connection when that
    /// is the better choice (see [`session::cipher_choice`]).
    pub fn open_session(&self, m: &Machine) -> Result<Session, SessionError> {
        let ssh = match self.cipher_choice(m).0 {
            Some(list) => SshConfig { ciphers: Some(list), ..self.ssh.clone() },
            None => self.ssh.clone(),
        };
        Session::connect(m, &ssh, self.timeouts())
    }

    pub fn cipher_choice(&self, m: &Machine) -> (Option<String>, String) {
        session::cipher_choice(m, &self.ssh, self.cfg.prefer_aes_gcm, self.health.get(&m.uri).aes)
    }

    /// Records that machine `index` failed: every hook process skips it for a
    /// back-off, and this job does not try it again.
    fn mark_failed(&mut self, index: usize, why: &str) {
        let (policy, j) = (self.cfg.backoff, health::jitter());
        self.health.update(&self.machines[index].uri, |h| h.failed(health::now(), why, policy, j));
        self.failed.insert(index, why.to_string());
    }

    /// Runs the accepted job; returns the exit status for Nix. A builder that
    /// cannot be reached, or is lost in any phase before the outputs are home,
    /// is recorded as failing and the job moves to another eligible builder;
    /// each builder is tried at most once.
    pub fn run_job(&mut self, req: &TryRequest, acc: Accept, sets: Accepted) -> i32 {
        let plan = match Plan::new(&self.local, &req.drv_path, &sets) {
            Ok(p) => p,
            Err(e) => {
                out::msg(Level::Error, &format!("build-hook: cannot build '{}': {e}", req.drv_path));
                return 1;
            }
        };
        let mut tried: Vec<String> = Vec::new();
        let mut acc = acc;
        loop {
            let index = acc.index;
            let uri = self.machines[index].uri.clone();
            let busy = crate::ops::mark_busy(&self.load, &uri, acc.slot.index, &req.drv_path);
            let start = history::now();
            let mut stats = Stats::default();
            let res = self.run_on(index, acc.session.take(), &plan, &mut stats);
            // The builder's work is over: free the slot before anything else.
            let slot = acc.slot.index;
            drop(acc.slot);
            drop(busy);
            self.record(req, &crate::ops::Attempt { uri: &uri, slot, start, waited: acc.waited }, stats, res.as_ref().err());
            let e = match res {
                Ok(()) => return 0,
                Err(e) => e,
            };
            match e {
                JobError::BuildFailed { msg, .. } => {
                    if self.settings.build_options().keep_failed {
                        let local =
                            if self.local_cap.could_build(req) { " You can re-run the command with `--builders ''` to disable remote building for this invocation." } else { "" };
                        out::msg(Level::Warn, &format!("warning: The failed build directory was kept on the remote builder due to `--keep-failed`.{local}"));
                    }
                    // As Nix's own hook reports it, and with its exit status (1).
                    out::msg(Level::Error, &build_failed(&req.drv_path, &uri, &msg));
                    return 1;
                }
                // (Exit status 3 means this only from the ssh-ng bridge.)
                JobError::Builder(e @ SessionError::Refused { another_may: true, .. }) if self.machines[index].ssh.daemon => {
                    // Reachable, so its health stays; only this build goes elsewhere.
                    let why = e.to_string();
                    self.failed.insert(index, first_line(&why).to_string());
                    tried.push(format!("{uri}: {why}"));
                    match self.move_job(req, &uri, first_line(&why), &tried) {
                        Some(next) => acc = next,
                        None => return 1,
                    }
                }
                JobError::Builder(e @ SessionError::Lost { .. }) => {
                    let why = e.to_string();
                    self.mark_failed(index, &why);
                    tried.push(format!("{uri}: {why}"));
                    match self.move_job(req, &uri, first_line(&why), &tried) {
                        Some(next) => acc = next,
                        None => return 1,
                    }
                }
                e => {
                    out::msg(Level::Error, &format!("build-hook: building '{}' on '{uri}' failed: {e}", req.drv_path));
                    return 1;
                }
            }
        }
    }

    /// Appends the attempt to the shared history (advice only: a failure to
    /// write it is ignored).
    fn record(&self, req: &TryRequest, a: &crate::ops::Attempt, s: Stats, err: Option<&JobError>) {
        let (result, reason) = crate::ops::outcome(err);
        let r = crate::ops::record(req, a, s, result, reason);
        let _ = self.history.append(&r);
        crate::ops::run_result_hook(&self.cfg, &r);
    }

    /// Connects if needed and runs the job's steps on machine `index`.
    fn run_on(&mut self, index: usize, session: Option<Session>, plan: &Plan, stats: &mut Stats) -> Result<(), JobError> {
        let session = match session {
            Some(s) => s,
            None => self.connect(index)?,
        };
        if let Ok(l) = signals::build_log().try_clone() {
            session.forward_log(l);
        }
        let m = &self.machines[index];
        let ctx = Context {
            local: &self.local,
            ssh: &self.ssh,
            load: &self.load,
            health: &self.health,
            forced_level: self.cfg.compress,
            options: self.settings.build_options(),
            substitute: self.settings.builders_use_substitutes(),
        };
        let job = Job::new(&ctx, m, plan, session, &NixEvents)?;
        job.run(stats)
    }

    /// Finds another builder for a job whose builder failed, or reports every
    /// builder tried and why.
    fn move_job(&mut self, req: &TryRequest, from: &str, why: &str, tried: &[String]) -> Option<Accept> {
        match self.failover(req) {
            Ok(Some((i, s))) => {
                out::msg(Level::Warn, &format!("build-hook: '{from}' failed ({why}); building '{}' on '{}' instead", req.drv_path, self.machines[i].uri));
                Some(Accept { index: i, slot: s, session: None, waited: 0.0 })
            }
            Ok(None) => {
                out::msg(Level::Error, &format!("build-hook: cannot build '{}': no builder is left:\n  {}", req.drv_path, tried.join("\n  ")));
                None
            }
            Err(e) => {
                out::msg(Level::Error, &format!("build-hook: {e:#}"));
                None
            }
        }
    }

    /// After accept, finds another machine when the chosen one was lost;
    /// waits while the remaining candidates are busy, for at most the stall
    /// timeout.
    fn failover(&mut self, req: &TryRequest) -> anyhow::Result<Option<(usize, Slot)>> {
        let deadline = Instant::now() + Duration::from_secs(self.cfg.stall_timeout.max(1));
        loop {
            match self.choose(req, false)? {
                Choice::Chosen(i, s) => return Ok(Some((i, s))),
                Choice::None(Reply::Postpone, reasons) if Instant::now() < deadline => {
                    let _ = reasons;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Choice::None(_, reasons) => {
                    out::msg(Level::Talkative, &format!("build-hook: no other builder for '{}':\n  {}", req.drv_path, reasons.join("\n  ")));
                    return Ok(None);
                }
            }
        }
    }
}

/// A failed remote build, worded as Nix's own hook words it.
fn build_failed(drv: &str, uri: &str, msg: &str) -> String {
    format!("error: build of '{drv}' on '{uri}' failed: {msg}")
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn failures_are_worded_as_nix_words_them() {
        assert_eq!(
            super::build_failed("/nix/store/x.drv", "ssh://b1", "builder for '/nix/store/x.drv' failed with exit code 3"),
            "error: build of '/nix/store/x.drv' on 'ssh://b1' failed: builder for '/nix/store/x.drv' failed with exit code 3"
        );
        assert_eq!(super::first_line("a\nb"), "a");
    }
}
