//! One hook process: choose a machine for each `try`, accept (before
//! connecting when the builder is known healthy), then run the accepted job:
//! upload missing inputs, build, bring the outputs back. Fails over to another
//! builder when the chosen one cannot be reached.

use crate::config::Config;
use crate::out::{self, Activity};
use crate::signals;
use remote_lib::copy;
use remote_lib::sample;
use remote_lib::health::{self, HealthStore};
use remote_lib::hook_protocol::{Accepted, Reply, Settings, TryRequest};
use remote_lib::local_store::{LocalServe, LocalStore};
use remote_lib::machines::{self, Machine, Severity};
use remote_lib::nixlog::Level;
use remote_lib::select::{self, Candidate, LocalCapability};
use remote_lib::serve::{ServeConn, ServeError};
use remote_lib::slots::{LoadDir, Slot};
use remote_lib::store_path::StorePath;
use remote_lib::transport::{self, RemoteProcess, SshConfig, StderrTap};
use std::collections::BTreeMap;
use std::process::{ChildStdin, ChildStdout};
use std::time::Duration;

pub struct Hook {
    /// What was wrong in the machines list (already skipped).
    pub diagnostics: Vec<machines::Diagnostic>,
    /// Where the machines list came from, for messages.
    machines_source: String,
    cfg: Config,
    settings: Settings,
    pub machines: Vec<Machine>,
    local: LocalStore,
    load: LoadDir,
    health: HealthStore,
    ssh: SshConfig,
    local_cap: LocalCapability,
    /// Machines that failed to connect in this process, with why.
    failed: BTreeMap<usize, String>,
}

/// A live session with a builder.
pub struct Conn {
    proc: RemoteProcess,
    serve: ServeConn<ChildStdout, ChildStdin>,
}

impl Conn {
    /// Ends the session (closing the builder's stdin first so it exits) and
    /// returns the stderr tail.
    fn finish(self) -> String {
        drop(self.serve);
        self.proc.finish().1
    }
    /// Kills the session.
    fn kill(self) -> String {
        drop(self.serve);
        self.proc.kill()
    }
}

/// A machine chosen for a request, with its slot held.
pub struct Accept {
    index: usize,
    slot: Slot,
    conn: Option<Conn>,
}

enum Choice {
    /// No machine now: the reply Nix's rules give, and why for each machine.
    None(Reply, Vec<String>),
    Chosen(usize, Slot),
}

impl Hook {
    pub fn new(cfg: Config, settings: Settings) -> Hook {
        let local = LocalStore::from_setting(settings.store(), &cfg.nix_store);
        let load = LoadDir::new(cfg.load_dir(&local));
        let health = HealthStore::new(load.private_dir("health"));
        let control_dir = if cfg.control_persist > 0 { control_dir(&load) } else { None };
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
        };
        let (text, source) = cfg.builders(&settings);
        let system = settings.system();
        let parsed = machines::parse(&text, &source, &system, &mut |p: &str| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        });
        let local_cap = LocalCapability {
            system,
            extra_platforms: settings.extra_platforms(),
            system_features: settings.system_features(),
            max_jobs: settings.max_jobs(),
        };
        Hook { diagnostics: parsed.diagnostics, machines_source: source, cfg, settings, machines: parsed.machines, local, load, health, ssh, local_cap, failed: BTreeMap::new() }
    }

    /// Sends the machines-list diagnostics to Nix.
    pub fn report_diagnostics(&self) {
        for d in &self.diagnostics {
            let level = if d.severity == Severity::Error { Level::Error } else { Level::Warn };
            out::msg(level, &format!("build-hook: {d}"));
        }
    }

    /// `build-hook check`: what the hook would make of the machines list, each
    /// machine's slots and health now, and (with `connect`) whether it can be
    /// reached. Returns the lines to print and whether everything is fine.
    pub fn check(&self, connect: bool) -> (Vec<String>, bool) {
        let mut lines = Vec::new();
        let mut ok = true;
        lines.push(format!("machines from {}: {} usable", self.machines_source, self.machines.len()));
        for d in &self.diagnostics {
            ok &= d.severity != Severity::Error;
            lines.push(d.to_string());
        }
        lines.push(format!("load directory: {}", self.load.path.display()));
        let now = health::now();
        for m in &self.machines {
            lines.push(format!(
                "{}  ({})\n  systems {}; max jobs {}; speed {}; features [{}]; mandatory [{}]; host key {}",
                m.uri,
                m.origin,
                m.systems.join(","),
                m.max_jobs,
                m.speed_factor,
                m.supported_features.join(","),
                m.mandatory_features.join(","),
                if m.host_key.is_some() { "pinned" } else { "from known_hosts" }
            ));
            match self.load.probe(&m.uri, m.max_jobs) {
                Ok((_, busy)) => lines.push(format!("  slots: {busy} of {} busy now", m.max_jobs)),
                Err(e) => lines.push(format!("  slots: cannot probe: {}", error_chain(&e))),
            }
            let h = self.health.get(&m.uri);
            let state = if h.backing_off(now) {
                format!("SKIPPED for {} more s after {} failed connection(s): {}", h.retry_after - now, h.failures, h.reason)
            } else if h.last_success > 0 {
                format!("last connected {} s ago{}", now.saturating_sub(h.last_success), if h.failures > 0 { format!("; {} failure(s) since: {}", h.failures, h.reason) } else { String::new() })
            } else if h.failures > 0 {
                format!("{} failed connection(s), back-off over: {}", h.failures, h.reason)
            } else {
                "never connected by build-hook".into()
            };
            let zstd = match (h.zstd, h.compress) {
                (Some(false), _) => "no zstd on the builder: copies uncompressed".to_string(),
                (Some(true), Some(0)) => "zstd available; copies currently uncompressed (fast link)".to_string(),
                (Some(true), Some(l)) => format!("zstd available; copies at level {l}"),
                (Some(true), None) => format!("zstd available; level not learned yet (the next copy uses {})", health::DEFAULT_LEVEL),
                (None, _) => "not asked yet whether the builder has zstd".to_string(),
            };
            let cipher = self.cipher_choice(m).1;
            lines.push(format!("  health: {state}\n  transfers: {zstd}\n  cipher for a new connection: {cipher}"));
            if connect {
                let t = std::time::Instant::now();
                match self.try_connect(m) {
                    Ok(conn) => {
                        let v = conn.serve.server_version;
                        let _ = conn.finish();
                        lines.push(format!("  connect: ok in {} ms, nix-store --serve protocol {}.{}", t.elapsed().as_millis(), v.0, v.1));
                    }
                    Err(why) => {
                        ok = false;
                        lines.push(format!("  connect: FAILED: {}", why.replace('\n', "\n    ")));
                    }
                }
            }
        }
        if self.machines.is_empty() {
            ok = false;
            lines.push("no usable machine: Nix would be told '# decline-permanently' and build locally".into());
        }
        (lines, ok)
    }

    /// Answers one `try`. Returns the accepted machine after `# accept` was sent.
    pub fn handle_try(&mut self, req: &TryRequest) -> anyhow::Result<Option<Accept>> {
        if req.required_features.iter().any(|f| f == "ca-derivations") {
            let level = if self.local_cap.could_build(req) { Level::Chatty } else { Level::Warn };
            out::msg(level, &format!("build-hook: declining '{}': floating content-addressed derivations are not supported by build-hook yet; Nix builds them locally", req.drv_path));
            out::reply(&Reply::Decline);
            return Ok(None);
        }
        let deadline = std::time::Instant::now() + Duration::from_millis(self.cfg.slot_wait_ms);
        let mut poll = Duration::from_millis(5);
        loop {
            let (index, slot) = match self.choose(req, req.am_willing)? {
                // All machines of the right type are busy: rather than send Nix to
                // sleep for its poll interval (5 s), wait here briefly for a slot.
                Choice::None(Reply::Postpone, _) if std::time::Instant::now() < deadline => {
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
                return Ok(Some(Accept { index, slot, conn: None }));
            }
            let act = Activity::start(Level::Talkative, &format!("connecting to '{}'", m.uri));
            let res = self.connect(index);
            drop(act);
            match res {
                Ok(conn) => {
                    out::reply(&Reply::Accept { machine: self.machines[index].uri.clone() });
                    return Ok(Some(Accept { index, slot, conn: Some(conn) }));
                }
                Err(why) => {
                    out::msg(Level::Error, &format!("build-hook: cannot build on '{}': {why}", self.machines[index].uri));
                    drop(slot);
                }
            }
        }
    }

    fn choose(&mut self, req: &TryRequest, am_willing: bool) -> anyhow::Result<Choice> {
        let _main = self.load.main_lock()?;
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
                reasons.push(format!(
                    "{}: skipped for {} more s after {} failed connection(s): {}",
                    m.uri,
                    h.retry_after - now,
                    h.failures,
                    h.reason
                ));
                continue;
            }
            right_type = true;
            let (slot, busy) = self.load.probe(&m.uri, m.max_jobs)?;
            match slot {
                Some(s) => {
                    cands.push(Candidate { index: i, load: busy, speed: m.speed_factor });
                    slots.insert(i, s);
                }
                None => reasons.push(format!("{}: all {} slot(s) busy", m.uri, m.max_jobs)),
            }
        }
        if let Some(best) = select::best(&cands) {
            let slot = slots.remove(&best.index).expect("probed");
            slot.lock.touch();
            return Ok(Choice::Chosen(best.index, slot));
        }
        let reply = select::when_all_full(right_type, am_willing && self.local_cap.could_build(req));
        Ok(Choice::None(reply, reasons))
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

    /// Opens a serve session to machine `index`, recording the outcome in the
    /// shared health state.
    fn connect(&mut self, index: usize) -> Result<Conn, String> {
        let m = self.machines[index].clone();
        let res = self.try_connect(&m);
        match &res {
            Ok(_) => {
                self.health.update(&m.uri, |h| h.succeeded(health::now()));
            }
            Err(why) => self.mark_failed(index, why),
        }
        res
    }

    /// Records that machine `index` failed: every hook process skips it for a
    /// back-off, and this job does not try it again.
    fn mark_failed(&mut self, index: usize, why: &str) {
        let (policy, j) = (self.cfg.backoff, health::jitter());
        self.health.update(&self.machines[index].uri, |h| h.failed(health::now(), why, policy, j));
        self.failed.insert(index, why.to_string());
    }

    /// The cipher order for a new connection to `m`, and why. AES-GCM goes
    /// first when both CPUs have AES instructions, no shared connection is
    /// open already (it would be used instead), and the user's ssh config and
    /// `NIX_SSHOPTS` leave the ciphers at OpenSSH's defaults (`ssh -G`).
    fn cipher_choice(&self, m: &Machine) -> (Option<String>, String) {
        let no = |why: &str| (None, format!("OpenSSH's default order ({why})"));
        if !self.cfg.prefer_aes_gcm {
            return no("BUILD_HOOK_PREFER_AES_GCM=0");
        }
        if transport::is_local(m) {
            return no("no ssh for localhost");
        }
        if !transport::local_cpu_has_aes() {
            return no("this machine's CPU has no AES instructions");
        }
        match self.health.get(&m.uri).aes {
            None => return no("not asked yet whether the builder's CPU has AES instructions"),
            Some(false) => return no("the builder's CPU has no AES instructions"),
            Some(true) => {}
        }
        let run = |c: Option<std::process::Command>| {
            c.and_then(|mut c| c.stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null()).output().ok())
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let Some(user) = run(transport::ssh_settings_command(m, &self.ssh).ok()) else { return no("'ssh -G' failed") };
        if let Some(cp) = transport::ssh_setting(&user, "controlpath").filter(|p| *p != "none") {
            // A socket nobody listens on (its master was killed) is replaced by a new master.
            if std::os::unix::net::UnixStream::connect(cp).is_ok() {
                return (None, "none needed now: a shared connection is open (its cipher was chosen when it was opened)".into());
            }
        }
        // Only now, when a new connection will be made, OpenSSH's defaults are asked for.
        let Some(defaults) = run(Some(transport::ssh_defaults_command(m, &self.ssh))) else { return no("'ssh -F /dev/null -G' failed") };
        let (u, d) = (transport::ssh_setting(&user, "ciphers"), transport::ssh_setting(&defaults, "ciphers"));
        if u != d {
            return no("your ssh config or NIX_SSHOPTS chooses the ciphers");
        }
        match u.and_then(transport::aes_gcm_first) {
            Some(list) => (Some(list), "AES-GCM first (both CPUs have AES instructions)".into()),
            None => no("no AES-GCM cipher to move first"),
        }
    }

    fn try_connect(&self, m: &Machine) -> Result<Conn, String> {
        let ssh = match self.cipher_choice(m) {
            (Some(list), _) => SshConfig { ciphers: Some(list), ..self.ssh.clone() },
            (None, _) => self.ssh.clone(),
        };
        let cmd = transport::ssh_command(m, &ssh, &transport::serve_words(m)).map_err(|e| format!("{e:#}"))?;
        let mut proc = RemoteProcess::spawn(cmd, StderrTap::default()).map_err(|e| error_chain(&e))?;
        signals::track_child(proc.child.id());
        let (r, w) = (proc.stdout.take().expect("piped"), proc.stdin.take().expect("piped"));
        // Watchdog: a handshake that hangs past the connect timeout is killed.
        let pid = proc.child.id();
        let limit = Duration::from_secs(self.cfg.connect_timeout as u64 * 2 + 5);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let dog = std::thread::spawn(move || {
            if rx.recv_timeout(limit).is_err() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        let hs = ServeConn::handshake(r, w);
        let _ = tx.send(());
        let _ = dog.join();
        match hs {
            Ok(serve) => Ok(Conn { proc, serve }),
            Err(e) => {
                let tail = proc.kill();
                Err(match transport::explain_ssh_failure(m, &tail) {
                    Some(advice) => format!("{advice}\n  ssh said: {}", last_line(&tail)),
                    None if tail.is_empty() => format!("{e} (no message from ssh within {} s)", limit.as_secs()),
                    None => format!("{e}: {tail}"),
                })
            }
        }
    }

    /// Runs the accepted job; returns the exit status for Nix. A builder that
    /// cannot be reached, or whose connection drops before the outputs are
    /// home, is recorded as failing and the job moves to another eligible
    /// builder; each builder is tried at most once.
    pub fn run_job(&mut self, req: &TryRequest, mut acc: Accept, sets: Accepted) -> i32 {
        let log = signals::build_log();
        let mut tried: Vec<String> = Vec::new();
        loop {
            let uri = self.machines[acc.index].uri.clone();
            let mut conn = match acc.conn.take() {
                Some(c) => c,
                None => match self.connect(acc.index) {
                    Ok(c) => c,
                    Err(why) => {
                        tried.push(format!("{uri}: {why}"));
                        match self.move_job(req, &uri, first_line(&why), &tried) {
                            Some(next) => {
                                acc = next;
                                continue;
                            }
                            None => return 1,
                        }
                    }
                },
            };
            if let Ok(l) = log.try_clone() {
                conn.proc.tap.forward_to(l);
            }
            let res = self.build_on(&self.machines[acc.index].clone(), req, &sets, &mut conn);
            // The builder's work is over: free the slot before anything that may
            // wait on Nix (draining the log pipe).
            drop(acc.slot);
            let tail = conn.proc.tap.tail();
            match res {
                Ok(()) => {
                    let _ = conn.finish();
                    return 0;
                }
                Err(JobError::BuildFailed { status, msg }) => {
                    out::msg(Level::Error, &format!("build of '{}' on '{uri}' failed: {msg}", req.drv_path));
                    let _ = conn.finish();
                    return match status {
                        3 => 100,
                        8 => 101,
                        _ => 1,
                    };
                }
                Err(JobError::Other(e)) => {
                    let said = conn.kill();
                    let said = if said.is_empty() { tail } else { said };
                    // Nix's server reports what it refused as "error: ..." and exits;
                    // a session that ended without that lost its connection.
                    let closed = e.chain().any(|c| matches!(c.downcast_ref::<ServeError>(), Some(ServeError::Closed { .. })));
                    if closed && remote_error(&said).is_none() {
                        let why = match last_line(&said) {
                            "" => format!("connection lost during a build ({})", error_chain(&*e)),
                            l => format!("connection lost during a build: {l}"),
                        };
                        self.mark_failed(acc.index, &why);
                        tried.push(format!("{uri}: {why}"));
                        match self.move_job(req, &uri, &why, &tried) {
                            Some(next) => {
                                acc = next;
                                continue;
                            }
                            None => return 1,
                        }
                    }
                    let said = if said.is_empty() { String::new() } else { format!("\n  the builder said: {}", said.replace('\n', "\n    ")) };
                    out::msg(Level::Error, &format!("build-hook: building '{}' on '{uri}' failed: {}{said}", req.drv_path, error_chain(&*e)));
                    return 1;
                }
            }
        }
    }

    /// Finds another builder for a job whose builder failed, or reports every
    /// builder tried and why.
    fn move_job(&mut self, req: &TryRequest, from: &str, why: &str, tried: &[String]) -> Option<Accept> {
        match self.failover(req) {
            Ok(Some((i, s))) => {
                out::msg(Level::Warn, &format!("build-hook: '{from}' failed ({why}); building '{}' on '{}' instead", req.drv_path, self.machines[i].uri));
                Some(Accept { index: i, slot: s, conn: None })
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

    /// After accept, finds another machine when the chosen one is unreachable;
    /// waits while the remaining candidates are busy.
    fn failover(&mut self, req: &TryRequest) -> anyhow::Result<Option<(usize, Slot)>> {
        loop {
            match self.choose(req, false)? {
                Choice::Chosen(i, s) => return Ok(Some((i, s))),
                Choice::None(Reply::Postpone, _) => std::thread::sleep(Duration::from_millis(200)),
                Choice::None(..) => return Ok(None),
            }
        }
    }

    /// The machine's record, after asking the builder (once, remembered)
    /// whether it has zstd and AES instructions. If ssh itself fails the
    /// answer stays unknown and is asked again next time.
    fn caps(&self, m: &Machine) -> health::Health {
        let h = self.health.get(&m.uri);
        if h.zstd.is_some() && h.aes.is_some() {
            return h;
        }
        let caps = transport::ssh_script(m, &self.ssh, transport::CAPS_PROBE)
            .ok()
            .and_then(|mut c| c.stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null()).output().ok())
            .and_then(|o| transport::parse_caps(o.status.code(), &String::from_utf8_lossy(&o.stdout)));
        let Some(caps) = caps else { return h };
        if !caps.zstd {
            out::msg(Level::Talkative, &format!("build-hook: '{}' has no zstd; copies to and from it are not compressed", m.uri));
        }
        self.health.update(&m.uri, |h| {
            h.zstd = Some(caps.zstd);
            h.aes = Some(caps.aes);
        })
    }

    /// The zstd level for bulk copies with `m` (0: raw over the interactive
    /// session): forced by BUILD_HOOK_COMPRESS, else learned per builder;
    /// whether the builder has zstd is asked once and remembered.
    fn bulk_level(&self, m: &Machine) -> i32 {
        let h = self.caps(m);
        if self.cfg.compress == Some(0) {
            return 0;
        }
        if h.zstd != Some(true) {
            return 0;
        }
        self.cfg.compress.unwrap_or_else(|| h.compress.unwrap_or(health::DEFAULT_LEVEL))
    }

    /// The level for uploading `ordered` to `m`: [`Self::bulk_level`], unless
    /// a sample of the paths says zstd would save under 5 % (already
    /// compressed sources, images, random data): then the open session,
    /// uncompressed. A level forced by BUILD_HOOK_COMPRESS is kept.
    fn upload_level(&self, m: &Machine, ordered: &[remote_lib::serve::PathInfo]) -> i32 {
        let level = self.bulk_level(m);
        if level == 0 || self.cfg.compress.is_some() {
            return level;
        }
        let parts: Vec<(u64, f64)> = ordered
            .iter()
            .map(|i| {
                let sample = StorePath::parse(&self.local.store_dir, &i.path).map(|p| sample::sample_path(&self.local.real_path(&p))).unwrap_or_default();
                (i.nar_size, sample::ratio(&sample, 1))
            })
            .collect();
        let r = sample::weighted_ratio(&parts);
        if r < sample::WORTH_COMPRESSING {
            out::msg(Level::Talkative, &format!("build-hook: the paths for '{}' look incompressible (sampled zstd ratio {r:.2}); copying them uncompressed", m.uri));
            return 0;
        }
        level
    }

    fn bulk_session(&self, m: &Machine, bulk: transport::Bulk) -> Result<RemoteProcess, JobError> {
        let cmd = transport::ssh_script(m, &self.ssh, &transport::bulk_script(m, bulk)).map_err(anyhow::Error::from)?;
        let p = RemoteProcess::spawn(cmd, StderrTap::default()).map_err(anyhow::Error::from)?;
        signals::track_child(p.child.id());
        Ok(p)
    }

    /// Reports a transfer and learns the level for the next one.
    fn learn(&self, m: &Machine, level: i32, moved: copy::Moved, t: std::time::Instant, what: &str) {
        let secs = t.elapsed().as_secs_f64();
        let how = if level > 0 { format!("zstd -{level}, {:.1} MB on the wire", moved.wire as f64 / 1e6) } else { "uncompressed".into() };
        out::msg(Level::Talkative, &format!("build-hook: {what} '{}': {} ({how})", m.uri, rate(moved.nar, t)));
        if self.cfg.compress.is_none() {
            let t = health::Transfer { level, nar: moved.nar, wire: moved.wire, secs };
            self.health.update(&m.uri, |h| h.learn(t));
        }
    }

    fn build_on(&mut self, m: &Machine, req: &TryRequest, sets: &Accepted, conn: &mut Conn) -> Result<(), JobError> {
        let drv_path = StorePath::parse(&self.local.store_dir, &req.drv_path).map_err(anyhow::Error::from)?;
        let inputs: Vec<String> = sets
            .inputs
            .iter()
            .map(|p| StorePath::parse(&self.local.store_dir, p).map(|p| p.to_string()))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::from)?;
        let drv = self.local.read_drv(&drv_path).map_err(anyhow::Error::from)?;
        let mut wanted = Vec::new();
        for w in &sets.wanted_outputs {
            let path = if w.starts_with('/') {
                w.clone()
            } else {
                match drv.outputs.iter().find(|o| &o.name == w) {
                    Some(o) if o.path_known() => o.path.clone(),
                    Some(_) => return Err(anyhow::anyhow!("output '{w}' of '{drv_path}' has no known path (content-addressed); build-hook cannot fetch it").into()),
                    None => return Err(anyhow::anyhow!("Nix asked for output '{w}', which '{drv_path}' does not have").into()),
                }
            };
            wanted.push(StorePath::parse(&self.local.store_dir, &path).map_err(anyhow::Error::from)?);
        }

        // Local helpers start now, so they are ready when outputs arrive.
        let local_proc = self.local.spawn_serve().map_err(anyhow::Error::from)?;
        signals::track_child(local_proc.child.id());
        let registrar = self.local.start_registrar().map_err(anyhow::Error::from)?;
        signals::track_child(registrar.pid());

        // 1. Inputs the builder lacks: ask once, then upload under the lock.
        let subst = self.settings.builders_use_substitutes();
        let missing = conn.serve.query_valid_paths(&inputs, true, subst).map_err(anyhow::Error::from)?;
        let missing: Vec<String> = inputs.iter().filter(|p| !missing.contains(p)).cloned().collect();
        // The local nix-store started meanwhile.
        let mut ls: LocalServe = self.local.serve_handshake(local_proc).map_err(anyhow::Error::from)?;
        if !missing.is_empty() {
            // Everything that needs only the local store happens before the lock.
            let ordered = copy::local_infos(&mut ls.1, &missing).map_err(anyhow::Error::from)?;
            let level = self.upload_level(m, &ordered);
            let wait = Activity::start(Level::Talkative, &format!("waiting for the upload lock to '{}'", m.uri));
            let _upload = self.load.upload_lock(&m.uri).map_err(anyhow::Error::from)?;
            drop(wait);
            // Another hook may have uploaded some of them while we waited.
            let valid = conn.serve.query_valid_paths(&missing, true, false).map_err(anyhow::Error::from)?;
            let ordered: Vec<_> = ordered.into_iter().filter(|i| !valid.contains(&i.path)).collect();
            if !ordered.is_empty() {
                let _act = Activity::start(Level::Info, &format!("copying {} paths to '{}'", ordered.len(), m.uri));
                let t = std::time::Instant::now();
                let moved = if level > 0 {
                    let mut bulk = self.bulk_session(m, transport::Bulk::Upload)?;
                    let (w, r) = (bulk.stdin.take().expect("piped"), bulk.stdout.take().expect("piped"));
                    let res = copy::upload_bulk(&mut ls.1, w, r, &ordered, level);
                    finish_bulk(bulk, res)?
                } else {
                    let nar = copy::upload(&mut ls.1, &mut conn.serve, &ordered).map_err(anyhow::Error::from)?;
                    copy::Moved { nar, wire: nar }
                };
                self.learn(m, level, moved, t, &format!("copied {} paths to", ordered.len()));
            }
        }

        // 2. Build. A compressed download session is opened now, so that it is
        // ready when the build ends (opening one costs round trips and a
        // remote nix-store start), unless that could take more sessions than
        // sshd allows on one connection.
        let down_level = self.bulk_level(m);
        let mut ready = Spare(None);
        if down_level > 0 && m.max_jobs <= MAX_JOBS_FOR_SPARE_SESSION {
            ready.0 = Some(self.bulk_session(m, transport::Bulk::Download { level: down_level })?);
        }
        let opts = self.settings.build_options();
        let res = conn.serve.build_derivation(drv_path.as_str(), &drv, &inputs, &opts).map_err(anyhow::Error::from)?;
        if !res.success() {
            let msg = if res.error_msg.is_empty() { res.status_name().to_string() } else { res.error_msg.clone() };
            return Err(JobError::BuildFailed { status: res.status, msg });
        }

        // 3. Outputs missing locally.
        let want: Vec<String> = wanted.iter().map(|p| p.to_string()).collect();
        let valid = ls.1.query_valid_paths(&want, false, false).map_err(anyhow::Error::from)?;
        let fetch: Vec<StorePath> = wanted.into_iter().filter(|p| !valid.iter().any(|v| v == p.as_str())).collect();
        if !fetch.is_empty() {
            let _act = Activity::start(Level::Info, &format!("copying outputs from '{}'", m.uri));
            let level = down_level;
            let t = std::time::Instant::now();
            let moved = if level > 0 {
                let infos = copy::remote_infos(&mut conn.serve, &fetch).map_err(anyhow::Error::from)?;
                let mut bulk = match ready.0.take() {
                    Some(b) => b,
                    None => self.bulk_session(m, transport::Bulk::Download { level })?,
                };
                let (w, r) = (bulk.stdin.take().expect("piped"), bulk.stdout.take().expect("piped"));
                let res = copy::download_bulk(w, r, infos, &self.local, &fetch, registrar, &mut |p| signals::track_temp(p));
                finish_bulk(bulk, res)?
            } else {
                let nar = copy::download(&mut conn.serve, &self.local, &fetch, registrar, &mut |p| signals::track_temp(p)).map_err(anyhow::Error::from)?;
                copy::Moved { nar, wire: nar }
            };
            self.learn(m, level, moved, t, &format!("copied {} outputs from", fetch.len()));
        }
        let (p, c) = ls;
        drop(c);
        let _ = p.finish();
        Ok(())
    }
}

/// sshd allows 10 sessions per connection by default (`MaxSessions`); with
/// a spare download session, each build on a builder holds two. Beyond this
/// many jobs per builder the spare is not opened (OpenSSH would fall back to
/// a new connection for sessions over the limit, which costs more).
const MAX_JOBS_FOR_SPARE_SESSION: u64 = 4;

/// A bulk session opened ahead of need; killed if it was not used.
struct Spare(Option<RemoteProcess>);
impl Drop for Spare {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.kill();
        }
    }
}

/// Where shared-connection sockets go: the load directory when the socket
/// path fits, else a private directory in /tmp; `None` disables sharing.
fn control_dir(load: &LoadDir) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // sun_path holds 107 bytes; OpenSSH binds "<dir>/<%C: 40>.<16 random>" first.
    const MAX_DIR: usize = 107 - 1 - 40 - 17;
    let uid = unsafe { libc::geteuid() };
    let preferred = load.private_dir("ssh");
    let dir = if preferred.as_os_str().len() <= MAX_DIR { preferred } else { std::env::temp_dir().join(format!("build-hook-ssh-{uid}")) };
    if dir.as_os_str().len() > MAX_DIR {
        return None;
    }
    let _ = std::fs::create_dir_all(&dir);
    let md = std::fs::symlink_metadata(&dir).ok()?;
    // Never use a directory someone else could have prepared for us.
    if !md.is_dir() || md.uid() != uid {
        return None;
    }
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    Some(dir)
}

/// Waits for a bulk session and turns its outcome into the job's: the
/// builder's own words when it refused something, a lost connection as such
/// (so the job fails over).
fn finish_bulk(bulk: RemoteProcess, res: Result<copy::Moved, copy::CopyError>) -> Result<copy::Moved, JobError> {
    match res {
        Ok(moved) => {
            let (status, tail) = bulk.finish();
            match status {
                Some(s) if s.success() => Ok(moved),
                _ => Err(anyhow::anyhow!("the bulk copy session ended badly: {}", if tail.is_empty() { "no message" } else { &tail }).into()),
            }
        }
        Err(e) => {
            let tail = bulk.kill();
            let closed = matches!(&e, copy::CopyError::Serve { source: ServeError::Closed { .. }, .. });
            let e = anyhow::Error::from(e);
            if closed && remote_error(&tail).is_none() {
                // The session vanished without Nix saying why: the link or the builder went away.
                return Err(anyhow::Error::from(ServeError::Closed { during: "a bulk copy" }).context(format!("{e:#}")).into());
            }
            // The builder refused (or we failed): not a lost connection, so no fail-over.
            Err(anyhow::anyhow!("{e:#}{}", if tail.is_empty() { String::new() } else { format!("\n  the builder said: {}", tail.replace('\n', "\n    ")) }).into())
        }
    }
}

enum JobError {
    BuildFailed { status: u64, msg: String },
    Other(anyhow::Error),
}

impl From<anyhow::Error> for JobError {
    fn from(e: anyhow::Error) -> Self {
        JobError::Other(e)
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// "12.3 MB of NAR in 0.45 s (27.3 MB/s)"
fn rate(bytes: u64, since: std::time::Instant) -> String {
    let secs = since.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6;
    format!("{mb:.1} MB of NAR in {secs:.2} s ({:.1} MB/s)", mb / secs.max(1e-6))
}

/// The `error: ...` line a Nix process printed before exiting, if any
/// (ANSI colour codes removed).
fn remote_error(tail: &str) -> Option<String> {
    tail.lines().map(strip_ansi).find(|l| l.trim_start().starts_with("error:"))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

