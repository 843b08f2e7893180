//! One remote build, in four steps: [`Plan::new`] works out from the local
//! store what to send, build and fetch; then over an open [`Session`],
//! [`Job::upload_inputs`], [`Job::build`] and [`Job::fetch_outputs`]. Every
//! step returns a typed error; a builder's fault is classified by the
//! session ([`crate::session::verdict`]), so every phase fails over the same
//! way. The library never prints: progress goes through [`Events`].

use crate::compress;
use crate::copy::{self, CopyError, Moved, NarSource, PathMeta, Receive};
use crate::cpu;
use crate::derivation::{Derivation, Kind};
use crate::health::{self, Health, HealthStore};
use crate::hook_protocol::{Accepted, BuildOptions};
use crate::local_store::{LocalServe, LocalStore, LocalStoreError, Registrar, StoreDb};
use crate::machines::Machine;
use crate::nixlog::Level;
use crate::path_info::FixedHash;
use crate::sample;
use crate::serve::{BuildStatus, PathInfo};
use crate::session::{self, BulkSession, Fault, Session, SessionError};
use crate::slots::{FileLock, LoadDir};
use crate::store_path::StorePath;
use crate::transport::{self, SshConfig};
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a job did not complete.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The builder failed us (see [`SessionError`]).
    #[error(transparent)]
    Builder(#[from] SessionError),
    /// The build ran and failed there.
    #[error("{msg}")]
    BuildFailed { status: BuildStatus, msg: String },
    /// Something failed on this machine before or between exchanges.
    #[error("{during}: {why}")]
    Local { during: &'static str, why: String },
}

fn local(during: &'static str) -> impl Fn(LocalStoreError) -> JobError {
    move |e| JobError::Local { during, why: session::chain(&e) }
}

/// What the hook reports while a job runs (the binary turns these into
/// Nix's log records, and remembers temporaries for its signal handler).
pub trait Events {
    fn log(&self, level: Level, text: &str);
    /// Starts an activity shown while it lasts; returns its id.
    fn start(&self, level: Level, text: &str) -> u64;
    fn stop(&self, id: u64);
    /// A temporary path in the store that must be removed if we are killed.
    fn temp(&self, path: &Path);
}

/// An activity, stopped when dropped.
struct Act<'a>(&'a dyn Events, u64);
impl<'a> Act<'a> {
    fn start(ev: &'a dyn Events, level: Level, text: &str) -> Self {
        Act(ev, ev.start(level, text))
    }
}
impl Drop for Act<'_> {
    fn drop(&mut self) {
        self.0.stop(self.1);
    }
}

/// What a job sends, builds and fetches, from the local store.
#[derive(Clone, Debug)]
pub struct Plan {
    pub drv_path: StorePath,
    pub drv: Derivation,
    /// The input closure Nix sent after `# accept`.
    pub inputs: Vec<String>,
    /// The outputs Nix wants.
    pub wanted: Vec<StorePath>,
    /// Fixed-output outputs and their declared hashes.
    pub fixed: Vec<(StorePath, FixedHash)>,
    /// Wanted outputs of a floating content-addressed derivation, whose
    /// paths the builder tells after building.
    pub floating: Vec<String>,
    /// For those: the derivation's hash modulo, which keys their
    /// realisations (`sha256:<base16>`), worked out here, not taken from
    /// the builder.
    pub drv_hash: Option<String>,
    /// NAR bytes the last build of a derivation of this name downloaded
    /// (a hint from the history: small, and no compressed session is opened
    /// ahead of the download).
    pub expected_download: Option<u64>,
}

impl Plan {
    /// Reads the `.drv` and checks every path Nix sent (kept, not copied:
    /// the input closure can hold tens of thousands of paths).
    pub fn new(store: &LocalStore, drv_path: &str, sets: Accepted) -> Result<Plan, JobError> {
        let bad = |e: &dyn std::error::Error| JobError::Local { during: "reading the request", why: e.to_string() };
        let sd = &store.store_dir;
        let drv_path = StorePath::parse(sd, drv_path).map_err(|e| bad(&e))?;
        let mut inputs = sets.inputs;
        for p in inputs.iter_mut() {
            *p = StorePath::parse(sd, p).map_err(|e| bad(&e))?.to_string();
        }
        let drv = store.read_drv(&drv_path).map_err(local("reading the derivation"))?;
        let mut wanted = Vec::new();
        let mut floating = Vec::new();
        let is_floating = drv.kind() == Kind::Floating;
        for w in &sets.wanted_outputs {
            let path = if w.starts_with('/') {
                w.clone()
            } else {
                match drv.outputs.iter().find(|o| &o.name == w) {
                    Some(o) if o.path_known() => o.path.clone(),
                    Some(_) if is_floating => {
                        floating.push(w.clone());
                        continue;
                    }
                    Some(_) => {
                        return Err(JobError::Local {
                            during: "reading the derivation",
                            why: format!("output '{w}' of '{drv_path}' has no known path (content-addressed); build-hook cannot fetch it"),
                        })
                    }
                    None => return Err(JobError::Local { during: "reading the derivation", why: format!("Nix asked for output '{w}', which '{drv_path}' does not have") }),
                }
            };
            wanted.push(StorePath::parse(sd, &path).map_err(|e| bad(&e))?);
        }
        let mut fixed = Vec::new();
        for o in drv.outputs.iter().filter(|o| o.path_known()) {
            if let Some(h) = FixedHash::of_output(o).map_err(|e| bad(&e))? {
                fixed.push((StorePath::parse(sd, &o.path).map_err(|e| bad(&e))?, h));
            }
        }
        let drv_hash = if floating.is_empty() {
            None
        } else {
            if !store.on_disk() {
                return Err(JobError::Local {
                    during: "reading the derivation",
                    why: format!("'{drv_path}' is content-addressed, and build-hook registers realisations only in a store on this machine's disk"),
                });
            }
            let mut read = |p: &str| StorePath::parse(sd, p).map_err(|e| e.to_string()).and_then(|p| store.read_drv(&p).map_err(|e| session::chain(&e)));
            let h = drv.hash_modulo(&mut read).map_err(|why| JobError::Local { during: "hashing the derivation", why })?;
            Some(format!("sha256:{}", crate::hash::Sha256Hash(h).to_hex()))
        };
        Ok(Plan { drv_path, drv, inputs, wanted, fixed, floating, drv_hash, expected_download: None })
    }
}

/// Everything a job needs besides the session and the plan.
pub struct Context<'a> {
    pub local: &'a LocalStore,
    pub ssh: &'a SshConfig,
    pub load: &'a LoadDir,
    pub health: &'a HealthStore,
    /// `BUILD_HOOK_COMPRESS`: a forced zstd level (0: never), or `None` to learn.
    pub forced_level: Option<i32>,
    pub options: BuildOptions,
    pub substitute: bool,
}

/// The builder's health record, after asking it (once, remembered) whether
/// it has zstd and AES instructions and, when it has zstd and no level was
/// learned or measured yet, how fast the link is ([`session::probe_link`]),
/// so that the first copy already uses the right level. If ssh fails the
/// capabilities stay unknown and are asked again next time; a link probe
/// that fails leaves the default level, which the first copy then corrects.
/// With a level the user forced (`forced`) the link is not asked.
pub fn builder_caps(health: &HealthStore, m: &Machine, ssh: &SshConfig, limit: Duration, forced: Option<i32>) -> Health {
    probe_builder(health, m, ssh, limit, Probe::All, forced)
}

/// What [`probe_builder`] asks, of what is not known yet.
#[derive(Clone, Copy)]
enum Probe<'f> {
    /// Capabilities and the link's rate.
    All,
    /// The same, beside an upload sharing the link (the flag cancels the
    /// link probe once set): the rate it measures is a share of the link's,
    /// so only the level it chooses is kept, not the rate (the transfers
    /// then measure it).
    BesideUpload(&'f std::sync::atomic::AtomicBool),
    /// Capabilities only: beside a build (a busy builder says what it has
    /// as well as an idle one, but its link would measure slow), or beside
    /// an upload whose raw start measures the link itself.
    CapsOnly,
}

/// Whether the link's rate or a level for it is known, or not needed (a
/// builder without zstd is copied raw; a level the user forced is used
/// whatever the link).
fn link_known(h: &Health, forced: Option<i32>) -> bool {
    forced.is_some() || h.zstd == Some(false) || h.raw_mbps.is_some() || h.compress.is_some()
}

/// [`builder_caps`], asking what `probe` says (and never the link when the
/// user forced a level).
fn probe_builder(health: &HealthStore, m: &Machine, ssh: &SshConfig, limit: Duration, probe: Probe, forced: Option<i32>) -> Health {
    let h = health.get(&m.uri);
    if transport::is_local(m) {
        // Between two processes on this host nothing is worth compressing
        // (level 0) unless the user forces a level; nothing to probe.
        static ZSTD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let zstd = *ZSTD.get_or_init(|| {
            std::process::Command::new("zstd").arg("-V").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
        });
        return Health { zstd: Some(zstd), aes: Some(false), compress: Some(0), ..h };
    }
    let have_caps = h.zstd.is_some() && h.aes.is_some();
    let want_link = !matches!(probe, Probe::CapsOnly) && !link_known(&h, forced);
    if have_caps && !want_link {
        return h;
    }
    let (zstd, aes) = match (h.zstd, h.aes) {
        (Some(z), Some(a)) => (z, a),
        _ => match session::probe_caps(m, ssh, limit) {
            // An ssh-ng builder's bulk sessions run its nix-store (with the
            // daemon's trust when the user is not root), so they need one.
            Some(caps) => (transport::bulk_allowed(m, &caps), caps.aes),
            None => return h,
        },
    };
    let cancelled = matches!(probe, Probe::BesideUpload(c) if c.load(std::sync::atomic::Ordering::Relaxed));
    let asked_link = zstd && want_link && !cancelled;
    let link = if asked_link { session::probe_link(m, ssh, limit) } else { None };
    health.update(&m.uri, |h| {
        h.zstd = Some(zstd);
        h.aes = Some(aes);
        match (link, h.raw_mbps) {
            (Some((mbps, idle)), None) => {
                if !matches!(probe, Probe::BesideUpload(_)) {
                    h.raw_mbps = Some(mbps);
                }
                h.compress = Some(health::level_for_probed_rate(mbps, idle));
            }
            // Not asked again on every copy: the default level until a
            // transfer measures the link.
            (None, None) if asked_link && h.compress.is_none() => h.compress = Some(health::DEFAULT_LEVEL),
            _ => {}
        }
    })
}

/// How an upload's level is decided ([`Job::upload_level`]).
enum UploadLevel {
    Known(i32),
    /// Raw at first, while the builder is probed ([`Job::upload_raw_while_probing`]);
    /// the first `n` paths sampled incompressible (moved to the front) go
    /// raw whatever the probes say.
    RawWhileProbing(usize),
}

/// In a first upload copied raw while the link is measured, at most this
/// many bytes of NAR are sent before the measurement has answered (besides
/// the paths sampled incompressible, moved to the front, which go raw
/// whatever it says).
pub const RAW_BEFORE_PROBED: u64 = 8 << 20;

/// Whether [`builder_caps`] would answer without asking the builder (its
/// capabilities known, and its link or a level for it).
fn nothing_to_ask(health: &HealthStore, m: &Machine, forced: Option<i32>) -> bool {
    let h = health.get(&m.uri);
    transport::is_local(m) || (h.zstd.is_some() && h.aes.is_some() && link_known(&h, forced))
}

/// sshd allows 10 sessions per connection by default (`MaxSessions`); with
/// a spare download session, each build on a builder holds two. Beyond this
/// many jobs per builder the spare is not opened (OpenSSH would fall back to
/// a new connection for sessions over the limit, which costs more).
const MAX_JOBS_FOR_SPARE_SESSION: u64 = 4;

/// What a job moved and how long each step took (for the history).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub upload_bytes: u64,
    pub upload_secs: f64,
    pub build_secs: f64,
    pub download_bytes: u64,
    pub download_secs: f64,
}

/// A job on one builder.
pub struct Job<'a> {
    ctx: &'a Context<'a>,
    m: &'a Machine,
    plan: &'a Plan,
    ev: &'a dyn Events,
    session: Option<Session>,
    local: LocalSide<'a>,
    /// Started when the build is, so that its start-up overlaps the build.
    registrar: Option<Registrar>,
    /// A download session opened while the build runs.
    spare: Option<BulkSession>,
    /// The floating outputs' paths, as the builder reported them (checked).
    built: Vec<(String, StorePath)>,
    /// An `ssh-ng://` builder whose daemon does not trust us, building an
    /// input-addressed derivation: it refuses `BuildDerivation`, so the
    /// `.drv` and its closure are copied and the derivation built by path,
    /// as Nix's own hook does.
    by_path: bool,
    pub stats: Stats,
}

impl<'a> Job<'a> {
    /// A job over `session`. Nothing local is started yet: a store on this
    /// disk is read directly, and the registration process starts with the
    /// build.
    pub fn new(ctx: &'a Context<'a>, m: &'a Machine, plan: &'a Plan, session: Session, ev: &'a dyn Events) -> Result<Job<'a>, JobError> {
        let stall = session.timeouts().stall;
        let mut session = session;
        let mut by_path = false;
        if m.ssh.daemon && !matches!(plan.drv.kind(), Kind::Fixed | Kind::Floating) {
            session.phase("asking whether the builder trusts us");
            match session.serve.bridge_trust() {
                Ok(info) => by_path = info.trusted == Some(false),
                Err(e) => return Err(JobError::Builder(session.fail("asking whether the builder trusts us", Fault::from(&e)))),
            }
            session.idle();
            if by_path {
                ev.log(Level::Talkative, &format!("build-hook: '{}' does not trust this user: copying the derivation and building it by path", m.uri));
            }
        }
        let local = LocalSide::new(ctx.local, ev, stall);
        Ok(Job { ctx, m, plan, ev, session: Some(session), local, registrar: None, spare: None, built: Vec::new(), by_path, stats: Stats::default() })
    }

    /// Runs the three remote steps and closes the session; `stats` says
    /// what was done, also when a step failed. `built` runs once the remote
    /// build has succeeded, before the outputs are fetched (the caller frees
    /// the builder's slot there: the builder's work is done).
    pub fn run(mut self, stats: &mut Stats, built: impl FnOnce()) -> Result<(), JobError> {
        let res = self.steps(built);
        *stats = self.stats;
        res
    }

    fn steps(&mut self, built: impl FnOnce()) -> Result<(), JobError> {
        self.upload_inputs()?;
        self.build()?;
        built();
        self.fetch_outputs()?;
        if let Some(s) = self.session.take() {
            s.close_after_success();
        }
        self.local.close();
        Ok(())
    }

    fn session(&mut self) -> &mut Session {
        self.session.as_mut().expect("the session is open until a step fails")
    }

    /// Ends the session on a builder's fault and says what it was.
    fn fail(&mut self, during: &'static str, fault: Fault) -> JobError {
        match self.session.take() {
            Some(s) => JobError::Builder(s.fail(during, fault)),
            None => JobError::Local { during, why: "the session is already closed".into() },
        }
    }

    fn copy_err(&mut self, during: &'static str, e: CopyError) -> JobError {
        if e.is_local() {
            return JobError::Local { during, why: session::chain(&e) };
        }
        self.fail(during, Fault::from(&e))
    }

    /// Step 1: the inputs the builder lacks (one question), uploaded under
    /// the builder's upload lock in dependency order.
    pub fn upload_inputs(&mut self) -> Result<(), JobError> {
        let (ctx, m, plan) = (self.ctx, self.m, self.plan);
        // Only a build by path adds to the closure Nix sent (no copy else).
        let mut inputs = std::borrow::Cow::Borrowed(&plan.inputs);
        if self.by_path {
            for p in self.drv_closure()? {
                if !inputs.contains(&p) {
                    inputs.to_mut().push(p);
                }
            }
        }
        // A lock free now is taken before the question: every uploader holds
        // it while it uploads, so the answer stands until our upload ends and
        // is asked once. A busy lock is waited for after the local work, and
        // the question asked again (where an error taking it is reported,
        // if there is anything to upload). Not when the builder may
        // substitute: the question can then take minutes, and the lock would
        // hold every other upload to the builder back meanwhile.
        let early = if ctx.substitute { None } else { ctx.load.upload_lock_until(&m.uri, Instant::now()).unwrap_or(None) };
        self.session().phase("QueryValidPaths");
        let valid = match self.session().serve.query_valid_paths(&inputs, true, ctx.substitute) {
            Ok(v) => v,
            Err(e) => return Err(self.fail("QueryValidPaths", Fault::from(&e))),
        };
        let valid: std::collections::HashSet<String> = valid.into_iter().collect();
        // Borrowed: the closure can hold tens of thousands of paths.
        let missing: Vec<&str> = inputs.iter().map(String::as_str).filter(|p| !valid.contains(*p)).collect();
        self.session().idle();
        if missing.is_empty() {
            return Ok(());
        }
        // Everything that needs only the local store happens before waiting
        // for a busy lock.
        let mut ordered = copy::local_infos(&mut self.local, &missing).map_err(|e| JobError::Local { during: "reading the inputs", why: session::chain(&e) })?;
        let level = self.upload_level(&mut ordered);
        let (lock, level, ordered) = match early {
            Some(lock) => (Some(lock), level, ordered),
            None => {
                let lock = self.wait_upload_lock()?;
                // Another hook may have uploaded some of them while we waited.
                self.session().phase("QueryValidPaths");
                let valid = match self.session().serve.query_valid_paths(&missing, true, false) {
                    Ok(v) => v,
                    Err(e) => return Err(self.fail("QueryValidPaths", Fault::from(&e))),
                };
                self.session().idle();
                let valid: std::collections::HashSet<String> = valid.into_iter().collect();
                let level = match level {
                    UploadLevel::RawWhileProbing(n) => UploadLevel::RawWhileProbing(ordered[..n].iter().filter(|i| !valid.contains(&i.path)).count()),
                    known => known,
                };
                (lock, level, ordered.into_iter().filter(|i| !valid.contains(&i.path)).collect::<Vec<PathInfo>>())
            }
        };
        if ordered.is_empty() {
            return Ok(());
        }
        let stall = self.session().timeouts().stall;
        let _act = Act::start(self.ev, Level::Info, &format!("copying {} paths to '{}'", ordered.len(), m.uri));
        let (level, ordered) = match level {
            UploadLevel::Known(level) => (level, &ordered[..]),
            UploadLevel::RawWhileProbing(raw_first) => match self.upload_raw_while_probing(&ordered, raw_first)? {
                Some((level, sent)) => (level, &ordered[sent..]),
                None => {
                    drop(lock);
                    return Ok(());
                }
            },
        };
        let t = cpu::Stopwatch::start();
        let moved = if level > 0 {
            let mut bulk = BulkSession::open(m, ctx.ssh, transport::Bulk::Upload, stall)?;
            let Some((w, r)) = bulk.streams("a bulk upload") else { return Err(JobError::Local { during: "a bulk upload", why: "no pipes".into() }) };
            let res = self.local.nars().and_then(|mut nars| copy::upload_bulk(&mut *nars, w, r, ordered, level));
            bulk.finish("a bulk upload", res)?
        } else {
            let (nar, ..) = self.raw_part(ordered, &mut |_| true)?;
            Moved { nar, wire: nar }
        };
        drop(lock);
        self.local.idle();
        self.session().idle();
        self.stats.upload_bytes += moved.nar;
        self.stats.upload_secs += t.elapsed().as_secs_f64();
        self.learn(level, moved, t.secs(), t.idle_cores(), &format!("copied {} paths to", ordered.len()));
        Ok(())
    }

    /// Waits for the builder's upload lock, up to the stall timeout: the
    /// lock only saves duplicate uploads, so after that the upload goes on
    /// without it (`None`).
    fn wait_upload_lock(&mut self) -> Result<Option<FileLock>, JobError> {
        let (ctx, m) = (self.ctx, self.m);
        let stall = self.session().timeouts().stall;
        let lock = {
            let _wait = Act::start(self.ev, Level::Talkative, &format!("waiting for the upload lock to '{}'", m.uri));
            ctx.load.upload_lock_until(&m.uri, Instant::now() + stall).map_err(|e| JobError::Local { during: "taking the upload lock", why: session::chain(&e) })?
        };
        if lock.is_none() {
            self.ev.log(Level::Talkative, &format!("build-hook: the upload lock of '{}' is still held after {} s; uploading without it", m.uri, stall.as_secs()));
        }
        Ok(lock)
    }

    /// The first upload to a builder whose link is not known yet (nor,
    /// perhaps, its capabilities), whose paths sampled compressible:
    /// instead of measuring the link before it (two ssh sessions and a few
    /// megabytes, ≈0.1 s on a fast link), the paths go
    /// raw at once while the probes run beside them ([`builder_caps`]).
    /// Once they have answered, a fast link keeps the raw copy going; on a
    /// slow one the paths not yet sent go compressed instead. Before the
    /// answer at most [`RAW_BEFORE_PROBED`] go raw: the raw copy then stops
    /// (every path sent acknowledged, the session idle) and the answer is
    /// awaited, for at most the stall timeout (then raw). The first
    /// `raw_first` paths, sampled incompressible, go raw whatever the
    /// answer (a slow link loses nothing on them while it is measured).
    /// Returns the level for the paths left and how many were sent, or
    /// `None` when all were.
    fn upload_raw_while_probing(&mut self, ordered: &[PathInfo], raw_first: usize) -> Result<Option<(i32, usize)>, JobError> {
        let (ctx, m) = (self.ctx, self.m);
        let limit = self.ctx_stall();
        self.ev.log(Level::Talkative, &format!("build-hook: copying to '{}' uncompressed while the link is measured", m.uri));
        // Enough incompressible bytes in front measure the link themselves:
        // only the capabilities are asked then (the link probe's few
        // megabytes would share a slow link with them).
        let caps_only = ordered[..raw_first].iter().map(|i| i.nar_size).sum::<u64>() >= health::RAW_START_MEASURES;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            let (tx, rx) = std::sync::mpsc::channel();
            let cancel = &cancel;
            let probe = if caps_only { Probe::CapsOnly } else { Probe::BesideUpload(cancel) };
            sc.spawn(move || {
                let _ = tx.send(compress::bulk_level(&probe_builder(ctx.health, m, ctx.ssh, limit, probe, None), ctx.forced_level));
            });
            let res = self.raw_until_probed(ordered, raw_first, caps_only, &rx, limit);
            if res.is_err() {
                // The job fails: no link probe after the capabilities.
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            res
        })
    }

    fn raw_until_probed(
        &mut self,
        ordered: &[PathInfo],
        raw_first: usize,
        caps_only: bool,
        probed: &std::sync::mpsc::Receiver<i32>,
        limit: Duration,
    ) -> Result<Option<(i32, usize)>, JobError> {
        let (mut level, mut raw, mut asked) = (None, 0u64, 0usize);
        let mut go_on = |info: &PathInfo| {
            if level.is_none() {
                level = probed.try_recv().ok();
            }
            asked += 1;
            if asked <= raw_first {
                return true;
            }
            match level {
                Some(l) => l == 0,
                None => {
                    raw += info.nar_size;
                    raw <= RAW_BEFORE_PROBED
                }
            }
        };
        let (mut nar, mut sent, mut secs, idle) = self.raw_part(ordered, &mut go_on)?;
        if level.is_none() && sent < ordered.len() {
            level = Some(probed.recv_timeout(limit).unwrap_or(0));
        }
        let raw_rate = (nar >= health::RAW_START_MEASURES && secs > 0.0).then(|| (nar as f64 / 1e6 / secs, idle));
        let level = if caps_only {
            let caps = level.unwrap_or(0);
            let l = health::level_after_measuring_start(caps, nar, raw_rate);
            // Too small for the transfer to be learned from: its level is
            // kept, as a probe beside an upload's is, so the download does
            // not probe the link again.
            if caps > 0 && raw_rate.is_some() && nar < health::MIN_SAMPLE_BYTES && self.ctx.forced_level.is_none() {
                self.ctx.health.update(&self.m.uri, |h| {
                    if h.compress.is_none() {
                        h.compress = Some(l);
                    }
                });
            }
            l
        } else {
            health::level_after_raw_start(level.unwrap_or(0), raw_rate)
        };
        let left: u64 = ordered[sent..].iter().map(|i| i.nar_size).sum();
        // A few paths left are not worth a compressed session.
        let compress_rest = level > 0 && left >= compress::SMALL_DOWNLOAD;
        if sent < ordered.len() && !compress_rest {
            let (n, k, t, _) = self.raw_part(&ordered[sent..], &mut |_| true)?;
            (nar, sent, secs) = (nar + n, sent + k, secs + t);
        }
        // Timed while sending only, not while waiting for the probe.
        self.stats.upload_bytes = nar;
        self.stats.upload_secs = secs;
        if sent > 0 {
            self.learn(0, Moved { nar, wire: nar }, secs, idle, &format!("copied {sent} paths to"));
        }
        if sent == ordered.len() {
            return Ok(None);
        }
        self.ev.log(
            Level::Talkative,
            &format!(
                "build-hook: the link to '{}' measured slow: the other {} paths ({:.1} MB) go compressed (zstd -{level})",
                self.m.uri,
                ordered.len() - sent,
                left as f64 / 1e6
            ),
        );
        Ok(Some((level, sent)))
    }

    /// Uploads `paths` raw on the session while `go_on` says so
    /// ([`copy::upload_while`]; to an `ssh-ng://` builder all of them in one
    /// request, `go_on` not asked): bytes of NAR, paths sent, seconds and
    /// idle CPUs meanwhile.
    fn raw_part(&mut self, paths: &[PathInfo], go_on: &mut dyn FnMut(&PathInfo) -> bool) -> Result<(u64, usize, f64, Option<f64>), JobError> {
        let t = cpu::Stopwatch::start();
        let daemon = self.m.ssh.daemon;
        self.session().phase("AddToStoreNar");
        let Some(s) = self.session.as_mut() else { unreachable!("open") };
        let res = self.local.nars().and_then(|mut nars| {
            let nars = &mut *nars;
            if daemon {
                copy::upload_multiple(nars, &mut s.serve, paths).map(|nar| (nar, paths.len()))
            } else {
                copy::upload_while(nars, &mut s.serve, paths, go_on)
            }
        });
        let (nar, sent) = match res {
            Ok(r) => r,
            Err(e) => return Err(self.copy_err("uploading inputs", e)),
        };
        self.local.idle();
        self.session().idle();
        Ok((nar, sent, t.secs(), t.idle_cores()))
    }

    /// The level for uploading `ordered`: the builder's bulk level, unless a
    /// sample of its largest paths says zstd would save under 5 %. On first
    /// contact the sample comes first: incompressible data goes raw without
    /// asking the builder anything (the capability and link probes then run
    /// with the build, when the download needs them, and the raw upload
    /// itself measures the link).
    ///
    /// When the copy starts raw beside the probes, the paths sampled
    /// incompressible are moved to its front ([`copy::to_front`]): they
    /// lose nothing raw, and measure the link meanwhile.
    fn upload_level(&mut self, ordered: &mut [PathInfo]) -> UploadLevel {
        let (ctx, m) = (self.ctx, self.m);
        if ctx.forced_level.is_some() || (nothing_to_ask(ctx.health, m, None) && self.bulk_level() == 0) {
            return UploadLevel::Known(self.bulk_level());
        }
        // One path's sample at a time: only its ratio is kept; the largest
        // paths only ([`compress::to_sample`]).
        let sizes: Vec<u64> = ordered.iter().map(|i| i.nar_size).collect();
        let sampled = compress::to_sample(&sizes);
        // (NAR size, ratio, whether any byte was sampled: a symlink farm or
        // an unreadable path has nothing to say about itself.)
        let samples: Vec<(u64, f64, bool)> = sampled
            .iter()
            .map(|&k| &ordered[k])
            .map(|i| {
                let s = StorePath::parse(&ctx.local.store_dir, &i.path).map(|p| sample::sample_path(&ctx.local.real_path(&p))).unwrap_or_default();
                (i.nar_size, sample::ratio(&s, 1), !s.is_empty())
            })
            .collect();
        let parts: Vec<(u64, f64)> = samples.iter().map(|&(n, r, _)| (n, r)).collect();
        // Measured beside the copy when nothing was asked yet, the copy is
        // one the serve session can stop between two paths, and its NARs
        // come from the files (a local serve session reads ahead).
        let beside = !nothing_to_ask(ctx.health, m, None) && !m.ssh.daemon && self.local.reads_files();
        let (level, ratio) = compress::upload_level(&parts, || if beside { 0 } else { self.bulk_level() });
        match ratio {
            Some(r) => {
                self.ev.log(Level::Talkative, &format!("build-hook: the paths for '{}' look incompressible (sampled zstd ratio {r:.2}); copying them uncompressed", m.uri));
                UploadLevel::Known(level)
            }
            // Compressible: the level was asked for.
            None if beside => {
                let mut front = vec![false; ordered.len()];
                for (&k, &(_, r, seen)) in sampled.iter().zip(&samples) {
                    front[k] = seen && r < sample::WORTH_COMPRESSING;
                }
                UploadLevel::RawWhileProbing(copy::to_front(ordered, &front))
            }
            None => UploadLevel::Known(level),
        }
    }

    /// The level for bulk copies with this builder ([`compress::bulk_level`]
    /// of what [`builder_caps`] knows or asks; with a forced level only the
    /// capabilities are asked).
    fn bulk_level(&self) -> i32 {
        compress::bulk_level(&builder_caps(self.ctx.health, self.m, self.ctx.ssh, self.ctx_stall(), self.ctx.forced_level), self.ctx.forced_level)
    }

    fn ctx_stall(&self) -> Duration {
        self.session.as_ref().map(|s| s.timeouts().stall).unwrap_or(Duration::from_secs(60))
    }

    /// Step 2: `BuildDerivation`, the log streaming to Nix meanwhile. Once
    /// it is sent, the local registration is started and, when the level is
    /// known, a compressed download session opened (unless that could take
    /// more sessions than sshd allows on one connection), so that both are
    /// ready when the build ends; a builder not asked about itself yet is
    /// asked for its capabilities meanwhile.
    pub fn build(&mut self) -> Result<(), JobError> {
        let (ctx, m, plan) = (self.ctx, self.m, self.plan);
        // A builder not asked about itself yet (a first contact with nothing
        // to upload) is not asked now, before the build: that took 0.25-0.3 s
        // per build in a fan-out's first round. Its capabilities are asked
        // beside the build (a busy builder says what it has as well as an
        // idle one); its link only if a large download needs a level, once
        // the build has ended (a busy builder's link would measure slow).
        let level = nothing_to_ask(ctx.health, m, ctx.forced_level).then(|| self.bulk_level());
        self.session().building();
        let t = Instant::now();
        let sent = if self.by_path {
            let outputs: Vec<String> = plan.drv.outputs.iter().map(|o| o.name.clone()).collect();
            self.session().serve.send_bridge_build_paths(plan.drv_path.as_str(), &outputs, &ctx.options)
        } else {
            self.session().serve.send_build_derivation(plan.drv_path.as_str(), &plan.drv, &plan.inputs, &ctx.options)
        };
        if let Err(e) = sent {
            return Err(self.fail("the build", Fault::from(&e)));
        }
        // What the download will need starts once the build is asked for,
        // not before: its start-up (processes here and on the builder) then
        // overlaps the build instead of delaying it. Both are best-effort (a
        // failure here must not end a build that is running; the download
        // starts what is missing). No level known, no session ahead.
        if let Some(level) = level {
            if compress::spare_worth_opening(level, ctx.forced_level, plan.expected_download) && m.max_jobs <= MAX_JOBS_FOR_SPARE_SESSION {
                self.spare = BulkSession::open(m, ctx.ssh, transport::Bulk::Download { level }, self.ctx_stall()).ok();
            }
        }
        if ctx.local.on_disk() {
            // If no output needs fetching it is dropped, which registers
            // nothing.
            self.registrar = ctx.local.start_registrar().ok();
        }
        // Bounded like a connection: a failed build must not wait long for it.
        let limit = self.session().timeouts().handshake;
        let res = std::thread::scope(|sc| {
            let caps = level.is_none().then(|| sc.spawn(move || probe_builder(ctx.health, m, ctx.ssh, limit, Probe::CapsOnly, None)));
            let res = self.session().serve.read_build_result();
            // (A short build waits for the rest of the probe: never longer
            // than asking before the build did.)
            drop(caps.map(|c| c.join()));
            res
        });
        self.stats.build_secs = t.elapsed().as_secs_f64();
        let res = match res {
            Ok(r) => r,
            Err(e) => return Err(self.fail("the build", Fault::from(&e))),
        };
        if !res.success() {
            let msg = if res.error_msg.is_empty() { res.status.to_string() } else { res.error_msg.clone() };
            return Err(JobError::BuildFailed { status: res.status, msg });
        }
        match floating_outputs(plan, &ctx.local.store_dir, &res.built_outputs) {
            Ok(b) => self.built = b,
            Err(why) => return Err(self.fail("the build", Fault::Builder(why))),
        }
        Ok(())
    }

    /// Step 3: the wanted outputs not yet valid here, checked and registered.
    pub fn fetch_outputs(&mut self) -> Result<(), JobError> {
        let (ctx, m, plan) = (self.ctx, self.m, self.plan);
        let spare = self.spare.take();
        let wanted: Vec<StorePath> = plan.wanted.iter().cloned().chain(self.built.iter().map(|(_, p)| p.clone())).collect();
        let want: Vec<String> = wanted.iter().map(|p| p.to_string()).collect();
        let valid = self.local.query_valid(&want).map_err(|e| JobError::Local { during: "asking the local store", why: session::chain(&e) })?;
        let fetch: Vec<StorePath> = wanted.iter().filter(|p| !valid.iter().any(|v| v == p.as_str())).cloned().collect();
        if fetch.is_empty() {
            if let Some(s) = spare {
                s.discard();
            }
            // Killed before its input is closed: it registers nothing.
            drop(self.registrar.take());
            return self.register_realisations();
        }
        let _act = Act::start(self.ev, Level::Info, &format!("copying outputs from '{}'", m.uri));
        self.session().phase("QueryPathInfos");
        let sd = ctx.local.store_dir.clone();
        let infos = match copy::remote_infos(&mut self.session().serve, &sd, &fetch) {
            Ok(i) => i,
            Err(e) => return Err(self.copy_err("QueryPathInfos", e)),
        };
        if let Err(e) = copy::check_references(&mut self.local, &infos) {
            return Err(self.copy_err("checking the outputs' references", e));
        }
        // A store not on this disk takes outputs through its nix-store --serve.
        if !ctx.local.on_disk() {
            if let Some(s) = spare {
                s.discard();
            }
            let t = cpu::Stopwatch::start();
            let ordered = copy::topo_sort(infos);
            self.session().phase("DumpStorePath");
            let Some(s) = self.session.as_mut() else { unreachable!("open") };
            let res = self.local.serve("importing outputs").and_then(|ls| copy::import_outputs(&mut s.serve, &mut ls.1, &ordered));
            self.local.idle();
            let nar = match res {
                Ok(nar) => nar,
                Err(e) => return Err(self.copy_err("receiving outputs", e)),
            };
            (self.stats.download_bytes, self.stats.download_secs) = (nar, t.elapsed().as_secs_f64());
            self.learn(0, Moved { nar, wire: nar }, t.secs(), t.idle_cores(), &format!("copied {} outputs from", ordered.len()));
            return Ok(());
        }
        let registrar = match self.registrar.take() {
            Some(r) => r,
            None => ctx.local.start_registrar().map_err(local("starting the local nix-store"))?,
        };
        // Only a download into this disk, and not a small one, chooses a
        // compression level (and may probe for it).
        let nar: u64 = infos.iter().map(|i| i.nar_size).sum();
        let level = compress::download_level(ctx.forced_level, nar, || self.bulk_level());
        let into = Receive { local: ctx.local, outputs: &fetch, fixed: &plan.fixed };
        let ev = self.ev;
        let t = cpu::Stopwatch::start();
        let moved = if level > 0 {
            let mut bulk = match spare {
                Some(b) => b,
                None => BulkSession::open(m, ctx.ssh, transport::Bulk::Download { level }, self.ctx_stall())?,
            };
            let Some((w, r)) = bulk.streams("a bulk download") else { return Err(JobError::Local { during: "a bulk download", why: "no pipes".into() }) };
            // The bytes flow on the bulk session now.
            self.session().idle();
            let res = copy::download_bulk(w, r, infos, &into, registrar, &mut |p| ev.temp(p));
            match res {
                Err(e) if e.is_local() => {
                    bulk.discard();
                    return Err(JobError::Local { during: "receiving outputs", why: session::chain(&e) });
                }
                res => bulk.finish("a bulk download", res)?,
            }
        } else {
            if let Some(s) = spare {
                s.discard();
            }
            self.session().phase("DumpStorePath");
            match copy::download(&mut self.session().serve, infos, &into, registrar, &mut |p| ev.temp(p)) {
                Ok(nar) => Moved { nar, wire: nar },
                Err(e) => return Err(self.copy_err("receiving outputs", e)),
            }
        };
        (self.stats.download_bytes, self.stats.download_secs) = (moved.nar, t.elapsed().as_secs_f64());
        self.learn(level, moved, t.secs(), t.idle_cores(), &format!("copied {} outputs from", fetch.len()));
        self.register_realisations()
    }

    /// Records where the floating outputs are (their realisations), once
    /// the paths are valid here.
    fn register_realisations(&self) -> Result<(), JobError> {
        match &self.plan.drv_hash {
            Some(h) if !self.built.is_empty() => self.ctx.local.register_realisations(h, &self.built).map_err(local("registering realisations")),
            _ => Ok(()),
        }
    }

    /// The `.drv` and everything it refers to (input derivations and
    /// sources), from the local store's path metadata.
    fn drv_closure(&mut self) -> Result<Vec<String>, JobError> {
        let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut next = vec![self.plan.drv_path.to_string()];
        while !next.is_empty() {
            next.retain(|p| seen.insert(p.clone()));
            if next.is_empty() {
                break;
            }
            let infos = copy::local_infos(&mut self.local, &next).map_err(|e| JobError::Local { during: "reading the derivation's closure", why: session::chain(&e) })?;
            next = infos.into_iter().flat_map(|i| i.references).filter(|r| !seen.contains(r)).collect();
        }
        Ok(seen.into_iter().collect())
    }

    /// Reports a transfer and learns the level for the next one.
    fn learn(&self, level: i32, moved: Moved, secs: f64, idle_cores: Option<f64>, what: &str) {
        let how = if level > 0 { format!("zstd -{level}, {:.1} MB on the wire", moved.wire as f64 / 1e6) } else { "uncompressed".into() };
        let idle = idle_cores.map(|c| format!(", {c:.1} CPUs idle here")).unwrap_or_default();
        let mb = moved.nar as f64 / 1e6;
        self.ev.log(Level::Talkative, &format!("build-hook: {what} '{}': {mb:.1} MB of NAR in {secs:.2} s ({:.1} MB/s{idle}) ({how})", self.m.uri, mb / secs.max(1e-6)));
        if self.ctx.forced_level.is_none() {
            let tr = health::Transfer { level, nar: moved.nar, wire: moved.wire, secs, idle_cores };
            self.ctx.health.update(&self.m.uri, |h| h.learn(tr));
        }
    }
}

/// The paths of `plan`'s floating outputs from what the builder reported:
/// each must be a store path of this store with the name Nix gives that
/// output (`<name>` for `out`, else `<name>-<output>`).
fn floating_outputs(plan: &Plan, store_dir: &str, reported: &[(String, String)]) -> Result<Vec<(String, StorePath)>, String> {
    let drv_name = Derivation::name_of(plan.drv_path.as_str());
    let mut out = Vec::new();
    for o in &plan.floating {
        let Some((_, base)) = reported.iter().find(|(n, _)| n == o) else {
            return Err(format!("the builder built '{}' but did not say where its output '{o}' is", plan.drv_path));
        };
        let path = StorePath::parse(store_dir, &format!("{store_dir}/{base}")).map_err(|e| format!("the builder reported output '{o}' at a bad path: {e}"))?;
        let want = if o == "out" { drv_name.to_string() } else { format!("{drv_name}-{o}") };
        if path.name() != want {
            return Err(format!("the builder reported output '{o}' at '{path}', but that output's name is '{want}'"));
        }
        out.push((o.clone(), path));
    }
    Ok(out)
}

impl Drop for Job<'_> {
    /// Anything still open here belongs to a job that did not complete: it
    /// is killed, not closed, since a stalled builder would keep a polite
    /// close waiting.
    fn drop(&mut self) {
        if let Some(s) = self.spare.take() {
            s.discard();
        }
        if let Some(s) = self.session.take() {
            s.kill();
        }
        self.local.kill();
    }
}

/// The local store as a job uses it: for a store on this disk, its
/// database (opened on first use, one connection per job) and its files;
/// otherwise, or once the database could not be read, a local
/// `nix-store --serve`, started on first use.
struct LocalSide<'a> {
    store: &'a LocalStore,
    ev: &'a dyn Events,
    stall: Duration,
    db: Db,
    serve: Option<LocalServe>,
}

enum Db {
    Unopened,
    Open(StoreDb),
    /// Not on this disk, or it failed once: the serve answers from then on.
    Unused,
}

impl<'a> LocalSide<'a> {
    fn new(store: &'a LocalStore, ev: &'a dyn Events, stall: Duration) -> Self {
        LocalSide { store, ev, stall, db: if store.on_disk() { Db::Unopened } else { Db::Unused }, serve: None }
    }

    /// The database, opened now if it was not yet; `None` when it is not
    /// used (a failure to open it is said once, at Talkative).
    fn db(&mut self) -> Option<&StoreDb> {
        if let Db::Unopened = self.db {
            self.db = match self.store.open_db() {
                Ok(db) => Db::Open(db),
                Err(e) => {
                    self.give_up_db(&e);
                    Db::Unused
                }
            };
        }
        match &self.db {
            Db::Open(db) => Some(db),
            _ => None,
        }
    }

    /// Stops using the database after `e`: the build goes on through a
    /// local `nix-store --serve`.
    fn give_up_db(&mut self, e: &LocalStoreError) {
        self.db = Db::Unused;
        self.ev.log(Level::Talkative, &format!("build-hook: {}; asking a local 'nix-store --serve' instead", session::chain(e)));
    }

    /// The local `nix-store --serve` (started and greeted now if it was not
    /// yet), in `phase`: it must keep moving for as long as the stall
    /// timeout. Call [`Self::idle`] after use, so that a long remote build
    /// does not count as the local store stalling.
    fn serve(&mut self, phase: &'static str) -> Result<&mut LocalServe, CopyError> {
        if self.serve.is_none() {
            let proc = self.store.spawn_serve()?;
            self.serve = Some(self.store.serve_handshake(proc, self.stall)?);
        }
        let ls = self.serve.as_mut().expect("just started");
        ls.0.watch.phase(phase, Some(self.stall));
        Ok(ls)
    }

    fn idle(&mut self) {
        if let Some(ls) = self.serve.as_ref() {
            ls.0.watch.phase("idle", None);
        }
    }

    /// Where an upload's NARs come from: the files on disk when the paths'
    /// metadata came from the database, else the serve session (call
    /// [`Self::idle`] after the upload).
    fn nars(&mut self) -> Result<Box<dyn NarSource + '_>, CopyError> {
        if let Db::Open(_) = self.db {
            return Ok(Box::new(copy::DiskNars::new(self.store)));
        }
        Ok(Box::new(copy::ServeNars::new(&mut self.serve("DumpStorePath")?.1)))
    }

    /// Whether an upload's NARs are written from the files (nothing is read
    /// ahead: an upload may stop between two paths).
    fn reads_files(&mut self) -> bool {
        self.db().is_some()
    }

    /// Ends the serve session, if one was started.
    fn close(&mut self) {
        if let Some((p, c)) = self.serve.take() {
            drop(c);
            let _ = p.finish();
        }
    }

    fn kill(&mut self) {
        if let Some((p, c)) = self.serve.take() {
            drop(c);
            let _ = p.kill();
        }
    }
}

impl LocalSide<'_> {
    /// One question: to the database while it is used, else (or once it has
    /// failed) to the serve session, in `phase`.
    fn ask<T>(
        &mut self,
        phase: &'static str,
        db: impl Fn(&StoreDb) -> Result<T, LocalStoreError>,
        serve: impl FnOnce(&mut dyn PathMeta) -> Result<T, CopyError>,
    ) -> Result<T, CopyError> {
        if let Some(d) = self.db() {
            match db(d) {
                Ok(v) => return Ok(v),
                Err(e) => self.give_up_db(&e),
            }
        }
        let res = serve(&mut self.serve(phase)?.1);
        self.idle();
        res
    }
}

impl PathMeta for LocalSide<'_> {
    fn query_valid(&mut self, paths: &[String]) -> Result<Vec<String>, CopyError> {
        self.ask("QueryValidPaths", |db| db.query_valid(paths), |serve| serve.query_valid(paths))
    }

    fn query_path_infos(&mut self, paths: &[&str]) -> Result<Vec<PathInfo>, CopyError> {
        self.ask("QueryPathInfos", |db| db.query_path_infos(paths), |serve| serve.query_path_infos(paths))
    }
}
