//! The dispatcher: for each `try`, choose a machine and answer (accepting
//! before connecting when the builder is known healthy), then run the
//! accepted job through `remote_lib::job`, moving it to another builder when
//! the chosen one is lost, and map the outcome to Nix's exit status.

use crate::config::Config;
use crate::ops::BusyMarker;
use crate::out::{self, Activity, NixEvents};
use crate::signals;
use remote_lib::drain::Drains;
use remote_lib::health::{self, HealthStore};
use remote_lib::held;
use remote_lib::history::{self, History};
use remote_lib::hook_protocol::{Accepted, Reply, Settings, TryRequest};
use remote_lib::job::{Context, Job, JobError, Plan, Stats};
use remote_lib::learn::{self, Learned, Speed};
use remote_lib::local_store::LocalStore;
use remote_lib::machines::{self, Machine, Severity};
use remote_lib::nixlog::Level;
use remote_lib::select::{self, Candidate, LocalCapability};
use remote_lib::session::{self, Session, SessionError, Timeouts};
use remote_lib::slots::{FileLock, LoadDir, Slot};
use remote_lib::transport::{self, SshConfig};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// OpenSSH's default `MaxSessions`: sessions one connection may carry.
const MAX_SESSIONS: u64 = 10;

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

/// How long a queued build waits for a slot before it connects.
const QUEUED_CONNECT_DELAY: Duration = Duration::from_millis(300);

/// A machine chosen for a request, with its slot held, or (queued) a place
/// in the queue of builds accepted while every slot was busy.
pub struct Accept {
    index: usize,
    slot: Option<Slot>,
    /// A queued build's marker for `status` and its ticket (`None` once it
    /// has its slot). In this order: a tuple drops its fields in order, and
    /// the marker must go before the lock, or the next holder's would.
    ticket: Option<(BusyMarker, FileLock)>,
    session: Option<Session>,
    /// Seconds spent waiting for the slot.
    waited: f64,
}

enum Choice {
    /// No machine now: the reply Nix's rules give, why for each machine, and
    /// the machines that would do but have every slot busy.
    None(Reply, Vec<String>, Vec<usize>),
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
    ///
    /// When every suitable slot is busy, Nix would be told to postpone and
    /// would sleep its poll interval (5 s). Instead the build is queued: it
    /// is accepted now, up to one queued build per slot (a ticket, a lock
    /// file `E-queue-N` beside the slots), and [`Self::run_job`] connects
    /// meanwhile and starts it the moment a slot is released, while Nix goes
    /// on handing out the next builds. When the queue is full too (or
    /// `BUILD_HOOK_QUEUE=0`), the `try` itself waits for a ticket (or a slot)
    /// for up to `BUILD_HOOK_SLOT_WAIT_MS`, then postpones.
    pub fn handle_try(&mut self, req: &TryRequest) -> anyhow::Result<Option<Accept>> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.cfg.slot_wait_ms);
        loop {
            let (index, slot) = match self.choose(req, req.am_willing)? {
                Choice::Chosen(i, s) => (i, s),
                // All machines of the right type are busy: rather than send Nix to
                // sleep for its poll interval (5 s), queue the build or wait here
                // briefly, woken by the kernel the moment a ticket or a slot is
                // released.
                Choice::None(Reply::Postpone, reasons, full) if !full.is_empty() => {
                    let past = Instant::now() >= deadline;
                    // Not queued when Nix could build it here once a local slot frees.
                    let queue_to = if self.cfg.queue && !self.local_cap.could_build(req) { self.queueable(&full) } else { Vec::new() };
                    let got = if !queue_to.is_empty() {
                        // Past the deadline, only a ticket that is free now.
                        if let Some((index, t, lock)) = self.take_ticket(&queue_to, deadline.max(Instant::now()))? {
                            let ticket = (crate::ops::mark_busy(&self.load, &self.machines[index].uri, t, crate::ops::Place::Ticket, &req.drv_path), lock);
                            out::reply(&Reply::Accept { machine: self.machines[index].uri.clone() });
                            return Ok(Some(Accept { index, slot: None, ticket: Some(ticket), session: None, waited: started.elapsed().as_secs_f64() }));
                        }
                        None
                    } else if past {
                        None
                    } else {
                        self.wait_for_slot(&full, deadline)?
                    };
                    match got {
                        Some(chosen) => chosen,
                        // At the deadline: choose once more, then postpone.
                        None if !past => continue,
                        None => {
                            self.explain(req, &Reply::Postpone, &reasons);
                            out::reply(&Reply::Postpone);
                            return Ok(None);
                        }
                    }
                }
                Choice::None(r, reasons, _) => {
                    self.explain(req, &r, &reasons);
                    out::reply(&r);
                    return Ok(None);
                }
            };
            let slot = Some(slot);
            let m = &self.machines[index];
            // Connecting before accepting keeps Nix's choice of building here
            // if the builder cannot be reached; without that choice (Nix will
            // not build it, e.g. --max-jobs 0), accept now and connect in the
            // job, so that Nix hands out the next builds meanwhile (a job that
            // cannot connect moves to another builder, as in any phase).
            let local_fallback = self.local_cap.could_build(req);
            if !local_fallback || self.health.get(&m.uri).recently_good(health::now(), self.cfg.healthy_window) {
                out::reply(&Reply::Accept { machine: m.uri.clone() });
                return Ok(Some(Accept { index, slot, ticket: None, session: None, waited: started.elapsed().as_secs_f64() }));
            }
            let act = Activity::start(Level::Talkative, &format!("connecting to '{}'", m.uri));
            let res = self.connect(index);
            drop(act);
            match res {
                Ok(s) => {
                    out::reply(&Reply::Accept { machine: self.machines[index].uri.clone() });
                    return Ok(Some(Accept { index, slot, ticket: None, session: Some(s), waited: started.elapsed().as_secs_f64() }));
                }
                Err(e) => {
                    out::msg(Level::Error, &format!("build-hook: cannot build on '{}': {e}", self.machines[index].uri));
                    self.mark_failed(index, &e.to_string());
                    drop(slot);
                }
            }
        }
    }

    /// The machines of `full` (all of whose slots are busy) that a build may
    /// be queued for: those recently reachable.
    fn queueable(&self, full: &[usize]) -> Vec<usize> {
        let now = health::now();
        full.iter().copied().filter(|&i| self.health.get(&self.machines[i].uri).recently_good(now, self.cfg.healthy_window)).collect()
    }

    /// A place in the queue of one of the machines `full`: the first free
    /// ticket (machine, ticket number, its lock), waiting for one until
    /// `deadline` at most.
    fn take_ticket(&self, full: &[usize], deadline: Instant) -> anyhow::Result<Option<(usize, u64, FileLock)>> {
        let wanted: Vec<(usize, u64)> = full.iter().flat_map(|&i| (0..self.machines[i].max_jobs).map(move |t| (i, t))).collect();
        let names: Vec<String> = wanted.iter().map(|&(i, t)| remote_lib::slots::ticket_name(&self.machines[i].uri, t)).collect();
        Ok(self.load.wait_first(&names, deadline)?.map(|(k, ticket)| (wanted[k].0, wanted[k].1, ticket)))
    }

    /// A queued build's slot: connects to the machine it was accepted for
    /// while it waits, then takes the first slot released on any suitable
    /// machine (the session is kept if that is the same machine). Waits as
    /// long as a suitable machine is left, looking again at their health and
    /// drains every few seconds; `false` (after saying why) when none is left.
    fn wait_queued(&mut self, req: &TryRequest, acc: &mut Accept) -> anyhow::Result<bool> {
        let want = acc.index;
        let started = Instant::now();
        // For as long as the try would have waited, only a slot of the machine
        // it is queued for (and connected to): the other machines' slots go
        // to the builds queued for them.
        let own_until = started + Duration::from_millis(self.cfg.slot_wait_ms);
        // It does not connect at once: when many builds are accepted
        // together, those starting now need the CPU (here and on the
        // builder) more than a queued one needs its connection this early.
        // A slot of its machine freed meanwhile is taken, and the connection
        // made then, as for any build.
        if acc.session.is_none() && self.still_open(want) {
            if let Some((i, s)) = self.wait_for_slot(&[want], started + QUEUED_CONNECT_DELAY)? {
                self.queued_got(acc, i, s, started);
                return Ok(true);
            }
        }
        let mut said = false;
        loop {
            if Instant::now() < own_until && acc.session.is_some() && self.still_open(want) {
                if let Some((i, s)) = self.wait_for_slot(&[want], own_until)? {
                    self.queued_got(acc, i, s, started);
                    return Ok(true);
                }
                continue;
            }
            match self.choose(req, false)? {
                Choice::Chosen(i, s) => {
                    self.queued_got(acc, i, s, started);
                    return Ok(true);
                }
                Choice::None(Reply::Postpone, reasons, full) => {
                    if acc.session.is_none() && full.contains(&want) && !self.failed.contains_key(&want) {
                        // Connect while the builds ahead finish.
                        match self.connect(want) {
                            Ok(s) => acc.session = Some(s),
                            Err(e) => {
                                out::msg(Level::Error, &format!("build-hook: cannot build on '{}': {e}", self.machines[want].uri));
                                self.mark_failed(want, &e.to_string());
                            }
                        }
                        continue;
                    }
                    if !said && started.elapsed() >= Duration::from_millis(self.cfg.slot_wait_ms) {
                        out::msg(Level::Info, &format!("build-hook: '{}' is queued; every slot for it is busy:\n  {}", req.drv_path, reasons.join("\n  ")));
                        said = true;
                    }
                    if full.is_empty() {
                        std::thread::sleep(Duration::from_millis(200));
                    } else if let Some((i, s)) = self.wait_for_slot(&full, Instant::now() + Duration::from_secs(5))? {
                        self.queued_got(acc, i, s, started);
                        return Ok(true);
                    }
                }
                Choice::None(_, reasons, _) => {
                    // A machine only backing off after a failed connection (not
                    // one that failed for this build) is waited for.
                    if let Some(wait) = self.soonest_retry(req) {
                        std::thread::sleep(wait.min(Duration::from_secs(5)));
                        continue;
                    }
                    out::msg(Level::Error, &format!("build-hook: cannot build '{}': no builder is left for it:\n  {}", req.drv_path, reasons.join("\n  ")));
                    return Ok(false);
                }
            }
        }
    }

    /// Whether machine `index` may still take this build: not failed for it,
    /// not drained.
    fn still_open(&self, index: usize) -> bool {
        !self.failed.contains_key(&index) && self.drains.drained(&self.machines[index].uri, health::now()).is_none()
    }

    /// How long until a suitable machine that is backing off (and has not
    /// failed for this build) may be tried again; `None` when there is none.
    fn soonest_retry(&self, req: &TryRequest) -> Option<Duration> {
        let now = health::now();
        self.machines
            .iter()
            .enumerate()
            .filter(|(i, m)| !self.failed.contains_key(i) && select::eligible(m, req).is_ok())
            .map(|(_, m)| self.health.get(&m.uri))
            .filter(|h| h.backing_off(now))
            .map(|h| Duration::from_secs(h.retry_after.saturating_sub(now).max(1)))
            .min()
    }

    /// The queued build got `slot` on machine `index`: its ticket goes.
    fn queued_got(&self, acc: &mut Accept, index: usize, slot: Slot, started: Instant) {
        if index != acc.index {
            if let Some(s) = acc.session.take() {
                // Not waited for: the slot is ours now.
                s.kill();
            }
            // Nix said "building on" the machine the build was queued for.
            out::msg(
                Level::Info,
                &format!("build-hook: a slot on '{}' was free first; building there rather than on '{}'", self.machines[index].uri, self.machines[acc.index].uri),
            );
        }
        acc.index = index;
        acc.slot = Some(slot);
        acc.ticket = None;
        acc.waited += started.elapsed().as_secs_f64();
    }

    /// Waits until a slot of one of the machines `full` (all of whose slots
    /// were busy) is released, until `deadline` at most, and takes it.
    fn wait_for_slot(&self, full: &[usize], deadline: Instant) -> anyhow::Result<Option<(usize, Slot)>> {
        let wanted: Vec<(usize, u64)> = full.iter().flat_map(|&i| (0..self.machines[i].max_jobs).map(move |s| (i, s))).collect();
        let files: Vec<(String, u64)> = wanted.iter().map(|&(i, s)| (self.machines[i].uri.clone(), s)).collect();
        Ok(self.load.wait_any(&files, deadline)?.map(|(k, slot)| {
            slot.lock.touch();
            (wanted[k].0, slot)
        }))
    }

    fn choose(&mut self, req: &TryRequest, am_willing: bool) -> anyhow::Result<Choice> {
        let main = self.load.main_lock()?;
        let now = health::now();
        let mut right_type = false;
        let mut cands = Vec::new();
        let mut slots = BTreeMap::new();
        let mut reasons = Vec::new();
        let mut full = Vec::new();
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
                None => {
                    reasons.push(format!("{}: all {} slot(s) busy", m.uri, m.max_jobs));
                    full.push(i);
                }
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
        Ok(Choice::None(reply, reasons, full))
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
        let mut plan = match Plan::new(&self.local, &req.drv_path, sets) {
            Ok(p) => p,
            Err(e) => {
                out::msg(Level::Error, &format!("build-hook: cannot build '{}': {e}", req.drv_path));
                return 1;
            }
        };
        plan.expected_download = self.history.last_download(&history::drv_name(&req.drv_path));
        let mut tried: Vec<String> = Vec::new();
        let mut acc = acc;
        if acc.slot.is_none() {
            match self.wait_queued(req, &mut acc) {
                Ok(true) => {}
                Ok(false) => return 1,
                Err(e) => {
                    out::msg(Level::Error, &format!("build-hook: {e:#}"));
                    return 1;
                }
            }
        }
        loop {
            let Some(slot_held) = acc.slot.take() else { unreachable!("a job runs with its slot") };
            let index = acc.index;
            let uri = self.machines[index].uri.clone();
            let slot = slot_held.index;
            let busy = crate::ops::mark_busy(&self.load, &uri, slot, crate::ops::Place::Slot, &req.drv_path);
            let start = history::now();
            let mut stats = Stats::default();
            // The slot is freed as soon as the remote build has ended (the
            // build is done; fetching the outputs only reads them from the
            // builder's store, compressing them on the way when the link is
            // slow), or when the job ends, whichever is first.
            // The marker goes before the slot is released (a tuple drops in
            // order), not after, when it would be the next holder's.
            let held = std::cell::RefCell::new(Some((busy, slot_held)));
            let res = self.run_on(index, acc.session.take(), &plan, &mut stats, || drop(held.borrow_mut().take()));
            drop(held.take());
            self.record(req, &crate::ops::Attempt { uri: &uri, slot, start, waited: acc.waited }, stats, res.as_ref().err());
            if matches!(res, Ok(()) | Err(JobError::BuildFailed { .. })) {
                self.hold_sessions(index);
            }
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
                    if matches!(e, SessionError::Lost { during: "connecting", .. }) {
                        out::msg(Level::Error, &format!("build-hook: cannot build on '{uri}': {e}"));
                    }
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

    /// After a job on machine `index` that reached it: starts a session
    /// for the next job there, to be held until one takes it (see
    /// `remote_lib::held`), unless enough are held already. Not while
    /// every slot of the machine is busy: builds are then queued for it and
    /// open their sessions while they wait, and starting more sessions
    /// would only take CPU from the builds starting on it (measured: a
    /// fan-out's rounds then started later). The sessions held when a burst
    /// of builds ends start the next burst's first builds.
    fn hold_sessions(&self, index: usize) {
        let m = &self.machines[index];
        if (0..m.max_jobs).all(|i| self.load.slot_held(&m.uri, i)) {
            return;
        }
        // sshd allows 10 sessions on one connection (`MaxSessions`); a
        // builder may already carry up to 3 per slot (the running build's,
        // its spare download session, a queued build's): held sessions
        // only fit in what is left.
        let room = MAX_SESSIONS.saturating_sub(3 * m.max_jobs);
        let count = (self.cfg.held_sessions as u64).min(m.max_jobs).min(room) as usize;
        let ttl = Duration::from_secs(self.cfg.control_persist as u64);
        if let (Some(program), true) = (&self.ssh.bridge, count > 0) {
            if held::park(program, m, &self.ssh, count, ttl) {
                out::msg(Level::Debug, &format!("build-hook: holding a session to '{}' open for the next build", m.uri));
            }
        }
    }

    /// Connects if needed and runs the job's steps on machine `index`.
    fn run_on(&mut self, index: usize, session: Option<Session>, plan: &Plan, stats: &mut Stats, built: impl FnOnce()) -> Result<(), JobError> {
        let session = match session {
            Some(s) => s,
            None => self.connect(index)?,
        };
        if let Ok(l) = signals::build_log().try_clone() {
            session.forward_log(l);
        }
        let m = &self.machines[index];
        if session.held {
            out::msg(Level::Talkative, &format!("build-hook: '{}': using a session opened ahead", m.uri));
        }
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
        job.run(stats, built)
    }

    /// Finds another builder for a job whose builder failed, or reports every
    /// builder tried and why.
    fn move_job(&mut self, req: &TryRequest, from: &str, why: &str, tried: &[String]) -> Option<Accept> {
        match self.failover(req) {
            Ok(Some((i, s))) => {
                out::msg(Level::Warn, &format!("build-hook: '{from}' failed ({why}); building '{}' on '{}' instead", req.drv_path, self.machines[i].uri));
                Some(Accept { index: i, slot: Some(s), ticket: None, session: None, waited: 0.0 })
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
                Choice::None(Reply::Postpone, _, full) if Instant::now() < deadline => {
                    if full.is_empty() {
                        // Only drained machines: nothing to wake us.
                        std::thread::sleep(Duration::from_millis(200));
                    } else if let Some(chosen) = self.wait_for_slot(&full, deadline)? {
                        return Ok(Some(chosen));
                    }
                }
                Choice::None(_, reasons, _) => {
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
