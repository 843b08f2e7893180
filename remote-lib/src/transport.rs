//! Reaching a builder: the OpenSSH client command line (as Nix's `ssh://` store builds it) and a running
//! remote `nix-store --serve --write` with its stderr captured.
//!
//! We use the system `ssh`, so `~/.ssh/config` aliases, agents, `ProxyJump`
//! and `NIX_SSHOPTS` work as users expect. Connections are shared between
//! hook processes through an OpenSSH master socket in the load directory.
//! The host key from the machines file is pinned through a known_hosts file
//! of our own; otherwise the user's known_hosts applies. Batch mode, a connect
//! timeout and keep-alives are always on. No shell command line is built from
//! untrusted text: the remote words come from the machines file and are
//! single-quoted; store paths never reach a command line.

use crate::machines::Machine;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why a builder could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot start '{program}'")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the pinned host key for {machine} to '{path}'")]
    HostKeyFile {
        machine: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{machine} is an ssh-ng:// builder, and this program cannot start the bridge that speaks to its nix-daemon")]
    NoBridge { machine: String },
}

/// SSH settings that apply to every machine.
#[derive(Clone, Debug)]
pub struct SshConfig {
    pub program: String,
    pub connect_timeout: u32,
    pub server_alive_interval: u32,
    pub server_alive_count_max: u32,
    /// Directory for master sockets; `None` disables connection sharing.
    pub control_dir: Option<PathBuf>,
    pub control_persist: u32,
    /// Directory for pinned host keys.
    pub known_hosts_dir: PathBuf,
    /// `NIX_SSHOPTS`, already split.
    pub extra_opts: Vec<String>,
    /// A cipher preference list for a new connection (see [`aes_gcm_first`]);
    /// `None` leaves ssh's own choice.
    pub ciphers: Option<String>,
    /// The program that bridges a serve session to an `ssh-ng://` builder's
    /// daemon ([`crate::bridge`]): `PROGRAM __ssh-ng-bridge -- SSH-COMMAND...`.
    /// `None`: `ssh-ng://` machines cannot be used.
    pub bridge: Option<PathBuf>,
}

/// Splits `NIX_SSHOPTS` like a shell would (quotes, backslashes), as Nix 2.26+.
pub fn split_sshopts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut has = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n)
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                has = true
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    has = true
                }
            }
            (None, c) if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                has = false
            }
            (None, c) => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Quotes a word for the remote shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"/._-=:@,+".contains(&c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The command that gives a serve session with `m`: ssh to `nix-store
/// --serve --write`, or for an `ssh-ng://` machine the bridge in front of
/// ssh to `nix-daemon --stdio` (see [`SshConfig::bridge`]).
pub fn session_command(m: &Machine, cfg: &SshConfig) -> Result<Command, TransportError> {
    if !m.ssh.daemon {
        return ssh_command(m, cfg, &serve_words(m));
    }
    let Some(bridge) = &cfg.bridge else { return Err(TransportError::NoBridge { machine: m.uri.clone() }) };
    let inner = ssh_command(m, cfg, &daemon_words(m))?;
    let mut c = Command::new(bridge);
    c.arg("__ssh-ng-bridge").arg("--").arg(inner.get_program()).args(inner.get_args());
    copy_envs(&inner, &mut c);
    Ok(c)
}

/// Gives `to` the environment changes made on `from` (for a command that
/// runs `from`'s program itself).
pub fn copy_envs(from: &Command, to: &mut Command) {
    for (k, v) in from.get_envs() {
        match v {
            Some(v) => to.env(k, v),
            None => to.env_remove(k),
        };
    }
}

/// The SHA-256 of a list of words, each length-prefixed so that no two
/// lists hash alike, in hex.
pub fn words_hex<'a>(words: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for w in words {
        h.update((w.len() as u64).to_le_bytes());
        h.update(w);
    }
    crate::hash::Sha256Hash(h.finalize().into()).to_hex()
}

/// The daemon's command words: `<remote-program> --stdio [--store URI]`.
pub fn daemon_words(m: &Machine) -> Vec<String> {
    let mut w = vec![m.ssh.remote_program.clone(), "--stdio".into()];
    if let Some(s) = &m.ssh.remote_store {
        w.push("--store".into());
        w.push(s.clone());
    }
    w
}

/// The builder's `nix-store`: `remote-program`, or for an `ssh-ng://`
/// machine `nix-store` on its PATH (used only when `remote-program` is the
/// bare default, see [`bulk_allowed`]).
pub fn serve_program(m: &Machine) -> String {
    if m.ssh.daemon {
        "nix-store".into()
    } else {
        m.ssh.remote_program.clone()
    }
}

/// Whether compressed bulk sessions (`zstd … | nix-store --serve`) may be
/// used with `m`, given what its probe found. An `ssh-ng://` machine needs
/// `nix-store` on its PATH and the default `remote-program`: a custom one
/// (a wrapper that forces a trust level, say) is the only way in.
pub fn bulk_allowed(m: &Machine, caps: &Caps) -> bool {
    caps.zstd && (!m.ssh.daemon || (caps.nix_store && !m.ssh.remote_program.contains('/')))
}

/// The remote command words: `<nix-store> --serve --write [--store URI]`
/// (see [`serve_program`]).
pub fn serve_words(m: &Machine) -> Vec<String> {
    let mut w = vec![serve_program(m), "--serve".into(), "--write".into()];
    if let Some(s) = &m.ssh.remote_store {
        w.push("--store".into());
        w.push(s.clone());
    }
    w
}

/// Which way a bulk session's bytes are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bulk {
    /// We send zstd; the builder runs `zstd -d | nix-store --serve --write`.
    Upload,
    /// The builder runs `nix-store --serve --write | zstd -<level>`.
    Download { level: i32 },
}

/// The remote shell pipeline of a bulk session. Only fixed words and the
/// single-quoted serve words from the machines file appear in it.
pub fn bulk_script(m: &Machine, bulk: Bulk) -> String {
    let serve = serve_words(m).iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ");
    match bulk {
        Bulk::Upload => format!("zstd -d -q -c | {serve}"),
        Bulk::Download { level } => format!("{serve} | zstd -q -c -{}", level.clamp(1, 19)),
    }
}

/// What a builder offers besides Nix, asked once and remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// `zstd` runs there.
    pub zstd: bool,
    /// Its CPU has AES instructions (Linux `/proc/cpuinfo`, macOS `sysctl`).
    pub aes: bool,
    /// `nix-store` is on its PATH (for an `ssh-ng://` machine's bulk sessions).
    pub nix_store: bool,
}

/// The probe run on a builder: one line per capability found, then `done`.
/// Only fixed text; `sh -c` so that any login shell runs it the same way.
pub const CAPS_PROBE: &str = "sh -c 'zstd -q -c </dev/null >/dev/null 2>&1 && echo zstd; \
grep -qw aes /proc/cpuinfo 2>/dev/null && echo aes; \
command -v nix-store >/dev/null 2>&1 && echo nix-store; \
sysctl -n hw.optional.aes hw.optional.arm.FEAT_AES 2>/dev/null | grep -qx 1 && echo aes; echo done'";

/// What the probe's exit status and output say. `None` when the probe did
/// not run to its end (ssh failed, exit 255, or was killed): that says
/// nothing about the builder and must not be remembered.
pub fn parse_caps(exit_code: Option<i32>, stdout: &str) -> Option<Caps> {
    let words: Vec<&str> = stdout.lines().map(str::trim).collect();
    if exit_code != Some(0) || words.last() != Some(&"done") {
        return None;
    }
    Some(Caps { zstd: words.contains(&"zstd"), aes: words.contains(&"aes"), nix_store: words.contains(&"nix-store") })
}

/// True when Nix would not use ssh at all (`ssh://localhost`).
pub fn is_local(m: &Machine) -> bool {
    m.ssh.host == "localhost"
}

/// Writes (once) the pinned host key as a known_hosts file and returns its path.
fn pinned_known_hosts(m: &Machine, key: &str, dir: &Path) -> Result<PathBuf, TransportError> {
    let path = dir.join(file_name_for(&m.uri));
    // `*` matches whatever name or address ssh checks: the file belongs to this machine only.
    let line = format!("* {key}\n");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(line.as_str()) {
        let err = |source| TransportError::HostKeyFile { machine: m.uri.clone(), path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &line).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
    }
    Ok(path)
}

/// A file name for a machine (see [`crate::slots::file_name`]).
pub fn file_name_for(uri: &str) -> String {
    crate::slots::file_name(uri, "")
}

/// Builds the command that runs the words `remote` on `m` (each quoted for
/// the remote shell).
pub fn ssh_command(m: &Machine, cfg: &SshConfig, remote: &[String]) -> Result<Command, TransportError> {
    if is_local(m) {
        let mut c = Command::new(&remote[0]);
        c.args(&remote[1..]);
        return Ok(c);
    }
    let script = remote.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ");
    ssh_script(m, cfg, &script)
}

/// Builds the command that runs the shell `script` on `m`. The script must be
/// made of fixed text and [`shell_quote`]d words only.
pub fn ssh_script(m: &Machine, cfg: &SshConfig, script: &str) -> Result<Command, TransportError> {
    if is_local(m) {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        return Ok(c);
    }
    let mut c = ssh_with_options(m, cfg)?;
    c.arg("--").arg(&m.ssh.host);
    c.arg(script);
    Ok(c)
}

/// `ssh -G` with every option we would connect to `m` with: prints the
/// settings ssh would use (after the user's ssh config and `NIX_SSHOPTS`),
/// without connecting. See [`ssh_setting`].
pub fn ssh_settings_command(m: &Machine, cfg: &SshConfig) -> Result<Command, TransportError> {
    let mut c = ssh_with_options(m, cfg)?;
    c.arg("-G").arg("--").arg(&m.ssh.host);
    Ok(c)
}

/// `ssh -F /dev/null -G host`: OpenSSH's built-in defaults, no config read.
pub fn ssh_defaults_command(m: &Machine, cfg: &SshConfig) -> Command {
    let mut c = Command::new(&cfg.program);
    c.args(["-F", "/dev/null", "-G", "--"]).arg(&m.ssh.host);
    c
}

/// One setting (`key value...`) from `ssh -G` output.
pub fn ssh_setting<'a>(settings: &'a str, key: &str) -> Option<&'a str> {
    settings.lines().find_map(|l| l.split_once(' ').filter(|(k, _)| *k == key).map(|(_, v)| v.trim()))
}

/// The cipher list `list` (ssh's comma-separated order of preference) with the
/// AES-GCM ciphers moved to the front, order otherwise kept; `None` when it
/// has none or already starts with one. With AES instructions on both ends,
/// AES-GCM costs ssh a fraction of the CPU of chacha20-poly1305 (OpenSSH's
/// default first choice), which is what limits ssh on fast links.
pub fn aes_gcm_first(list: &str) -> Option<String> {
    let all: Vec<&str> = list.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
    let is_gcm = |c: &&str| c.starts_with("aes") && c.contains("-gcm");
    if all.first().is_none_or(is_gcm) || !all.iter().any(is_gcm) {
        return None;
    }
    let (gcm, rest): (Vec<&str>, Vec<&str>) = all.into_iter().partition(is_gcm);
    Some(gcm.into_iter().chain(rest).collect::<Vec<_>>().join(","))
}

/// Whether this CPU has AES and carry-less multiply instructions (what makes
/// AES-GCM fast).
pub fn local_cpu_has_aes() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// `s` with every `%` doubled: ssh expands `%` tokens in file names given
/// as options (`-i`, `UserKnownHostsFile`, `ControlPath`), so a literal `%`
/// in a key path, a store URI or the load directory must be escaped.
pub fn percent_escape(s: &str) -> String {
    s.replace('%', "%%")
}

/// The builder's options of ours and the user's, up to (not including) the host.
fn ssh_with_options(m: &Machine, cfg: &SshConfig) -> Result<Command, TransportError> {
    let mut c = Command::new(&cfg.program);
    c.arg("-x").arg("-T");
    let o = |c: &mut Command, s: String| {
        c.arg("-o").arg(s);
    };
    o(&mut c, "BatchMode=yes".into());
    o(&mut c, format!("ConnectTimeout={}", cfg.connect_timeout));
    o(&mut c, format!("ServerAliveInterval={}", cfg.server_alive_interval));
    o(&mut c, format!("ServerAliveCountMax={}", cfg.server_alive_count_max));
    o(&mut c, if m.ssh.compress { "Compression=yes" } else { "Compression=no" }.into());
    c.args(&cfg.extra_opts);
    if let Some(ciphers) = &cfg.ciphers {
        o(&mut c, format!("Ciphers={ciphers}"));
    }
    if let Some(k) = &m.ssh_key {
        // Not `-i`: ssh checks that file before expanding `%` tokens.
        o(&mut c, format!("IdentityFile={}", percent_escape(k)));
    }
    if let Some(key) = &m.host_key {
        let kh = pinned_known_hosts(m, key, &cfg.known_hosts_dir)?;
        o(&mut c, format!("UserKnownHostsFile={}", percent_escape(&kh.to_string_lossy())));
        o(&mut c, "GlobalKnownHostsFile=/dev/null".into());
        o(&mut c, "StrictHostKeyChecking=yes".into());
        o(&mut c, "CheckHostIP=no".into());
    }
    if let Some(p) = m.ssh.port {
        c.arg("-p").arg(p.to_string());
    }
    if let Some(sock) = control_socket(m, cfg) {
        o(&mut c, "ControlMaster=auto".into());
        o(&mut c, format!("ControlPath={}", percent_escape(&sock.to_string_lossy())));
        o(&mut c, format!("ControlPersist={}", cfg.control_persist));
    }
    Ok(c)
}

/// The socket of the connection shared with `m` (`None`: sharing is off):
/// in the control directory, named by a hash of everything that shapes the
/// connection (ssh program, host, port, key, pinned host key, compression,
/// `NIX_SSHOPTS`; not the cipher preference, which only a new connection
/// uses), 40 hex digits like OpenSSH's `%C`. Knowing it lets us see whether
/// the connection is open without asking ssh.
pub fn control_socket(m: &Machine, cfg: &SshConfig) -> Option<PathBuf> {
    let dir = cfg.control_dir.as_ref()?;
    let port = m.ssh.port.map(|p| p.to_string()).unwrap_or_default();
    let words =
        [cfg.program.as_str(), m.ssh.host.as_str(), port.as_str(), m.ssh_key.as_deref().unwrap_or(""), m.host_key.as_deref().unwrap_or(""), if m.ssh.compress { "c" } else { "" }];
    let hex = words_hex(words.iter().copied().chain(cfg.extra_opts.iter().map(String::as_str)).map(str::as_bytes));
    Some(dir.join(&hex[..40]))
}

/// Whether the connection shared with `m` is open (its master answers).
pub fn shared_connection_open(m: &Machine, cfg: &SshConfig) -> bool {
    control_socket(m, cfg).is_some_and(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
}

/// Whether `NIX_SSHOPTS` sets up connection sharing of the user's own
/// (those options come first on the command line, so ssh keeps them): then
/// nothing of ours listens on our socket.
pub fn users_own_sharing(cfg: &SshConfig) -> bool {
    cfg.extra_opts.iter().any(|o| {
        let l = o.to_ascii_lowercase();
        o.starts_with("-S") || l.contains("controlpath") || l.contains("controlmaster")
    })
}

/// Before opening a session to `m`: when no shared connection is open, makes
/// this process the one that opens it. Hooks started together (a fan-out's
/// first builds) would otherwise each make their own connection, paying for
/// its key exchange on both ends, and only one of them could be shared. The
/// first takes `<socket>.connecting`; the others wait for it (until
/// `deadline` at most), then find the connection open and share it. Hold the
/// returned lock until the session is up (its master then listens); `None`
/// when sharing is off, the connection is open, or the wait timed out.
pub fn claim_new_connection(m: &Machine, cfg: &SshConfig, deadline: Instant) -> Option<crate::slots::FileLock> {
    // No ssh (a store on this host), or the user's own sharing options
    // (which come first on the command line, so ssh keeps them): nothing of
    // ours will listen on the socket.
    if is_local(m) || users_own_sharing(cfg) {
        return None;
    }
    let sock = control_socket(m, cfg)?;
    if shared_connection_open(m, cfg) {
        return None;
    }
    let dir = crate::slots::LoadDir { path: sock.parent()?.to_path_buf() };
    let name = format!("{}.connecting", sock.file_name()?.to_string_lossy());
    // Free at once: this process opens the connection.
    if let Some((_, lock)) = dir.wait_first(std::slice::from_ref(&name), Instant::now()).ok().flatten() {
        return Some(lock);
    }
    // Another hook is opening it: wait for that once (it releases the lock
    // when its session is up). If it ends without a connection (the builder
    // is down, say), connect on our own rather than queue behind every
    // other attempt.
    drop(dir.wait_first(&[name], deadline));
    None
}

/// How long a running process's streams may stay silent, and whether they
/// did: every byte read from its stdout or stderr and every byte written to
/// its stdin counts as progress. A watchdog thread kills the process when the
/// current phase's limit passes without progress, so no remote phase can
/// stall forever; [`Ended::stalled`] then says which phase it was.
pub struct Watch {
    start: Instant,
    /// Milliseconds since `start` of the last progress.
    last: AtomicU64,
    /// Milliseconds of silence allowed now; 0 means no limit.
    limit: AtomicU64,
    phase: Mutex<&'static str>,
    /// Set by the watchdog when it killed the process: (phase, limit in ms).
    fired: Mutex<Option<(&'static str, u64)>>,
}

impl Watch {
    fn new() -> Self {
        Watch { start: Instant::now(), last: AtomicU64::new(0), limit: AtomicU64::new(0), phase: Mutex::new("starting"), fired: Mutex::new(None) }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    /// Something moved.
    pub fn progress(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }
    /// Enters `phase`, which may be silent for at most `limit` (`None`: no
    /// limit). Counts as progress.
    pub fn phase(&self, phase: &'static str, limit: Option<Duration>) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
        self.progress();
        self.limit.store(limit.map(|l| (l.as_millis() as u64).max(1)).unwrap_or(0), Ordering::Relaxed);
    }
    /// The phase and allowed silence if the watchdog killed the process.
    pub fn stalled(&self) -> Option<(&'static str, Duration)> {
        self.fired.lock().unwrap_or_else(|e| e.into_inner()).map(|(p, ms)| (p, Duration::from_millis(ms)))
    }
    /// True (and the process must be killed) when the limit has passed.
    fn expired(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 || self.now_ms().saturating_sub(self.last.load(Ordering::Relaxed)) <= limit {
            return false;
        }
        let phase = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *self.fired.lock().unwrap_or_else(|e| e.into_inner()) = Some((phase, limit));
        true
    }
}

/// A child's stream that reports progress to its [`Watch`].
pub struct Watched<T> {
    inner: T,
    watch: Arc<Watch>,
}

impl<T: Read> Read for Watched<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.watch.progress();
        }
        Ok(n)
    }
}

impl<T: Write> Write for Watched<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if n > 0 {
            self.watch.progress();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A child's stdin, watched.
pub type ProcIn = Watched<ChildStdin>;
/// A child's stdout, watched.
pub type ProcOut = Watched<ChildStdout>;

/// Children started through [`RemoteProcess`] and not yet reaped. A PID is
/// removed under this lock before its process is waited for, so a signal
/// handler that kills the PIDs listed here never hits a recycled PID.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Runs `f` on the PIDs of every child not yet reaped (e.g. to signal them
/// when the hook is terminated). The list is locked meanwhile, so none of
/// them can be reaped and its PID reused while `f` runs. Each child started
/// by [`RemoteProcess::spawn`] leads its own process group (id = its PID).
pub fn with_live_children(f: impl FnOnce(&[u32])) {
    f(&LIVE.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Where shared-connection sockets go: the load directory when the socket
/// path fits, else a private directory in /tmp; `None` disables sharing.
pub fn control_dir(load: &crate::slots::LoadDir) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // sun_path holds 107 bytes; OpenSSH binds "<dir>/<%C: 40>.<16 random>" first.
    const MAX_DIR: usize = 107 - 1 - 40 - 17;
    // SAFETY: geteuid has no preconditions.
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

/// Where the remote's stderr goes: kept as a tail for error messages and,
/// once the build is ours, copied to the build log (fd 4).
#[derive(Clone, Default)]
pub struct StderrTap {
    inner: Arc<Mutex<TapState>>,
}

#[derive(Default)]
struct TapState {
    tail: VecDeque<String>,
    log: Option<File>,
}

const TAIL_LINES: usize = 20;

impl StderrTap {
    /// From now on, copy the remote's stderr to `log`.
    pub fn forward_to(&self, log: File) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).log = Some(log);
    }
    /// The last lines the remote printed, joined.
    pub fn tail(&self) -> String {
        let st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.tail.iter().map(|s| s.trim_end()).filter(|s| !s.is_empty()).collect::<Vec<_>>().join("\n")
    }
    fn feed(&self, chunk: &[u8], partial: &mut Vec<u8>) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = st.log.as_mut() {
            let _ = log.write_all(chunk);
        }
        partial.extend_from_slice(chunk);
        while let Some(i) = partial.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            st.tail.push_back(String::from_utf8_lossy(&line).into_owned());
            if st.tail.len() > TAIL_LINES {
                st.tail.pop_front();
            }
        }
        if partial.len() > 4096 {
            let line = String::from_utf8_lossy(partial).into_owned();
            partial.clear();
            st.tail.push_back(line);
        }
    }
    fn finish(&self, partial: Vec<u8>) {
        if !partial.is_empty() {
            let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            st.tail.push_back(String::from_utf8_lossy(&partial).into_owned());
            if st.tail.len() > TAIL_LINES {
                st.tail.pop_front();
            }
        }
    }
}

/// How a process ended: its exit status (`None` if it could not be
/// waited for), the last lines of its stderr, and the phase it stalled in if
/// the watchdog killed it.
#[derive(Debug)]
pub struct Ended {
    pub status: Option<std::process::ExitStatus>,
    pub tail: String,
    pub stalled: Option<(&'static str, Duration)>,
    /// We killed it (so a signal in `status` is ours, not a sign of loss).
    pub killed: bool,
}

/// Silence allowed while a process that was told to end (its stdin closed)
/// has not exited yet.
const ENDING_LIMIT: Duration = Duration::from_secs(30);

/// A running command (ssh to a builder, or a local `nix-store`) with watched
/// stdin/stdout, tapped stderr and a watchdog (see [`Watch`]).
pub struct RemoteProcess {
    child: Proc,
    pub stdin: Option<ProcIn>,
    pub stdout: Option<ProcOut>,
    pub tap: StderrTap,
    pub watch: Arc<Watch>,
    pump: Option<JoinHandle<()>>,
    dog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// Reaped by [`RemoteProcess::finish`].
    reaped: bool,
    /// Killed by [`RemoteProcess::kill`].
    killed: bool,
}

impl Drop for RemoteProcess {
    /// A process given up without [`RemoteProcess::finish`] (an early
    /// return) is killed and reaped, so it neither lingers nor leaves a
    /// zombie whose PID stays on the live list.
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            self.reap();
            if let Some((tx, dog)) = self.dog.take() {
                let _ = tx.send(());
                let _ = dog.join();
            }
        }
    }
}

impl RemoteProcess {
    /// Spawns `cmd` with all three standard streams piped. The watchdog
    /// starts with no limit; see [`Watch::phase`].
    pub fn spawn(mut cmd: Command, tap: StderrTap) -> Result<Self, TransportError> {
        use std::os::unix::process::CommandExt;
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group, so that the watchdog and the signal handler
        // end a whole pipeline (`sh -c 'zstd -d | nix-store …'`), not just its
        // shell; and killed if the hook dies, since Nix's kill of the hook's
        // process group no longer reaches it. (ssh's shared-connection master
        // detaches into a session of its own and is not affected.)
        cmd.process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                #[cfg(target_os = "linux")]
                {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // The hook died before the line above took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            let child = cmd.spawn().map_err(|source| TransportError::Spawn { program, source })?;
            live.push(child.id());
            child
        };
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take().expect("stderr is piped"));
        Ok(Self::start(Proc::Own(child), stdin, stdout, stderr, tap))
    }

    /// A session held ahead and taken ([`crate::held`]): the same as a
    /// spawned one, except that its holder waits for it and kills it.
    pub fn adopt(t: crate::held::Taken, tap: StderrTap) -> Self {
        let crate::held::Taken { holder, pid, stdin, stdout, stderr } = t;
        let proc = Proc::Held { holder, pid, got: Vec::new(), done: None };
        Self::start(proc, Some(ChildStdin::from(stdin)), Some(ChildStdout::from(stdout)), std::process::ChildStderr::from(stderr), tap)
    }

    fn start(child: Proc, stdin: Option<ChildStdin>, stdout: Option<ChildStdout>, mut err: std::process::ChildStderr, tap: StderrTap) -> Self {
        let watch = Arc::new(Watch::new());
        let (t, w) = (tap.clone(), watch.clone());
        let pump = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut partial = Vec::new();
            loop {
                match err.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        w.progress();
                        t.feed(&buf[..n], &mut partial)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            t.finish(partial);
        });
        let (tx, rx) = mpsc::channel::<()>();
        let (w, killer) = (watch.clone(), child.killer());
        let dog = std::thread::spawn(move || loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if w.expired() {
                        // Our own child's process group, not yet reaped (the
                        // watchdog is stopped before it is waited for), or
                        // the holder of a taken session.
                        if let Some(k) = &killer {
                            k.kill();
                        }
                        return;
                    }
                }
                _ => return,
            }
        });
        let stdin = stdin.map(|inner| Watched { inner, watch: watch.clone() });
        let stdout = stdout.map(|inner| Watched { inner, watch: watch.clone() });
        RemoteProcess { stdin, stdout, child, tap, watch, pump: Some(pump), dog: Some((tx, dog)), reaped: false, killed: false }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin and stdout, waits for the process (killing it if it stays
    /// silent past the current limit, at most 30 s) and for its stderr, and
    /// says how it ended.
    pub fn finish(mut self) -> Ended {
        drop(self.stdin.take());
        drop(self.stdout.take());
        if self.watch.stalled().is_none() {
            let cur = Duration::from_millis(self.watch.limit.load(Ordering::Relaxed));
            let limit = if cur.is_zero() { ENDING_LIMIT } else { cur.min(ENDING_LIMIT) };
            self.watch.phase("ending the session", Some(limit));
        }
        let status = self.reap();
        self.reaped = true;
        if let Some((tx, dog)) = self.dog.take() {
            let _ = tx.send(());
            let _ = dog.join();
        }
        if let Some(p) = self.pump.take() {
            // A grandchild may keep stderr open: don't wait for it long.
            let until = Instant::now() + Duration::from_secs(1);
            while !p.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
        Ended { status, tail: self.tap.tail(), stalled: self.watch.stalled(), killed: self.killed }
    }

    /// Waits for the child; it is reaped with the live list locked, so a
    /// signal handler never kills its PID after the kernel may reuse it.
    fn reap(&mut self) -> Option<std::process::ExitStatus> {
        let mut pause = Duration::from_micros(200);
        // Our own child always ends once killed; a held session's status
        // comes from its holder, which could be stopped: given up then (the
        // holder kills the session when our end of its socket closes).
        let give_up = Instant::now() + ENDING_LIMIT + Duration::from_secs(5);
        loop {
            if let Some(status) = self.try_reap() {
                return status;
            }
            if matches!(self.child, Proc::Held { .. }) && Instant::now() >= give_up {
                self.kill_group();
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// `Some(status)` once the child has exited (it is then reaped and off
    /// the live list, both under the list's lock); `None` while it runs.
    fn try_reap(&mut self) -> Option<Option<std::process::ExitStatus>> {
        let pid = self.child.id();
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let status = match self.child.try_wait() {
            Ok(None) => return None,
            Ok(Some(st)) => Some(st),
            Err(_) => None,
        };
        live.retain(|p| *p != pid);
        Some(status)
    }

    /// Kills the process (its whole group) and collects what it printed.
    pub fn kill(mut self) -> Ended {
        self.kill_group();
        self.killed = true;
        self.finish()
    }

    /// Gives the process up to `grace` to end by itself (e.g. ssh exiting
    /// after its connection died, which a reader may notice first); then
    /// finishes it if it did, and kills it if it did not.
    pub fn end_within(mut self, grace: Duration) -> Ended {
        let until = Instant::now() + grace;
        loop {
            if self.try_reap().is_some() {
                // Reaped: the status is kept by `Child`, so finish() gets it again.
                return self.finish();
            }
            if Instant::now() >= until {
                return self.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill_group(&mut self) {
        if let Some(k) = self.child.killer() {
            k.kill();
        }
    }
}

/// The process behind a [`RemoteProcess`].
enum Proc {
    /// Our child, leading its own process group.
    Own(Child),
    /// A session taken from its holder ([`crate::held`]), which is its
    /// parent: the holder sends its wait status (`got` collects the bytes;
    /// `done` keeps the status once read) and kills it when asked.
    Held { holder: std::os::unix::net::UnixStream, pid: u32, got: Vec<u8>, done: Option<Option<std::process::ExitStatus>> },
}

/// Who ends a process: a signal to our child's process group, or a word to
/// the holder of a taken session.
enum Killer {
    Group(u32),
    Holder(std::os::unix::net::UnixStream),
}

impl Killer {
    fn kill(&self) {
        match self {
            // SAFETY: signalling our own child's process group; the child is
            // not reaped yet (callers stop killing before they reap it), so
            // the group id is still ours.
            Killer::Group(pid) => unsafe {
                libc::kill(-(*pid as libc::pid_t), libc::SIGKILL);
            },
            Killer::Holder(s) => crate::held::kill(s),
        }
    }
}

impl Proc {
    fn id(&self) -> u32 {
        match self {
            Proc::Own(c) => c.id(),
            Proc::Held { pid, .. } => *pid,
        }
    }

    /// `None` when there is nothing to kill with (the holder's socket could
    /// not be shared; it then ends the session when we drop the socket).
    fn killer(&self) -> Option<Killer> {
        match self {
            Proc::Own(c) => Some(Killer::Group(c.id())),
            Proc::Held { holder, .. } => holder.try_clone().ok().map(Killer::Holder),
        }
    }

    /// As [`Child::try_wait`]; for a taken session, from its holder (its
    /// holder gone without a word: ended as if killed, see below).
    fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self {
            Proc::Own(c) => c.try_wait(),
            Proc::Held { holder, got, done, .. } => {
                if done.is_none() {
                    *done = crate::held::try_status(holder, got);
                }
                match done {
                    None => Ok(None),
                    Some(Some(st)) => Ok(Some(*st)),
                    // The holder died without a word: its death killed the
                    // session (PDEATHSIG), so it ended as if killed; a cut
                    // stream is then a lost connection, not a refusal.
                    Some(None) => Ok(Some(std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL))),
                }
            }
        }
    }
}

/// Turns ssh's error text into advice, naming the machine.
pub fn explain_ssh_failure(m: &Machine, stderr: &str) -> Option<String> {
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || stderr.contains("Host key verification failed") {
        Some(format!(
            "the host key of {} is unknown or has changed; to pin it, put the base64 of the builder's public host key in column 8 of its machines entry (on the builder: base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub), or add it to root's ~/.ssh/known_hosts",
            m.uri
        ))
    } else if stderr.contains("Permission denied") {
        Some(format!(
            "{} refused the login; check the ssh key in column 3 ({}) and that its public half is in the builder's authorized_keys",
            m.uri,
            m.ssh_key.as_deref().unwrap_or("none given: ssh's defaults and agent are used")
        ))
    } else if stderr.contains("Connection timed out") || stderr.contains("Connection refused") || stderr.contains("No route to host") || stderr.contains("Could not resolve") {
        Some(format!("{} is unreachable; check that it is up and that sshd listens there", m.uri))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::machines::test_machine as machine;

    fn cfg(dir: &Path) -> SshConfig {
        SshConfig {
            program: "ssh".into(),
            connect_timeout: 5,
            server_alive_interval: 10,
            server_alive_count_max: 3,
            control_dir: Some(dir.join("mux")),
            control_persist: 60,
            known_hosts_dir: dir.join("kh"),
            extra_opts: split_sshopts("-F /etc/x -o 'IdentityAgent none'"),
            ciphers: None,
            bridge: Some(PathBuf::from("/opt/bh/build-hook")),
        }
    }

    #[test]
    fn ssh_ng_bulk_sessions_only_with_the_default_daemon_and_a_nix_store() {
        let caps = Caps { zstd: true, aes: false, nix_store: true };
        assert!(bulk_allowed(&machine("ssh://b1?remote-program=/opt/x/nix-store"), &Caps { nix_store: false, ..caps }));
        assert!(bulk_allowed(&machine("ssh-ng://b1"), &caps));
        assert!(!bulk_allowed(&machine("ssh-ng://b1"), &Caps { nix_store: false, ..caps }));
        assert!(!bulk_allowed(&machine("ssh-ng://b1?remote-program=/opt/wrap-daemon"), &caps));
        assert_eq!(serve_words(&machine("ssh-ng://b1?remote-store=%2Fs"))[..2], ["nix-store", "--serve"]);
    }

    #[test]
    fn ssh_ng_sessions_go_through_the_bridge_to_the_daemon() {
        let dir = std::env::temp_dir();
        let m = machine("ssh-ng://b1?remote-store=local%3Froot%3D%2Fs");
        let c = session_command(&m, &cfg(&dir)).unwrap();
        assert_eq!(c.get_program(), "/opt/bh/build-hook");
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&args[..3], ["__ssh-ng-bridge", "--", "ssh"]);
        assert_eq!(args.last().map(String::as_str), Some("nix-daemon --stdio --store 'local?root=/s'"));
        let local = machine("ssh-ng://localhost");
        let c = session_command(&local, &cfg(&dir)).unwrap();
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["__ssh-ng-bridge", "--", "nix-daemon", "--stdio"]);
        let none = SshConfig { bridge: None, ..cfg(&dir) };
        assert!(matches!(session_command(&m, &none), Err(TransportError::NoBridge { .. })));
        // ssh:// is unchanged
        assert_eq!(session_command(&machine("ssh://b1"), &none).unwrap().get_program(), "ssh");
    }

    #[test]
    fn sshopts_split_like_a_shell() {
        assert_eq!(split_sshopts(" -p 22  -o \"A B\" 'c d'\\ e ''"), ["-p", "22", "-o", "A B", "c d e", ""]);
    }

    #[test]
    fn command_line_pins_key_and_quotes_remote_words() {
        let dir = std::env::temp_dir().join(format!("transport-{}", std::process::id()));
        let m = machine("ssh://root@b1:2222?remote-program=/opt/my%20nix/nix-store - /k 1 1 - - c3NoLWVkMjU1MTkgQUFBQQ==");
        let c = ssh_command(&m, &cfg(&dir), &serve_words(&m)).unwrap();
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("-o BatchMode=yes -o ConnectTimeout=5"), "{joined}");
        assert!(joined.contains("-F /etc/x -o IdentityAgent none"), "{joined}");
        assert!(joined.contains("-o IdentityFile=/k"), "{joined}");
        assert!(joined.contains("StrictHostKeyChecking=yes"), "{joined}");
        assert!(joined.contains("-p 2222"), "{joined}");
        assert_eq!(args[args.len() - 2], "root@b1");
        assert_eq!(args[args.len() - 3], "--");
        assert_eq!(args[args.len() - 1], "'/opt/my nix/nix-store' --serve --write");
        let kh = std::fs::read_to_string(dir.join("kh").join("ssh:__root@b1:2222?remote-program=_opt_my%20nix_nix-store")).unwrap();
        assert_eq!(kh, "* ssh-ed25519 AAAA\n");
    }

    #[test]
    fn the_first_of_several_new_connections_is_claimed_once() {
        let dir = std::env::temp_dir().join(format!("transport-claim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = cfg(&dir);
        std::fs::create_dir_all(c.control_dir.as_ref().unwrap()).unwrap();
        let m = machine("ssh://b1 x86_64-linux");
        let sock = control_socket(&m, &c).unwrap();
        assert_eq!(sock.file_name().unwrap().len(), 40);
        assert_ne!(Some(sock.clone()), control_socket(&machine("ssh://b2 x86_64-linux"), &c), "another host, another connection");
        let soon = Instant::now() + Duration::from_millis(300);
        let first = claim_new_connection(&m, &c, soon).expect("no connection is open: the first claims it");
        let t = Instant::now();
        assert!(claim_new_connection(&m, &c, t + Duration::from_millis(300)).is_none(), "a second waits, then goes on without the claim");
        assert!(t.elapsed() >= Duration::from_millis(300), "it waited for the first");
        drop(first);
        assert!(claim_new_connection(&machine("ssh://localhost x86_64-linux"), &c, soon).is_none(), "no ssh, nothing to claim");
        c.extra_opts = vec!["-o".into(), "ControlPath=/tmp/mine".into()];
        assert!(claim_new_connection(&m, &c, soon).is_none(), "the user's own sharing is left alone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn percent_signs_and_long_uris_reach_ssh_intact() {
        let dir = std::env::temp_dir().join(format!("transport-pct-{}", std::process::id()));
        let long = "x".repeat(300);
        let m = machine(&format!("ssh://b1?remote-program=/opt/{long}/100%25/nix-store - /keys/100%key 1 1 - - c3NoLWVkMjU1MTkgQUFBQQ=="));
        let mut c = cfg(&dir.join("load%dir"));
        c.control_dir = Some(dir.join("load%dir").join("ssh"));
        let args: Vec<String> = ssh_command(&m, &c, &serve_words(&m)).unwrap().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("-o IdentityFile=/keys/100%%key"), "{joined}");
        assert!(joined.contains(&format!("ControlPath={}", control_socket(&m, &c).unwrap().to_string_lossy().replace('%', "%%"))), "{joined}");
        assert!(joined.contains("load%%dir/ssh/"), "{joined}");
        let kh = args.iter().find_map(|a| a.strip_prefix("UserKnownHostsFile=")).unwrap();
        assert!(kh.contains("load%%dir/kh/uri-"), "a long URI gets a hashed file name: {kh}");
        assert!(std::path::Path::new(&kh.replace("%%", "%")).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bulk_pipelines_quote_the_machine_words() {
        let m = machine("ssh://b1?remote-program=/opt/my%20nix/nix-store&remote-store=local%3Froot%3D%2Fs");
        assert_eq!(bulk_script(&m, Bulk::Upload), "zstd -d -q -c | '/opt/my nix/nix-store' --serve --write --store 'local?root=/s'");
        assert_eq!(bulk_script(&m, Bulk::Download { level: 3 }), "'/opt/my nix/nix-store' --serve --write --store 'local?root=/s' | zstd -q -c -3");
        assert_eq!(bulk_script(&m, Bulk::Download { level: 99 }), "'/opt/my nix/nix-store' --serve --write --store 'local?root=/s' | zstd -q -c -19");
    }

    #[test]
    fn localhost_runs_without_ssh_as_nix_does() {
        let dir = std::env::temp_dir();
        let m = machine("ssh://localhost");
        let c = ssh_command(&m, &cfg(&dir), &serve_words(&m)).unwrap();
        assert_eq!(c.get_program(), "nix-store");
        assert_eq!(c.get_args().collect::<Vec<_>>(), ["--serve", "--write"]);
        let c = ssh_script(&m, &cfg(&dir), &bulk_script(&m, Bulk::Upload)).unwrap();
        assert_eq!(c.get_program(), "/bin/sh");
    }

    #[test]
    fn a_failed_ssh_is_not_taken_for_a_missing_capability() {
        assert_eq!(parse_caps(Some(0), "zstd\naes\naes\nnix-store\ndone\n"), Some(Caps { zstd: true, aes: true, nix_store: true }));
        assert_eq!(parse_caps(Some(0), "done\n"), Some(Caps { zstd: false, aes: false, nix_store: false }));
        assert_eq!(parse_caps(Some(255), ""), None);
        assert_eq!(parse_caps(None, "zstd\n"), None);
        assert_eq!(parse_caps(Some(0), "zstd\n"), None, "cut short before 'done'");
    }

    #[test]
    fn caps_probe_runs_in_a_posix_shell() {
        let out = Command::new("sh").arg("-c").arg(CAPS_PROBE).output().unwrap();
        let caps = parse_caps(out.status.code(), &String::from_utf8_lossy(&out.stdout)).expect("probe ran to its end");
        let has_zstd = Command::new("sh").arg("-c").arg("command -v zstd").output().unwrap().status.success();
        assert_eq!(caps.zstd, has_zstd);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        assert_eq!(caps.aes, cpuinfo.split_whitespace().any(|w| w == "aes"));
    }

    #[test]
    fn aes_gcm_moves_to_the_front_of_the_default_order() {
        let openssh_9 = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";
        assert_eq!(aes_gcm_first(openssh_9).as_deref(), Some("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"));
        assert_eq!(aes_gcm_first("aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"), None);
        assert_eq!(aes_gcm_first("chacha20-poly1305@openssh.com,aes128-ctr"), None);
        assert_eq!(aes_gcm_first(""), None);
    }

    #[test]
    fn ssh_settings_are_read_from_ssh_g_output() {
        let out = "user root\nciphers chacha20-poly1305@openssh.com,aes128-ctr\ncontrolpath /run/x/ab12\n";
        assert_eq!(ssh_setting(out, "ciphers"), Some("chacha20-poly1305@openssh.com,aes128-ctr"));
        assert_eq!(ssh_setting(out, "controlpath"), Some("/run/x/ab12"));
        assert_eq!(ssh_setting(out, "cipher"), None);
    }

    #[test]
    fn ciphers_are_passed_when_chosen() {
        let dir = std::env::temp_dir();
        let m = machine("ssh://b1");
        let mut c = cfg(&dir);
        c.ciphers = Some("aes128-gcm@openssh.com,chacha20-poly1305@openssh.com".into());
        let args: Vec<String> = ssh_command(&m, &c, &serve_words(&m)).unwrap().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.join(" ").contains("-o Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"), "{args:?}");
        let g: Vec<String> = ssh_settings_command(&m, &c).unwrap().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&g[g.len() - 3..], ["-G", "--", "b1"]);
    }

    #[test]
    fn quoting_cannot_be_escaped() {
        assert_eq!(shell_quote("a'b; rm -rf /"), "'a'\\''b; rm -rf /'");
        assert_eq!(shell_quote("nix-store"), "nix-store");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn a_silent_process_is_killed_by_its_watchdog_and_a_chatty_one_is_not() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30"]);
        let mut p = RemoteProcess::spawn(cmd, StderrTap::default()).unwrap();
        p.watch.phase("waiting for nothing", Some(Duration::from_millis(300)));
        let t = Instant::now();
        let mut out = Vec::new();
        p.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let ended = p.finish();
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        assert_eq!(ended.stalled, Some(("waiting for nothing", Duration::from_millis(300))));
        // progress on stderr counts
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "for i in 1 2 3 4 5 6; do echo tick >&2; sleep 0.1; done"]);
        let p = RemoteProcess::spawn(cmd, StderrTap::default()).unwrap();
        p.watch.phase("ticking", Some(Duration::from_millis(400)));
        let ended = p.finish();
        assert_eq!(ended.stalled, None);
        assert!(ended.status.unwrap().success());
    }

    #[test]
    fn end_within_keeps_a_quick_exit_and_kills_a_lingering_process() {
        // Exits once its input closes: reaped with its own status.
        let mut p = RemoteProcess::spawn(Command::new("cat"), StderrTap::default()).unwrap();
        drop(p.stdin.take());
        let ended = p.end_within(Duration::from_secs(5));
        assert!(ended.status.unwrap().success() && !ended.killed, "{ended:?}");
        // Lingers after its input closed (a remote store committing): killed
        // after the grace, not waited for.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat >/dev/null; sleep 30"]);
        let mut p = RemoteProcess::spawn(cmd, StderrTap::default()).unwrap();
        drop(p.stdin.take());
        let t = Instant::now();
        let ended = p.end_within(Duration::from_millis(20));
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
        assert!(ended.killed, "{ended:?}");
    }

    #[test]
    fn a_held_session_whose_holder_vanished_ended_as_if_killed() {
        use std::os::fd::OwnedFd;
        use std::os::unix::process::ExitStatusExt;
        let (ours, holders) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_in_r, in_w) = std::io::pipe().unwrap();
        let (out_r, out_w) = std::io::pipe().unwrap();
        let (err_r, err_w) = std::io::pipe().unwrap();
        drop((out_w, err_w));
        let t = crate::held::Taken { holder: ours, pid: 0, stdin: OwnedFd::from(in_w), stdout: OwnedFd::from(out_r), stderr: OwnedFd::from(err_r) };
        let p = RemoteProcess::adopt(t, StderrTap::default());
        // The holder dies without sending the session's status.
        drop(holders);
        let ended = p.finish();
        assert_eq!(ended.status.and_then(|s| s.signal()), Some(libc::SIGKILL), "{ended:?}");
        assert!(!ended.killed, "not killed by us");
    }

    #[test]
    fn children_leave_the_live_list_when_reaped() {
        let p = RemoteProcess::spawn(Command::new("true"), StderrTap::default()).unwrap();
        let pid = p.pid();
        let mut listed = false;
        with_live_children(|pids| listed = pids.contains(&pid));
        assert!(listed);
        drop(p);
        with_live_children(|pids| listed = pids.contains(&pid));
        assert!(!listed, "a dropped process is reaped and unlisted");
    }

    #[test]
    fn stderr_tap_keeps_a_tail_and_forwards() {
        let tap = StderrTap::default();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "for i in $(seq 1 30); do echo line $i >&2; done; printf 'no newline' >&2"]);
        let p = RemoteProcess::spawn(cmd, tap).unwrap();
        let ended = p.finish();
        let tail = ended.tail;
        assert!(ended.status.unwrap().success());
        assert!(tail.starts_with("line 12\n") && tail.ends_with("line 30\nno newline"), "{tail}");
    }
}
