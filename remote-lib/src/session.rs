//! A live session with a builder: connecting (with a handshake deadline and
//! the cipher choice), the interactive `nix-store --serve` session, bulk
//! sessions for compressed copies, the capability probe — and the one place
//! that decides, from facts, whether a failed exchange means the connection
//! was lost, the builder refused, or something failed here ([`verdict`]).

use crate::copy::CopyError;
use crate::machines::Machine;
use crate::serve::{ServeConn, ServeError};
use crate::transport::{self, Bulk, Caps, Ended, ProcIn, ProcOut, RemoteProcess, SshConfig, StderrTap};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// How long each kind of wait may last without progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and the protocol handshake.
    pub handshake: Duration,
    /// Any other exchange with a builder (queries, copies, ending a
    /// session): no byte moving for this long means it stalled.
    pub stall: Duration,
    /// The remote build itself: no log line for this long means it stalled
    /// (`None`: no limit).
    pub build_silent: Option<Duration>,
}

/// The ssh-ng bridge's exit status when the builder's daemon refused us
/// because it does not trust us (not because of the build).
pub const UNTRUSTED_EXIT: i32 = 3;

/// What went wrong with a builder, decided by [`verdict`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// The builder or the connection went away, or stopped moving: the job
    /// may move to another builder, and this one is marked as failing.
    #[error("{why}")]
    Lost { machine: String, during: &'static str, why: String },
    /// The builder's Nix refused or failed a request, or sent something we
    /// reject: it is reachable, so it keeps its health, and the user sees its
    /// own words.
    /// `another_may`: the refusal is about us, not the build (an `ssh-ng://`
    /// builder whose daemon does not trust us refused our paths, told by
    /// the bridge's exit status [`UNTRUSTED_EXIT`]), so another builder may
    /// take the job.
    #[error("{why}{}", said(builder_said))]
    Refused { machine: String, during: &'static str, why: String, builder_said: String, another_may: bool },
    /// Something failed on this machine.
    #[error("{during} failed on this machine: {why}")]
    Local { machine: String, during: &'static str, why: String },
}

fn said(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("\n  the builder said: {}", s.replace('\n', "\n    "))
    }
}

impl SessionError {
    /// True when the job may move to another builder.
    pub fn is_lost(&self) -> bool {
        matches!(self, SessionError::Lost { .. })
    }
}

/// What this side saw go wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The builder's stream ended (EOF) or its pipe broke.
    Closed(String),
    /// The builder sent something malformed or false.
    Builder(String),
    /// A failure on this machine.
    Local(String),
}

impl From<&ServeError> for Fault {
    fn from(e: &ServeError) -> Self {
        match e {
            ServeError::Closed { .. } => Fault::Closed(e.to_string()),
            ServeError::Io { .. } => Fault::Local(chain(e)),
            _ => Fault::Builder(chain(e)),
        }
    }
}

impl From<&CopyError> for Fault {
    fn from(e: &CopyError) -> Self {
        if e.is_local() {
            Fault::Local(chain(e))
        } else if e.builder_closed() {
            Fault::Closed(chain(e))
        } else {
            Fault::Builder(chain(e))
        }
    }
}

/// An error and its sources, joined with ": ".
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The one rule for "lost" versus "refused" versus "local", from facts:
/// a watchdog that fired, or a closed stream whose process then ended with
/// ssh's own exit status 255 or a signal (or could not be waited for), is a
/// lost connection; a closed stream whose remote program exited with its
/// own status, or data we reject, is the builder's refusal; `Fault::Local`
/// is ours. The builder's stderr is only ever shown, never searched.
pub fn verdict(machine: &str, during: &'static str, fault: Fault, ended: &Ended) -> SessionError {
    let machine = machine.to_string();
    if let Some((phase, limit)) = ended.stalled {
        return SessionError::Lost { machine, during, why: format!("stalled: no progress for {} s during {phase}", limit.as_secs()) };
    }
    match fault {
        Fault::Local(why) => SessionError::Local { machine, during, why },
        // Bad data from a process that then died on its own with ssh's status
        // or a signal was a connection dying mid-stream, not a lie.
        Fault::Builder(_) if !ended.killed && ended.status.is_some_and(|s| s.code() == Some(255) || s.signal().is_some()) => {
            let ssh = last_line(&ended.tail);
            let why = format!("connection lost during {during}: the data stopped short{}", if ssh.is_empty() { String::new() } else { format!(" ({ssh})") });
            SessionError::Lost { machine, during, why }
        }
        Fault::Builder(why) => SessionError::Refused { machine, during, why, builder_said: ended.tail.clone(), another_may: false },
        Fault::Closed(what) => {
            let code = ended.status.and_then(|s| s.code());
            let lost = |how: String| {
                let ssh = last_line(&ended.tail);
                SessionError::Lost { machine: machine.clone(), during, why: if ssh.is_empty() { how } else { format!("{how}: {ssh}") } }
            };
            match (ended.status, code) {
                (None, _) => lost(format!("connection lost during {during} ({what})")),
                (Some(_), Some(255)) => lost(format!("connection lost during {during}")),
                (Some(s), None) => lost(format!("connection lost during {during} (killed by signal {})", s.signal().unwrap_or(0))),
                (Some(_), Some(UNTRUSTED_EXIT)) => SessionError::Refused {
                    machine,
                    during,
                    why: format!("the builder's nix-daemon refused us during {during}: it does not trust this user"),
                    builder_said: ended.tail.clone(),
                    another_may: true,
                },
                (Some(_), Some(c)) => SessionError::Refused {
                    machine,
                    during,
                    why: format!("the builder ended the session during {during} (exit status {c}): {what}"),
                    builder_said: ended.tail.clone(),
                    another_may: false,
                },
            }
        }
    }
}

/// How long a process that sent bad data may take to end by itself before it
/// is killed: ssh exits at once when its connection dies, but the reader may
/// notice the cut-off data a moment before.
const BAD_DATA_GRACE: Duration = Duration::from_millis(500);

/// Ends a failed session's process in the way that keeps the facts: a closed
/// stream waits for the exit status; bad data gives the process a moment to
/// show whether its connection died; a local fault kills it.
fn end_for(proc: RemoteProcess, fault: &Fault) -> Ended {
    match fault {
        Fault::Closed(_) => proc.finish(),
        Fault::Builder(_) => proc.end_within(BAD_DATA_GRACE),
        Fault::Local(_) => proc.kill(),
    }
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// A live `nix-store --serve --write` session with a builder.
pub struct Session {
    pub machine: String,
    proc: RemoteProcess,
    pub serve: ServeConn<ProcOut, ProcIn>,
    timeouts: Timeouts,
    /// Opened ahead and held until this job took it ([`crate::held`]).
    pub held: bool,
}

/// How long a session whose job succeeded may take to exit by itself
/// ([`Session::close_after_success`]).
pub const SUCCESS_GRACE: Duration = Duration::from_millis(20);

/// How long a held session may take to answer the handshake: its
/// `nix-store` is already running, so only the link's round trip is left.
/// One that does not answer in time is given up for a new session.
const HELD_HANDSHAKE: Duration = Duration::from_secs(3);

impl Session {
    /// Connects to `m`: takes a session held for it when there is one
    /// (see [`crate::held`]), else starts one through the shared connection
    /// when there is one; the handshake must finish within `t.handshake`.
    pub fn connect(m: &Machine, ssh: &SshConfig, t: Timeouts) -> Result<Session, SessionError> {
        if let Some(taken) = crate::held::take(m, ssh) {
            let mut proc = RemoteProcess::adopt(taken, StderrTap::default());
            proc.watch.phase("connecting", Some(t.handshake.min(HELD_HANDSHAKE)));
            if let (Some(r), Some(w)) = (proc.stdout.take(), proc.stdin.take()) {
                if let Ok(serve) = ServeConn::handshake(r, w) {
                    proc.watch.phase("idle", None);
                    return Ok(Session { machine: m.uri.clone(), proc, serve, timeouts: t, held: true });
                }
            }
            // Gone stale while held (the builder restarted, say): a new
            // session decides whether the builder is there.
            drop(proc.kill());
        }
        let machine = m.uri.clone();
        let local = |e: &dyn std::error::Error| SessionError::Local { machine: m.uri.clone(), during: "connecting", why: e.to_string() };
        let cmd = transport::session_command(m, ssh).map_err(|e| local(&e))?;
        // Held until the handshake is over: by then the shared connection is up.
        let _opening = transport::claim_new_connection(m, ssh, Instant::now() + t.handshake);
        let mut proc = RemoteProcess::spawn(cmd, StderrTap::default()).map_err(|e| local(&e))?;
        proc.watch.phase("connecting", Some(t.handshake));
        let (Some(r), Some(w)) = (proc.stdout.take(), proc.stdin.take()) else {
            return Err(SessionError::Local { machine, during: "connecting", why: "no pipes to ssh".into() });
        };
        match ServeConn::handshake(r, w) {
            Ok(serve) => {
                proc.watch.phase("idle", None);
                Ok(Session { machine, proc, serve, timeouts: t, held: false })
            }
            Err(e) => {
                let ended = proc.kill();
                let why = match transport::explain_ssh_failure(m, &ended.tail) {
                    Some(advice) => format!("{advice}\n  ssh said: {}", last_line(&ended.tail)),
                    None if ended.stalled.is_some() => format!("{e} (no answer within {} s)", t.handshake.as_secs()),
                    None if ended.tail.is_empty() => e.to_string(),
                    None => format!("{e}: {}", ended.tail),
                };
                Err(SessionError::Lost { machine, during: "connecting", why })
            }
        }
    }

    /// Enters an exchange that may be silent for at most the stall timeout.
    pub fn phase(&self, phase: &'static str) {
        self.proc.watch.phase(phase, Some(self.timeouts.stall));
    }
    /// Waits with no limit (the session is idle while we wait for something
    /// local; ssh's keep-alives still watch the link).
    pub fn idle(&self) {
        self.proc.watch.phase("idle", None);
    }
    /// The remote build: silent for at most the build limit; every log line
    /// counts as progress.
    pub fn building(&self) {
        self.proc.watch.phase("the build", self.timeouts.build_silent);
    }
    /// From now on, the builder's stderr (the build log) is copied to `log`.
    pub fn forward_log(&self, log: std::fs::File) {
        self.proc.tap.forward_to(log);
    }
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Ends a failed session and says what happened ([`verdict`]): a closed
    /// stream waits for the process's exit status, anything else kills it.
    pub fn fail(self, during: &'static str, fault: Fault) -> SessionError {
        let Session { machine, proc, serve, .. } = self;
        drop(serve);
        let ended = end_for(proc, &fault);
        verdict(&machine, during, fault, &ended)
    }

    /// Ends the session normally (closing its input, so the builder's
    /// nix-store exits) and returns what it printed last.
    pub fn close(self) -> String {
        drop(self.serve);
        self.proc.finish().tail
    }

    /// Ends the session after a job that succeeded: closes its input, so
    /// that the process at the other end can exit by itself, and waits
    /// [`SUCCESS_GRACE`] at most for that before killing our end (over a
    /// real link an exit rarely makes it back that soon, so in practice this
    /// is a kill after 20 ms). Every request was answered before: what is
    /// left is the builder's nix-store exiting (committing its database,
    /// 0.1 s after 5,000 registrations), which is not worth the build's
    /// waiting. Over ssh it goes on without us (no terminal, so the closed
    /// channel sends it no signal); a local `nix-store --serve` and the
    /// ssh-ng bridge are our own children and are killed, which SQLite
    /// survives (the next opener finishes an interrupted checkpoint).
    pub fn close_after_success(self) {
        drop(self.serve);
        let _ = self.proc.end_within(SUCCESS_GRACE);
    }

    /// Ends the session at once.
    pub fn kill(self) {
        drop(self.serve);
        let _ = self.proc.kill();
    }

    /// The server's protocol version.
    pub fn version(&self) -> (u8, u8) {
        (self.serve.server_version.0, self.serve.server_version.1)
    }
}

/// A one-directional session for a compressed bulk copy.
pub struct BulkSession {
    machine: String,
    proc: RemoteProcess,
    stall: Duration,
}

impl BulkSession {
    /// Starts `bulk` on `m` over the shared connection.
    pub fn open(m: &Machine, ssh: &SshConfig, bulk: Bulk, stall: Duration) -> Result<BulkSession, SessionError> {
        let local = |e: &dyn std::error::Error| SessionError::Local { machine: m.uri.clone(), during: "opening a bulk session", why: e.to_string() };
        let cmd = transport::ssh_script(m, ssh, &transport::bulk_script(m, bulk)).map_err(|e| local(&e))?;
        let proc = RemoteProcess::spawn(cmd, StderrTap::default()).map_err(|e| local(&e))?;
        Ok(BulkSession { machine: m.uri.clone(), proc, stall })
    }

    /// Its streams, for one copy; from now on it must keep moving.
    pub fn streams(&mut self, phase: &'static str) -> Option<(ProcIn, ProcOut)> {
        self.proc.watch.phase(phase, Some(self.stall));
        Some((self.proc.stdin.take()?, self.proc.stdout.take()?))
    }

    /// Ends the session after a copy. A copy that completed (every path
    /// acknowledged or received and checked) stands, whatever the process
    /// then says; a failed one is judged by [`verdict`].
    pub fn finish<T>(self, during: &'static str, res: Result<T, CopyError>) -> Result<T, SessionError> {
        match res {
            Ok(v) => {
                let _ = self.proc.finish();
                Ok(v)
            }
            Err(e) => {
                let fault = Fault::from(&e);
                let ended = end_for(self.proc, &fault);
                Err(verdict(&self.machine, during, fault, &ended))
            }
        }
    }

    /// Drops an unused session.
    pub fn discard(self) {
        let _ = self.proc.kill();
    }
}

/// Asks the builder (one short ssh command, at most `limit`) whether it has
/// zstd and AES instructions. `None` when the probe did not run to its end.
pub fn probe_caps(m: &Machine, ssh: &SshConfig, limit: Duration) -> Option<Caps> {
    let cmd = transport::ssh_script(m, ssh, transport::CAPS_PROBE).ok()?;
    let mut p = RemoteProcess::spawn(cmd, StderrTap::default()).ok()?;
    p.watch.phase("probing the builder", Some(limit));
    drop(p.stdin.take());
    let mut out = String::new();
    let read = p.stdout.take().map(|o| o.take(4096).read_to_string(&mut out));
    let ended = p.finish();
    read?.ok()?;
    if ended.stalled.is_some() {
        return None;
    }
    transport::parse_caps(ended.status.and_then(|s| s.code()), &out)
}

/// The bytes the builder reports having received before [`probe_link`]
/// starts timing: on a new connection the first megabytes go slower
/// (TCP and ssh windows still growing) and fill buffers on the way, so
/// timing them took a 300 MB/s link on the test bed for a 20–40 MB/s one.
pub const LINK_PROBE_WARMUP: usize = 2 << 20;
/// After the warm-up, the probe sends at least this much more, for at least
/// [`LINK_PROBE_MIN_TIME`], in all at most [`LINK_PROBE_MAX_BYTES`].
pub const LINK_PROBE_BYTES: usize = 2 << 20;
pub const LINK_PROBE_MAX_BYTES: usize = 12 << 20;
/// The shortest timed part, so that a stall of a few tens of milliseconds
/// on a busy machine does not pass for a slow link.
pub const LINK_PROBE_MIN_TIME: Duration = Duration::from_millis(50);
/// After a warm-up longer than this, half of [`LINK_PROBE_BYTES`] after the
/// mark is enough, with no minimum time: on a slow link (2 MiB in 100 ms is
/// 21 MB/s) every further megabyte costs. Until the mark arrives the probe
/// sends no more than that half beyond the warm-up, and what is still on its
/// way when the mark arrives (buffered on this side of the link) is timed.
/// A new connection's warm-up took 115–213 ms on the test bed's 300 MB/s
/// link, the megabyte after it 3–5 ms.
pub const LINK_PROBE_SLOW_WARMUP: Duration = Duration::from_millis(100);

/// Measures the link's raw rate to the builder once, before the first copy
/// (so the first copy can already choose between raw and compressed): in one
/// session, once the builder has said it is ready, incompressible bytes go
/// to it; it says when it has received the first [`LINK_PROBE_WARMUP`]
/// (`head -c`) and when all of them (`cat >/dev/null`). The rate is that of
/// the bytes after the warm-up mark (at least [`LINK_PROBE_BYTES`] for at
/// least [`LINK_PROBE_MIN_TIME`], all in at most [`LINK_PROBE_MAX_BYTES`]);
/// without a mark, that of all the bytes. The session's set-up is not timed
/// (it varies by tens of milliseconds on a busy machine). MB/s and how many
/// CPUs sat idle here meanwhile ([`crate::cpu`]), or `None` when the run
/// failed or did not end within `limit`.
pub fn probe_link(m: &Machine, ssh: &SshConfig, limit: Duration) -> Option<(f64, Option<f64>)> {
    use std::io::BufRead;
    let script = format!("sh -c 'echo ready; head -c {LINK_PROBE_WARMUP} >/dev/null && echo warm && cat >/dev/null; echo done'");
    let cmd = transport::ssh_script(m, ssh, &script).ok()?;
    let mut p = RemoteProcess::spawn(cmd, StderrTap::default()).ok()?;
    p.watch.phase("measuring the link", Some(limit));
    let (w, r) = (p.stdin.take()?, p.stdout.take()?);
    let mut r = std::io::BufReader::new(r.take(64));
    let mut line = String::new();
    let ready = r.read_line(&mut line).is_ok() && line.trim() == "ready";
    let pushed = if ready {
        // The builder's words are read as they come, while the bytes go.
        let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
        let reader = std::thread::spawn(move || loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(n) if n > 0 => {
                    if tx.send((line.trim().to_string(), Instant::now())).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        });
        let res = push_probe_bytes(w, &rx);
        drop(rx);
        let _ = reader.join();
        res
    } else {
        drop(w);
        None
    };
    let ended = p.finish();
    pushed.filter(|_| ended.stalled.is_none())
}

/// [`probe_link`]'s timed part: bytes written until the warm-up mark and
/// enough after it (see there), the stream closed, then the builder's
/// `done` awaited. MB/s and idle CPUs.
fn push_probe_bytes(mut w: impl std::io::Write, said: &std::sync::mpsc::Receiver<(String, Instant)>) -> Option<(f64, Option<f64>)> {
    let mut x = 0x2545F4914F6CDD1Du64;
    let chunk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let t = crate::cpu::Stopwatch::start();
    let t0 = t.started();
    let mut sent = 0;
    let mut warm: Option<(Instant, usize)> = None;
    let mut done = None;
    loop {
        while let Ok((word, at)) = said.try_recv() {
            match word.as_str() {
                "warm" => warm = Some((at, sent)),
                "done" => done = Some(at),
                _ => return None,
            }
        }
        let enough = match warm {
            // A slow warm-up (a slow link, or a new connection's first
            // megabytes): what is on its way after the mark is timed.
            Some((at, _)) if at - t0 > LINK_PROBE_SLOW_WARMUP => sent >= LINK_PROBE_WARMUP + LINK_PROBE_BYTES / 2,
            Some((at, _)) => sent >= LINK_PROBE_WARMUP + LINK_PROBE_BYTES && at.elapsed() >= LINK_PROBE_MIN_TIME,
            None => false,
        };
        if enough || sent >= LINK_PROBE_MAX_BYTES || done.is_some() {
            break;
        }
        if warm.is_none() && sent >= LINK_PROBE_WARMUP + LINK_PROBE_BYTES / 2 {
            // No further ahead of the mark than what a slow link's
            // measurement needs: every byte sent must cross the link.
            match said.recv_timeout(Duration::from_secs(600)).ok()? {
                (word, at) if word == "warm" => warm = Some((at, sent)),
                _ => return None,
            }
            continue;
        }
        w.write_all(&chunk).ok()?;
        sent += chunk.len();
    }
    drop(w);
    while done.is_none() {
        match said.recv_timeout(Duration::from_secs(600)).ok()? {
            (word, at) if word == "done" => done = Some(at),
            (word, at) if word == "warm" => warm = Some((at, sent)),
            _ => return None,
        }
    }
    let end = done?;
    let after_warm = warm.filter(|(at, _)| end > *at).map(|(at, _)| (sent.saturating_sub(LINK_PROBE_WARMUP), end - at));
    let (bytes, took) = match after_warm {
        Some((b, d)) if b >= LINK_PROBE_BYTES / 2 => (b, d),
        _ => (sent, end - t0),
    };
    Some((bytes as f64 / 1e6 / took.as_secs_f64().max(1e-4), t.idle_cores()))
}

/// The cipher order for a new connection to `m`, and why. AES-GCM goes
/// first when `prefer` is set, both CPUs have AES instructions (`builder_aes`
/// as probed; before that, assumed for an x86 builder), no shared connection
/// is open already (it would be used instead), and the user's ssh config and
/// `NIX_SSHOPTS` leave the ciphers at OpenSSH's defaults (`ssh -G`).
pub fn cipher_choice(m: &Machine, ssh: &SshConfig, prefer: bool, builder_aes: Option<bool>) -> (Option<String>, String) {
    let no = |why: &str| (None, format!("OpenSSH's default order ({why})"));
    if !prefer {
        return no("BUILD_HOOK_PREFER_AES_GCM=0");
    }
    if transport::is_local(m) {
        return no("no ssh for localhost");
    }
    if !transport::local_cpu_has_aes() {
        return no("this machine's CPU has no AES instructions");
    }
    // Before the builder is first asked, an x86 builder (its first system)
    // is taken to have AES instructions, as all but the oldest and some
    // oddly configured virtual CPUs do: its first connection, which lasts
    // while it is used, then starts with the faster cipher too. The answer
    // of the probe replaces the guess for every later connection.
    let x86 = m.systems.first().is_some_and(|s| s.starts_with("x86_64-") || s.starts_with("i686-"));
    let assumed = match builder_aes {
        None if x86 => true,
        None => return no("not asked yet whether the builder's CPU has AES instructions"),
        Some(false) => return no("the builder's CPU has no AES instructions"),
        Some(true) => false,
    };
    // A socket nobody listens on (its master was killed) is replaced by a new master.
    if transport::shared_connection_open(m, ssh) {
        return (None, "none needed now: a shared connection is open (its cipher was chosen when it was opened)".into());
    }
    // Only now, when a new connection will be made, ssh's settings are
    // asked for, both at once (each `ssh -G` took 15–30 ms, before the
    // connection starts).
    let until = Instant::now() + SSH_G_LIMIT;
    let user = ssh_print_settings(transport::ssh_settings_command(m, ssh).ok());
    let defaults = ssh_print_settings(Some(transport::ssh_defaults_command(m, ssh)));
    // Both are waited for (and reaped) whatever either says.
    let (user, defaults) = (user.join_until(until), defaults.join_until(until));
    let Some(user) = user else { return no("'ssh -G' failed") };
    let Some(defaults) = defaults else { return no("'ssh -F /dev/null -G' failed") };
    let (u, d) = (transport::ssh_setting(&user, "ciphers"), transport::ssh_setting(&defaults, "ciphers"));
    if u != d {
        return no("your ssh config or NIX_SSHOPTS chooses the ciphers");
    }
    match u.and_then(transport::aes_gcm_first) {
        Some(list) if assumed => (Some(list), "AES-GCM first (this CPU has AES instructions, and an x86 builder is taken to have them until it is asked)".into()),
        Some(list) => (Some(list), "AES-GCM first (both CPUs have AES instructions)".into()),
        None => no("no AES-GCM cipher to move first"),
    }
}

/// An `ssh -G` started, its output read by a thread as it comes.
struct PrintSettings(Option<(std::process::Child, std::sync::mpsc::Receiver<Vec<u8>>)>);

/// `ssh -G` only prints settings and never connects, but a `Match exec` in
/// the user's config runs a command of theirs.
const SSH_G_LIMIT: Duration = Duration::from_secs(5);

fn ssh_print_settings(c: Option<std::process::Command>) -> PrintSettings {
    use std::process::Stdio;
    let Some(mut child) = c.and_then(|mut c| c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()) else { return PrintSettings(None) };
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return PrintSettings(None);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if stdout.take(1 << 20).read_to_end(&mut out).is_ok() {
            let _ = tx.send(out);
        }
    });
    PrintSettings(Some((child, rx)))
}

impl PrintSettings {
    /// What it printed, if it succeeded by `until` (else it is killed).
    fn join_until(self, until: Instant) -> Option<String> {
        let (mut child, rx) = self.0?;
        let out = rx.recv_timeout(until.saturating_duration_since(Instant::now())).ok();
        if out.is_none() {
            let _ = child.kill();
        }
        // Its output has ended: it exits now, if it has not already.
        let status = child.wait().ok()?;
        out.filter(|_| status.success()).map(|o| String::from_utf8_lossy(&o).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::ExitStatus;

    fn ended(raw_status: Option<i32>, tail: &str, stalled: Option<(&'static str, u64)>) -> Ended {
        Ended { status: raw_status.map(ExitStatus::from_raw), tail: tail.into(), stalled: stalled.map(|(p, s)| (p, Duration::from_secs(s))), killed: false }
    }
    const M: &str = "ssh://b1";
    fn exit(code: i32) -> Option<i32> {
        Some(code << 8)
    }

    #[test]
    fn printed_settings_count_only_from_a_command_that_succeeded_in_time() {
        let sh = |script: &str| {
            let mut c = std::process::Command::new("sh");
            c.arg("-c").arg(script);
            ssh_print_settings(Some(c))
        };
        let soon = || Instant::now() + SSH_G_LIMIT;
        let (a, b) = (sh("echo 'ciphers a,b'"), sh("printf 'ciphers c\\377\\n'"));
        assert_eq!(b.join_until(soon()).as_deref(), Some("ciphers c\u{FFFD}\n"), "odd bytes are kept as replacement characters");
        assert_eq!(a.join_until(soon()).as_deref(), Some("ciphers a,b\n"));
        assert_eq!(sh("echo 'ciphers a'; exit 255").join_until(soon()), None);
        assert_eq!(ssh_print_settings(None).join_until(soon()), None);
        let t = Instant::now();
        assert_eq!(sh("echo half; exec sleep 30").join_until(Instant::now() + Duration::from_millis(200)), None);
        assert!(t.elapsed() < Duration::from_secs(10), "a hanging ssh -G is killed at its limit");
    }

    #[test]
    fn ssh_failing_is_a_lost_connection() {
        let e = verdict(M, "upload", Fault::Closed("the connection ended".into()), &ended(exit(255), "Connection to b1 closed by remote host.", None));
        assert!(e.is_lost(), "{e:?}");
        assert_eq!(e.to_string(), "connection lost during upload: Connection to b1 closed by remote host.");
    }

    #[test]
    fn a_signal_or_no_status_is_lost_too() {
        assert!(verdict(M, "build", Fault::Closed("x".into()), &ended(Some(9), "", None)).is_lost());
        assert!(verdict(M, "build", Fault::Closed("x".into()), &ended(None, "", None)).is_lost());
    }

    #[test]
    fn a_stall_is_lost_whatever_else_happened() {
        let e = verdict(M, "download", Fault::Builder("garbage".into()), &ended(Some(9), "", Some(("DumpStorePath", 5))));
        assert_eq!(e.to_string(), "stalled: no progress for 5 s during DumpStorePath");
        assert!(e.is_lost());
    }

    #[test]
    fn the_builders_nix_exiting_is_a_refusal_with_its_words() {
        let e = verdict(M, "upload", Fault::Closed("the connection ended".into()), &ended(exit(1), "error: hash mismatch importing path '/nix/store/x'", None));
        assert!(!e.is_lost());
        assert!(e.to_string().contains("the builder said: error: hash mismatch importing path"), "{e}");
        // what the builder printed is never searched: an 'error:'-free exit is a refusal too
        assert!(matches!(verdict(M, "upload", Fault::Closed("x".into()), &ended(exit(0), "", None)), SessionError::Refused { another_may: false, .. }));
        assert!(matches!(
            verdict(M, "upload", Fault::Closed("x".into()), &ended(exit(UNTRUSTED_EXIT), "lacks a signature", None)),
            SessionError::Refused { another_may: true, .. }
        ));
    }

    #[test]
    fn bad_data_is_refused_and_local_faults_are_local() {
        let killed_by_us = Ended { killed: true, ..ended(Some(9), "", None) };
        assert!(matches!(verdict(M, "download", Fault::Builder("NAR hash mismatch".into()), &killed_by_us), SessionError::Refused { .. }));
        assert!(matches!(verdict(M, "download", Fault::Builder("NAR hash mismatch".into()), &ended(exit(1), "", None)), SessionError::Refused { .. }));
        // cut-off data, and ssh then exited with its own status: the connection died
        let e = verdict(M, "a bulk download", Fault::Builder("malformed NAR: incomplete frame".into()), &ended(exit(255), "", None));
        assert!(e.is_lost(), "{e:?}");
        assert!(matches!(verdict(M, "download", Fault::Local("disk full".into()), &ended(exit(255), "", None)), SessionError::Local { .. }));
    }
}
