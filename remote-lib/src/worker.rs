//! A client for Nix's worker (daemon) protocol, the one `ssh-ng://` stores
//! speak to `nix-daemon --stdio`, over any byte pipe. Synchronous std I/O, in
//! the style of [`crate::serve`]: a handshake, then one request at a time,
//! each answered by a stream of `stderr` messages (log lines, activities,
//! results, an error) that ends in `STDERR_LAST` or `STDERR_ERROR`, then the
//! operation's reply.
//!
//! We announce protocol 1.38 with no features: the newest version whose
//! every field we read and write (1.35 tells whether the daemon trusts us,
//! 1.37 adds CPU times to build results, 1.38 only adds the feature exchange,
//! where we offer none, so content-addressed realisations stay in the JSON
//! form every daemon from Nix 2.4 to 2.35 understands). Every optional field
//! is gated on `min(1.38, daemon version)`, as Nix itself does, down to the
//! oldest daemon modern Nix still talks to (1.18).
//!
//! Nothing the daemon says can make us allocate without bound: every string,
//! list and reply has a limit, and unknown message tags are protocol errors.

use crate::derivation::Derivation;
use crate::hash::Sha256Hash;
use crate::nixlog;
use crate::path_info::Bounded;
use crate::serve::{BuildResult, BuildStatus, PathInfo};
use crate::wire::{self, WireError};
use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufReader, BufWriter, Read, Write};

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// What we announce (see the module documentation).
pub const CLIENT_VERSION: WorkerVersion = WorkerVersion(1, 38);
/// The oldest daemon we talk to (Nix's own floor since 2.2x).
pub const MIN_VERSION: WorkerVersion = WorkerVersion(1, 18);

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Operation numbers (`WorkerProto::Op`).
pub mod op {
    pub const QUERY_VALID_PATHS: u64 = 31;
    pub const SET_OPTIONS: u64 = 19;
    pub const QUERY_PATH_INFO: u64 = 26;
    pub const BUILD_DERIVATION: u64 = 36;
    pub const NAR_FROM_PATH: u64 = 38;
    pub const ADD_TO_STORE_NAR: u64 = 39;
    pub const REGISTER_DRV_OUTPUT: u64 = 42;
    pub const QUERY_REALISATION: u64 = 43;
    pub const ADD_MULTIPLE_TO_STORE: u64 = 44;
    pub const BUILD_PATHS: u64 = 9;
    pub const BUILD_PATHS_WITH_RESULTS: u64 = 46;
}

const MAX_PATH: usize = 4096;
/// A log line, an error message, a realisation.
const MAX_MSG: usize = 16 * 1024 * 1024;
const MAX_FIELDS: u64 = 256;
const MAX_TRACES: u64 = 1024;
const MAX_FEATURES: usize = 256;
const MAX_SIGS: usize = 64;
const MAX_BUILT_OUTPUTS: u64 = 4096;
/// Bytes one `QueryPathInfo` reply may take (about 16,000 references).
const PATH_INFO_BUDGET: u64 = 64 << 20;
/// Bytes one `STDERR_READ` may ask for at a time.
const MAX_READ_REQUEST: u64 = 1 << 20;
/// Size of the frames an upload is cut into.
const FRAME: usize = 64 * 1024;

/// A protocol version `major.minor`: the same form as the serve protocol's.
pub use crate::serve::ServeVersion as WorkerVersion;

/// What went wrong talking to a `nix-daemon`.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// EOF or a broken pipe: whether that is a lost builder or a refusal is
    /// the session layer's question.
    #[error("the connection to the builder's nix-daemon ended during {during}")]
    Closed { during: &'static str },
    #[error("nix-daemon protocol error during {during}: {why}")]
    Protocol { during: &'static str, why: String },
    /// The daemon's own error, in its words.
    #[error("the builder's nix-daemon failed {during}: {message}")]
    Remote {
        during: &'static str,
        message: String,
        /// Exit status (errors of daemons older than 1.26).
        status: Option<u64>,
        /// Verbosity level (1.26 and later).
        level: Option<u64>,
        traces: Vec<String>,
    },
    #[error("the builder's nix-daemon speaks protocol {got}; this hook speaks 1.{} to 1.{}", MIN_VERSION.1, CLIENT_VERSION.1)]
    Version { got: WorkerVersion },
    #[error("I/O error during {during}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
}

impl WorkerError {
    /// A hint when the daemon's words say it does not trust us.
    pub fn untrusted_hint(&self) -> Option<&'static str> {
        let WorkerError::Remote { message, .. } = self else { return None };
        if message.contains("lacks a valid signature") || message.contains("lacks a signature by a trusted key") {
            Some(
                "the builder's nix-daemon does not trust this user, so it accepts only signed paths: add the user to 'trusted-users' in the builder's nix.conf, \
                 or sign the paths with a key (secret-key-files here) whose public half is in the builder's 'trusted-public-keys'",
            )
        } else if message.contains("you are not privileged") {
            Some("the builder's nix-daemon does not trust this user, and only trusted users may build input-addressed derivations: add the user to 'trusted-users' in the builder's nix.conf")
        } else {
            None
        }
    }
}

fn wire_err(during: &'static str) -> impl Fn(WireError) -> WorkerError {
    move |e| match e {
        WireError::Eof { .. } => WorkerError::Closed { during },
        WireError::Io { source, .. } if closed_kind(&source) => WorkerError::Closed { during },
        e => WorkerError::Protocol { during, why: crate::session::chain(&e) },
    }
}

fn io_err(during: &'static str) -> impl Fn(io::Error) -> WorkerError {
    move |e| if closed_kind(&e) { WorkerError::Closed { during } } else { WorkerError::Io { during, source: e } }
}

fn closed_kind(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset)
}

fn protocol(during: &'static str, why: impl Into<String>) -> WorkerError {
    WorkerError::Protocol { during, why: why.into() }
}

/// Whether the daemon trusts us (1.35 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    NotTrusted,
}

/// A field of an activity or result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

/// One `stderr` message other than the end of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A log line (`STDERR_NEXT`), trailing newline included as sent.
    Next(String),
    StartActivity {
        id: u64,
        level: u64,
        activity_type: u64,
        text: String,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity(u64),
    Result {
        id: u64,
        result_type: u64,
        fields: Vec<Field>,
    },
}

fn fields_json(fields: &[Field]) -> String {
    let items: Vec<String> = fields
        .iter()
        .map(|f| match f {
            Field::Int(n) => n.to_string(),
            Field::String(s) => nixlog::json_string(s),
        })
        .collect();
    format!("[{}]", items.join(","))
}

impl Event {
    /// The `@nix` record that shows this event in Nix's log, as Nix's own
    /// JSON logger writes it (one line, newline included).
    pub fn nix_log_line(&self) -> String {
        match self {
            Event::Next(text) => nixlog::msg(nixlog::Level::Error, text.strip_suffix('\n').unwrap_or(text)),
            Event::StartActivity { id, level, activity_type, text, fields, parent } => format!(
                "@nix {{\"action\":\"start\",\"id\":{id},\"level\":{level},\"type\":{activity_type},\"text\":{},\"parent\":{parent},\"fields\":{}}}\n",
                nixlog::json_string(text),
                fields_json(fields)
            ),
            Event::StopActivity(id) => nixlog::stop(*id),
            Event::Result { id, result_type, fields } => format!("@nix {{\"action\":\"result\",\"id\":{id},\"type\":{result_type},\"fields\":{}}}\n", fields_json(fields)),
        }
    }
}

/// How `BuildDerivation` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal = 0,
    Repair = 1,
    Check = 2,
}

/// The settings `SetOptions` sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: u64,
    /// Applied even for untrusted users, so never 0 (the builder would
    /// refuse to build anything).
    pub max_build_jobs: u64,
    pub max_silent_time: u64,
    pub verbose_build: bool,
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// Further settings by name; a daemon that does not trust us ignores
    /// (with a warning) all but `timeout`, `max-silent-time`,
    /// `poll-interval`, `connect-timeout` and an empty `builders`.
    pub overrides: Vec<(String, String)>,
}

impl ClientOptions {
    /// The options of a remote build: Nix's build options, the hook's
    /// verbosity, whether the builder may substitute, and `builders = ""` so
    /// that the builder builds itself instead of forwarding.
    pub fn for_build(o: &crate::hook_protocol::BuildOptions, verbosity: u64, use_substitutes: bool) -> Self {
        let mut overrides = vec![("builders".to_string(), String::new())];
        if o.build_timeout != 0 {
            overrides.push(("timeout".into(), o.build_timeout.to_string()));
        }
        if o.max_log_size != 0 {
            overrides.push(("max-build-log-size".into(), o.max_log_size.to_string()));
        }
        ClientOptions {
            keep_failed: o.keep_failed,
            keep_going: false,
            try_fallback: false,
            verbosity,
            max_build_jobs: 1,
            max_silent_time: o.max_silent_time,
            verbose_build: true,
            build_cores: 0,
            use_substitutes,
            overrides,
        }
    }
}

/// The reply to `BuildDerivation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOutcome {
    pub result: BuildResult,
    pub is_non_deterministic: bool,
    /// CPU time of the build in microseconds (1.37 and later).
    pub cpu_user_us: Option<i64>,
    pub cpu_system_us: Option<i64>,
    /// Output id (`sha256:<hex>!<name>`) to realisation JSON (1.28 and later).
    pub built_outputs: BTreeMap<String, String>,
}

/// A content-addressed derivation output as `QueryRealisation` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Realisation {
    /// The realisation's JSON (1.31 and later).
    Json(String),
    /// Only the output path (1.27 to 1.30).
    OutPath(String),
}

/// Reads a u64 that Nix reads with `readNum<uint8_t>` (a tag).
fn read_small(r: &mut dyn Read, what: &'static str, max: u64, during: &'static str) -> Result<u64, WorkerError> {
    let v = wire::read_u64(r, what).map_err(wire_err(during))?;
    if v > max {
        return Err(protocol(during, format!("{what} is {v}, at most {max} expected")));
    }
    Ok(v)
}

fn read_list(r: &mut dyn Read, max: usize, limit: usize, what: &'static str, during: &'static str) -> Result<Vec<String>, WorkerError> {
    let n = wire::read_u64(r, what).map_err(wire_err(during))?;
    if n > max as u64 {
        return Err(protocol(during, format!("{n} {what}, at most {max} expected")));
    }
    (0..n).map(|_| wire::read_string(r, limit, what).map_err(wire_err(during))).collect()
}

fn read_fields(r: &mut dyn Read, during: &'static str) -> Result<Vec<Field>, WorkerError> {
    let e = wire_err(during);
    let n = wire::read_u64(r, "field count").map_err(&e)?;
    if n > MAX_FIELDS {
        return Err(protocol(during, format!("{n} fields in one log message")));
    }
    (0..n)
        .map(|_| match wire::read_u64(r, "field type").map_err(&e)? {
            0 => Ok(Field::Int(wire::read_u64(r, "field").map_err(&e)?)),
            1 => Ok(Field::String(read_text(r, "field", during)?)),
            t => Err(protocol(during, format!("unknown log field type {t}"))),
        })
        .collect()
}

/// Log text: any bytes (a build's output need not be UTF-8), shown lossily.
fn read_text(r: &mut dyn Read, what: &'static str, during: &'static str) -> Result<String, WorkerError> {
    let b = wire::read_bytes(r, MAX_MSG, what).map_err(wire_err(during))?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Reads an error in the format of protocol 1.26 and later.
fn read_error(r: &mut dyn Read, during: &'static str) -> Result<WorkerError, WorkerError> {
    let e = wire_err(during);
    let kind = wire::read_string(r, 64, "error type").map_err(&e)?;
    if kind != "Error" {
        return Err(protocol(during, format!("error of type '{}', expected 'Error'", kind.escape_debug())));
    }
    let level = wire::read_u64(r, "error level").map_err(&e)?;
    let _name = wire::read_bytes(r, 1024, "error name").map_err(&e)?;
    let message = read_text(r, "error message", during)?;
    if wire::read_u64(r, "error position").map_err(&e)? != 0 {
        return Err(protocol(during, "error with a position, which no daemon sends"));
    }
    let n = wire::read_u64(r, "error traces").map_err(&e)?;
    if n > MAX_TRACES {
        return Err(protocol(during, format!("{n} error traces")));
    }
    let mut traces = Vec::new();
    for _ in 0..n {
        if wire::read_u64(r, "trace position").map_err(&e)? != 0 {
            return Err(protocol(during, "error trace with a position, which no daemon sends"));
        }
        traces.push(read_text(r, "error trace", during)?);
    }
    Ok(WorkerError::Remote { during, message, status: None, level: Some(level), traces })
}

/// Reads `stderr` messages until `STDERR_LAST` (Ok) or `STDERR_ERROR` (the
/// daemon's error). `source` answers `STDERR_READ` (uploads to daemons
/// 1.21 and 1.22); anywhere else it is a protocol error, as is
/// `STDERR_WRITE`, which none of our operations expects.
fn process_stderr(
    r: &mut dyn Read,
    w: &mut dyn Write,
    version: WorkerVersion,
    during: &'static str,
    sink: &mut dyn FnMut(Event),
    mut source: Option<&mut dyn Read>,
) -> Result<(), WorkerError> {
    let e = wire_err(during);
    loop {
        match wire::read_u64(r, "stderr message").map_err(&e)? {
            STDERR_LAST => return Ok(()),
            STDERR_NEXT => sink(Event::Next(read_text(r, "log line", during)?)),
            STDERR_START_ACTIVITY => {
                let id = wire::read_u64(r, "activity id").map_err(&e)?;
                let level = wire::read_u64(r, "activity level").map_err(&e)?;
                let activity_type = wire::read_u64(r, "activity type").map_err(&e)?;
                let text = read_text(r, "activity text", during)?;
                let fields = read_fields(r, during)?;
                let parent = wire::read_u64(r, "parent activity").map_err(&e)?;
                sink(Event::StartActivity { id, level, activity_type, text, fields, parent });
            }
            STDERR_STOP_ACTIVITY => sink(Event::StopActivity(wire::read_u64(r, "activity id").map_err(&e)?)),
            STDERR_RESULT => {
                let id = wire::read_u64(r, "activity id").map_err(&e)?;
                let result_type = wire::read_u64(r, "result type").map_err(&e)?;
                let fields = read_fields(r, during)?;
                sink(Event::Result { id, result_type, fields });
            }
            STDERR_ERROR if version >= WorkerVersion(1, 26) => return Err(read_error(r, during)?),
            STDERR_ERROR => {
                let message = read_text(r, "error message", during)?;
                let status = wire::read_u64(r, "error status").map_err(&e)?;
                return Err(WorkerError::Remote { during, message, status: Some(status), level: None, traces: Vec::new() });
            }
            STDERR_READ => {
                let Some(src) = source.as_deref_mut() else { return Err(protocol(during, "the daemon asked for data where none is sent")) };
                let len = wire::read_u64(r, "read request").map_err(&e)?;
                if len == 0 || len > MAX_READ_REQUEST {
                    return Err(protocol(during, format!("the daemon asked for {len} bytes at once")));
                }
                let mut buf = vec![0u8; len as usize];
                let n = read_some(src, &mut buf).map_err(io_err(during))?;
                if n == 0 {
                    return Err(protocol(during, "the daemon asked for more data than the NAR has"));
                }
                wire::write_bytes(w, &buf[..n]).map_err(io_err(during))?;
                w.flush().map_err(io_err(during))?;
            }
            STDERR_WRITE => return Err(protocol(during, "the daemon sent data where none is expected")),
            t => return Err(protocol(during, format!("unknown stderr message {t:#x}"))),
        }
    }
}

fn read_some(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            res => return res,
        }
    }
}

/// Writes the data of an upload as frames (u64 length, bytes; a zero
/// length ends the stream), the form daemons of 1.23 and later read.
struct FramedWriter<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    buf: Vec<u8>,
}

impl<W: Write + ?Sized> FramedWriter<'_, W> {
    fn emit(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            wire::write_u64(self.inner, self.buf.len() as u64)?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
    fn finish(mut self) -> io::Result<()> {
        self.emit()?;
        wire::write_u64(self.inner, 0)?;
        self.inner.flush()
    }
}

impl<W: Write + ?Sized> Write for FramedWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME {
            self.emit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

/// How the writing half of a framed upload failed.
enum Upload {
    /// Writing to the daemon.
    Pipe(io::Error),
    /// Producing the data (reading the local NAR, a size that does not match).
    Source(io::Error),
}

/// Counts the bytes written through it.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Copies exactly `len` bytes of `r` to `w`.
fn copy_exactly(r: &mut dyn Read, w: &mut dyn Write, len: u64, path: &str) -> io::Result<()> {
    let n = io::copy(&mut r.take(len), w)?;
    if n != len {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the NAR of '{path}' has {n} bytes, its info says {len}")));
    }
    Ok(())
}

/// `ValidPathInfo` after the path, as `AddToStoreNar` and
/// `AddMultipleToStore` (which always uses the 1.16 form) carry it.
fn write_unkeyed_info(w: &mut dyn Write, info: &PathInfo) -> io::Result<()> {
    let hash = Sha256Hash::parse(&info.nar_hash).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("'{}': {e}", info.path)))?;
    wire::write_bytes(w, info.deriver.as_bytes())?;
    wire::write_bytes(w, hash.to_hex().as_bytes())?;
    wire::write_strings(w, &info.references)?;
    wire::write_u64(w, 0)?; // registration time: now
    wire::write_u64(w, info.nar_size)?;
    wire::write_u64(w, 0)?; // ultimate
    wire::write_strings(w, &info.sigs)?;
    wire::write_bytes(w, info.ca.as_bytes())
}

/// Bytes of a NAR `nar_from_path` looks at before handing it over.
const NAR_HEAD: usize = 32;

/// Reads the first bytes of a `NarFromPath` reply back in before the rest.
pub struct NarReader<'a, R> {
    head: [u8; NAR_HEAD],
    len: usize,
    pos: usize,
    inner: &'a mut BufReader<R>,
}

impl<R: Read> Read for NarReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.len {
            let n = buf.len().min(self.len - self.pos);
            buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

/// An open daemon session.
pub struct WorkerConn<R: Read, W: Write> {
    r: BufReader<R>,
    w: BufWriter<W>,
    /// The negotiated version: `min(ours, the daemon's)`.
    pub version: WorkerVersion,
    /// What the daemon announced.
    pub daemon_version: WorkerVersion,
    /// The daemon's Nix version (1.33 and later), e.g. "2.8.0".
    pub daemon_nix_version: Option<String>,
    /// Whether the daemon trusts us; `None` before 1.35 or when it does not say.
    pub trust: Option<Trust>,
    /// Features the daemon offered (1.38 and later); none is in use, as we offer none.
    pub daemon_features: Vec<String>,
}

impl<R: Read, W: Write> WorkerConn<R, W> {
    /// Greets the daemon, negotiates the version, and reads the startup
    /// messages (which may be an error, e.g. a refused user).
    pub fn handshake(r: R, w: W, mut sink: impl FnMut(Event)) -> Result<Self, WorkerError> {
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let d = "the handshake";
        let e = wire_err(d);
        wire::write_u64(&mut w, WORKER_MAGIC_1).map_err(io_err(d))?;
        wire::write_u64(&mut w, CLIENT_VERSION.to_wire()).map_err(io_err(d))?;
        w.flush().map_err(io_err(d))?;
        let magic = wire::read_u64(&mut r, "daemon magic").map_err(&e)?;
        if magic != WORKER_MAGIC_2 {
            return Err(protocol(d, format!("expected the magic {WORKER_MAGIC_2:#x}, got {magic:#x} (is something printing text on login, like a MOTD in .bashrc?)")));
        }
        let daemon_version = WorkerVersion::from_wire(wire::read_u64(&mut r, "daemon version").map_err(&e)?);
        if daemon_version.0 != 1 || daemon_version < MIN_VERSION {
            return Err(WorkerError::Version { got: daemon_version });
        }
        let version = daemon_version.min(CLIENT_VERSION);
        let mut daemon_features = Vec::new();
        if version >= WorkerVersion(1, 38) {
            wire::write_strings::<_, String>(&mut w, &[]).map_err(io_err(d))?;
            w.flush().map_err(io_err(d))?;
            daemon_features = read_list(&mut r, MAX_FEATURES, 256, "features", d)?;
        }
        if version >= WorkerVersion(1, 14) {
            wire::write_u64(&mut w, 0).map_err(io_err(d))?; // no CPU affinity (obsolete)
        }
        if version >= WorkerVersion(1, 11) {
            wire::write_u64(&mut w, 0).map_err(io_err(d))?; // reserveSpace (obsolete)
        }
        w.flush().map_err(io_err(d))?;
        let daemon_nix_version = if version >= WorkerVersion(1, 33) { Some(wire::read_string(&mut r, 1024, "daemon Nix version").map_err(&e)?) } else { None };
        let trust = if version >= WorkerVersion(1, 35) {
            match read_small(&mut r, "trust status", 2, d)? {
                1 => Some(Trust::Trusted),
                2 => Some(Trust::NotTrusted),
                _ => None,
            }
        } else {
            None
        };
        let mut c = WorkerConn { r, w, version, daemon_version, daemon_nix_version, trust, daemon_features };
        c.stderr(d, &mut sink, None)?;
        Ok(c)
    }

    /// The buffered reader (the raw stream, for tests and diagnostics).
    pub fn reader(&mut self) -> &mut BufReader<R> {
        &mut self.r
    }

    fn stderr(&mut self, during: &'static str, sink: &mut dyn FnMut(Event), source: Option<&mut dyn Read>) -> Result<(), WorkerError> {
        self.w.flush().map_err(io_err(during))?;
        process_stderr(&mut self.r, &mut self.w, self.version, during, sink, source)
    }

    fn send(&mut self, during: &'static str, f: impl FnOnce(&mut BufWriter<W>) -> io::Result<()>) -> Result<(), WorkerError> {
        f(&mut self.w).map_err(io_err(during))
    }

    /// `SetOptions` (19).
    pub fn set_options(&mut self, o: &ClientOptions, mut sink: impl FnMut(Event)) -> Result<(), WorkerError> {
        let d = "SetOptions";
        let version = self.version;
        self.send(d, |w| {
            wire::write_u64(w, op::SET_OPTIONS)?;
            for v in [o.keep_failed as u64, o.keep_going as u64, o.try_fallback as u64, o.verbosity, o.max_build_jobs, o.max_silent_time] {
                wire::write_u64(w, v)?;
            }
            wire::write_u64(w, 1)?; // useBuildHook (obsolete)
            wire::write_u64(w, if o.verbose_build { nixlog::Level::Error as u64 } else { 7 })?; // lvlError / lvlVomit
            wire::write_u64(w, 0)?; // logType (obsolete)
            wire::write_u64(w, 0)?; // printBuildTrace (obsolete)
            wire::write_u64(w, o.build_cores)?;
            wire::write_u64(w, o.use_substitutes as u64)?;
            if version >= WorkerVersion(1, 12) {
                wire::write_u64(w, o.overrides.len() as u64)?;
                for (k, v) in &o.overrides {
                    wire::write_bytes(w, k.as_bytes())?;
                    wire::write_bytes(w, v.as_bytes())?;
                }
            }
            Ok(())
        })?;
        self.stderr(d, &mut sink, None)
    }

    /// `QueryValidPaths` (31): which of `paths` are valid (substituting
    /// first when `substitute` and the daemon is 1.27 or later).
    pub fn query_valid_paths(&mut self, paths: &[String], substitute: bool, mut sink: impl FnMut(Event)) -> Result<Vec<String>, WorkerError> {
        let d = "QueryValidPaths";
        let version = self.version;
        self.send(d, |w| {
            wire::write_u64(w, op::QUERY_VALID_PATHS)?;
            wire::write_strings(w, paths)?;
            if version >= WorkerVersion(1, 27) {
                wire::write_u64(w, substitute as u64)?;
            }
            Ok(())
        })?;
        self.stderr(d, &mut sink, None)?;
        let n = wire::read_u64(&mut self.r, "valid paths").map_err(wire_err(d))?;
        if n > paths.len() as u64 {
            return Err(protocol(d, format!("{n} valid paths for {} asked", paths.len())));
        }
        let mut asked: HashSet<&str> = paths.iter().map(String::as_str).collect();
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let p = wire::read_string(&mut self.r, MAX_PATH, "valid path").map_err(wire_err(d))?;
            if !asked.remove(p.as_str()) {
                return Err(protocol(d, format!("'{}' was not asked for, or came twice", p.escape_debug())));
            }
            out.push(p);
        }
        Ok(out)
    }

    /// `QueryPathInfo` (26): the metadata of `path`, `None` when it is not
    /// valid. The NAR hash is returned as `sha256:<nix32>`, like the serve
    /// protocol's; check the rest with [`crate::path_info::check`].
    pub fn query_path_info(&mut self, path: &str, mut sink: impl FnMut(Event)) -> Result<Option<PathInfo>, WorkerError> {
        let d = "QueryPathInfo";
        self.send(d, |w| {
            wire::write_u64(w, op::QUERY_PATH_INFO)?;
            wire::write_bytes(w, path.as_bytes())
        })?;
        match self.stderr(d, &mut sink, None) {
            // Daemons older than 1.17 report a missing path as an error.
            Err(WorkerError::Remote { message, .. }) if self.version < WorkerVersion(1, 17) && message.contains("is not valid") => return Ok(None),
            res => res?,
        }
        let version = self.version;
        let mut b = Bounded::new(&mut self.r, PATH_INFO_BUDGET);
        let res = read_path_info(&mut b, path, version, d);
        if res.is_err() && b.exhausted() {
            return Err(protocol(d, format!("the reply is larger than {PATH_INFO_BUDGET} bytes")));
        }
        res
    }

    /// `NarFromPath` (38): the NAR of `path` follows on the returned reader,
    /// which the caller walks with [`crate::nar::skip`] or
    /// [`crate::nar::restore`] (hashing it on the way) before the next request.
    pub fn nar_from_path(&mut self, path: &str, mut sink: impl FnMut(Event)) -> Result<NarReader<'_, R>, WorkerError> {
        let d = "NarFromPath";
        self.send(d, |w| {
            wire::write_u64(w, op::NAR_FROM_PATH)?;
            wire::write_bytes(w, path.as_bytes())
        })?;
        self.stderr(d, &mut sink, None)?;
        // Daemons fail after their `STDERR_LAST` when the path is not valid:
        // an error then stands where the NAR should, at its start (newer
        // daemons check validity first) or after its magic (2.8 writes the
        // magic before it looks at the file). A NAR's first words are the
        // length 13 of "nix-archive-1" and, after it, the length 1 of "(",
        // never `STDERR_ERROR`, so peeking at both tells them apart.
        let mut head = [0u8; NAR_HEAD];
        self.r.read_exact(&mut head[..8]).map_err(io_err(d))?;
        let mut len = 8;
        if head[..8] == 13u64.to_le_bytes() {
            // "nix-archive-1" padded to 16 bytes, and the next word
            self.r.read_exact(&mut head[8..NAR_HEAD]).map_err(io_err(d))?;
            len = NAR_HEAD;
        }
        let mut last = [0u8; 8];
        last.copy_from_slice(&head[len - 8..len]);
        if u64::from_le_bytes(last) == STDERR_ERROR {
            return Err(self.read_error_body(d)?);
        }
        Ok(NarReader { head, len, pos: 0, inner: &mut self.r })
    }

    /// The error after an `STDERR_ERROR` tag, in the daemon's format.
    fn read_error_body(&mut self, d: &'static str) -> Result<WorkerError, WorkerError> {
        if self.version >= WorkerVersion(1, 26) {
            return read_error(&mut self.r, d);
        }
        let message = read_text(&mut self.r, "error message", d)?;
        let status = wire::read_u64(&mut self.r, "error status").map_err(wire_err(d))?;
        Ok(WorkerError::Remote { during: d, message, status: Some(status), level: None, traces: Vec::new() })
    }

    /// `BuildDerivation` (36): builds `drv` on the builder; the log arrives
    /// through `sink`. `inputs` is as for [`Derivation::write_basic`].
    pub fn build_derivation(&mut self, drv_path: &str, drv: &Derivation, inputs: &[String], mode: BuildMode, mut sink: impl FnMut(Event)) -> Result<BuildOutcome, WorkerError> {
        let d = "BuildDerivation";
        self.send(d, |w| {
            wire::write_u64(w, op::BUILD_DERIVATION)?;
            wire::write_bytes(w, drv_path.as_bytes())?;
            drv.write_basic(w, inputs)?;
            wire::write_u64(w, mode as u64)
        })?;
        self.stderr(d, &mut sink, None)?;
        read_build_result(&mut self.r, self.version, d)
    }

    /// Builds the derivation `drv_path` (valid on the builder, with its
    /// inputs) by path: `BuildPathsWithResults` (46, daemons of 1.34 and
    /// later), else `BuildPaths` (9), whose reply says only that it built.
    /// What a daemon that does not trust us allows for input-addressed
    /// derivations, which it refuses to take as a `BuildDerivation`.
    pub fn build_paths(&mut self, drv_path: &str, outputs: &[String], mode: BuildMode, mut sink: impl FnMut(Event)) -> Result<BuildOutcome, WorkerError> {
        let with_results = self.version >= WorkerVersion(1, 34);
        let d = if with_results { "BuildPathsWithResults" } else { "BuildPaths" };
        let version = self.version;
        let path = format!("{drv_path}!{}", outputs.join(","));
        self.send(d, |w| {
            wire::write_u64(w, if with_results { op::BUILD_PATHS_WITH_RESULTS } else { op::BUILD_PATHS })?;
            wire::write_strings(w, std::slice::from_ref(&path))?;
            if version >= WorkerVersion(1, 15) {
                wire::write_u64(w, mode as u64)?;
            }
            Ok(())
        })?;
        self.stderr(d, &mut sink, None)?;
        if !with_results {
            wire::read_u64(&mut self.r, "result").map_err(wire_err(d))?;
            let result = BuildResult { status: BuildStatus::Built, error_msg: String::new(), times_built: 1, start_time: 0, stop_time: 0, built_outputs: Vec::new() };
            return Ok(BuildOutcome { result, is_non_deterministic: false, cpu_user_us: None, cpu_system_us: None, built_outputs: BTreeMap::new() });
        }
        let n = wire::read_u64(&mut self.r, "results").map_err(wire_err(d))?;
        if n != 1 {
            return Err(protocol(d, format!("{n} results for one path")));
        }
        let _key = wire::read_string(&mut self.r, MAX_PATH * 2, "derived path").map_err(wire_err(d))?;
        read_build_result(&mut self.r, self.version, d)
    }

    /// `QueryRealisation` (43) of an output id `sha256:<hex>!<output>`
    /// (content-addressed derivations); `None` when the builder knows none,
    /// or is older than 1.27.
    pub fn query_realisation(&mut self, id: &str, mut sink: impl FnMut(Event)) -> Result<Option<Realisation>, WorkerError> {
        let d = "QueryRealisation";
        if self.version < WorkerVersion(1, 27) {
            return Ok(None);
        }
        self.send(d, |w| {
            wire::write_u64(w, op::QUERY_REALISATION)?;
            wire::write_bytes(w, id.as_bytes())
        })?;
        self.stderr(d, &mut sink, None)?;
        let (limit, json) = if self.version >= WorkerVersion(1, 31) { (MAX_MSG, true) } else { (MAX_PATH, false) };
        let mut got = read_list(&mut self.r, 1, limit, "realisations", d)?;
        Ok(got.pop().map(|s| if json { Realisation::Json(s) } else { Realisation::OutPath(s) }))
    }

    /// `RegisterDrvOutput` (42): records that output `id` is `out_path`;
    /// `realisation_json` is what 1.31 and later daemons take instead.
    pub fn register_drv_output(&mut self, id: &str, out_path: &str, realisation_json: &str, mut sink: impl FnMut(Event)) -> Result<(), WorkerError> {
        let d = "RegisterDrvOutput";
        let version = self.version;
        self.send(d, |w| {
            wire::write_u64(w, op::REGISTER_DRV_OUTPUT)?;
            if version >= WorkerVersion(1, 31) {
                wire::write_bytes(w, realisation_json.as_bytes())
            } else {
                wire::write_bytes(w, id.as_bytes())?;
                wire::write_bytes(w, out_path.as_bytes())
            }
        })?;
        self.stderr(d, &mut sink, None)
    }
}

impl<R: Read, W: Write + Send> WorkerConn<R, W> {
    /// Sends a framed upload from a second thread while this one reads the
    /// daemon's messages, so that neither side can block the other.
    fn framed(&mut self, during: &'static str, body: &mut (dyn FnMut(&mut dyn Write) -> io::Result<()> + Send), sink: &mut dyn FnMut(Event)) -> Result<(), WorkerError> {
        self.w.flush().map_err(io_err(during))?;
        let (r, w, version) = (&mut self.r, &mut self.w, self.version);
        std::thread::scope(|s| {
            let writer = s.spawn(move || {
                let mut fw = FramedWriter { inner: w, buf: Vec::with_capacity(FRAME) };
                match body(&mut fw) {
                    Ok(()) => fw.finish().map_err(Upload::Pipe),
                    Err(e) if closed_kind(&e) => Err(Upload::Pipe(e)),
                    Err(e) => {
                        // Our side failed (the local NAR): end the stream all the
                        // same, so that the daemon answers instead of waiting.
                        let _ = fw.finish();
                        Err(Upload::Source(e))
                    }
                }
            });
            // STDERR_READ is not used with framed uploads, so nothing is written here.
            let read = process_stderr(r, &mut io::sink(), version, during, sink, None);
            let wrote = writer.join().unwrap_or_else(|_| Err(Upload::Source(io::Error::other("the upload thread panicked"))));
            match (read, wrote) {
                // A local failure is the cause of whatever the daemon said about the cut stream.
                (_, Err(Upload::Source(source))) => Err(WorkerError::Io { during, source }),
                // Otherwise the daemon's own words first: it may have stopped reading.
                (Err(e @ WorkerError::Remote { .. }), _) => Err(e),
                (_, Err(Upload::Pipe(e))) => Err(io_err(during)(e)),
                (res, Ok(())) => res,
            }
        })
    }

    /// `AddToStoreNar` (39): uploads one path; exactly `info.nar_size` NAR
    /// bytes are read from `nar`. A daemon that does not trust us refuses
    /// unsigned input-addressed paths (see [`WorkerError::untrusted_hint`]).
    pub fn add_to_store_nar(&mut self, info: &PathInfo, nar: &mut (dyn Read + Send), repair: bool, dont_check_sigs: bool, mut sink: impl FnMut(Event)) -> Result<(), WorkerError> {
        let d = "AddToStoreNar";
        self.send(d, |w| {
            wire::write_u64(w, op::ADD_TO_STORE_NAR)?;
            wire::write_bytes(w, info.path.as_bytes())?;
            write_unkeyed_info(w, info)?;
            wire::write_u64(w, repair as u64)?;
            wire::write_u64(w, dont_check_sigs as u64)
        })?;
        let (path, size) = (info.path.as_str(), info.nar_size);
        if self.version >= WorkerVersion(1, 23) {
            self.framed(d, &mut |w| copy_exactly(nar, w, size, path), &mut sink)
        } else if self.version >= WorkerVersion(1, 21) {
            // The daemon pulls the NAR with STDERR_READ.
            let mut limited = nar.take(size);
            self.stderr(d, &mut sink, Some(&mut limited))
        } else {
            copy_exactly(nar, &mut self.w, size, path).map_err(io_err(d))?;
            self.stderr(d, &mut sink, None)
        }
    }

    /// `AddMultipleToStore` (44, daemons of 1.32 and later): uploads many
    /// paths in one stream, in the order given (references first).
    /// `nar_of(i, w)` writes the NAR of `infos[i]`, exactly
    /// `infos[i].nar_size` bytes.
    pub fn add_multiple_to_store(
        &mut self,
        infos: &[PathInfo],
        nar_of: &mut (dyn FnMut(usize, &mut dyn Write) -> io::Result<()> + Send),
        repair: bool,
        dont_check_sigs: bool,
        mut sink: impl FnMut(Event),
    ) -> Result<(), WorkerError> {
        let d = "AddMultipleToStore";
        if self.version < WorkerVersion(1, 32) {
            return Err(protocol(d, format!("the daemon speaks {}, AddMultipleToStore needs 1.32", self.version)));
        }
        self.send(d, |w| {
            wire::write_u64(w, op::ADD_MULTIPLE_TO_STORE)?;
            wire::write_u64(w, repair as u64)?;
            wire::write_u64(w, dont_check_sigs as u64)
        })?;
        self.framed(
            d,
            &mut |w| {
                wire::write_u64(w, infos.len() as u64)?;
                for (i, info) in infos.iter().enumerate() {
                    wire::write_bytes(w, info.path.as_bytes())?;
                    write_unkeyed_info(w, info)?;
                    let mut c = Counting { inner: w, n: 0 };
                    nar_of(i, &mut c)?;
                    if c.n != info.nar_size {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the NAR of '{}' has {} bytes, its info says {}", info.path, c.n, info.nar_size)));
                    }
                }
                Ok(())
            },
            &mut sink,
        )
    }
}

fn read_path_info(r: &mut dyn Read, path: &str, version: WorkerVersion, d: &'static str) -> Result<Option<PathInfo>, WorkerError> {
    let e = wire_err(d);
    if version >= WorkerVersion(1, 17) {
        match wire::read_u64(r, "valid").map_err(&e)? {
            0 => return Ok(None),
            1 => {}
            v => return Err(protocol(d, format!("validity flag {v}"))),
        }
    }
    let deriver = wire::read_string(r, MAX_PATH, "deriver").map_err(&e)?;
    let hash = wire::read_string(r, 256, "narHash").map_err(&e)?;
    let nar_hash = Sha256Hash::parse(&hash).map_err(|_| protocol(d, format!("NAR hash '{}' is not a SHA-256 hash", hash.escape_debug())))?.to_nix32_prefixed();
    let references = read_list(r, 1 << 20, MAX_PATH, "references", d)?;
    let _registration_time = wire::read_u64(r, "registrationTime").map_err(&e)?;
    let nar_size = wire::read_u64(r, "narSize").map_err(&e)?;
    let (mut sigs, mut ca) = (Vec::new(), String::new());
    if version >= WorkerVersion(1, 16) {
        let _ultimate = wire::read_u64(r, "ultimate").map_err(&e)?;
        sigs = read_list(r, MAX_SIGS, 1024, "sigs", d)?;
        ca = wire::read_string(r, 1024, "ca").map_err(&e)?;
    }
    Ok(Some(PathInfo { path: path.to_string(), deriver, references, nar_size, nar_hash, ca, sigs }))
}

fn read_build_result(r: &mut dyn Read, version: WorkerVersion, d: &'static str) -> Result<BuildOutcome, WorkerError> {
    let e = wire_err(d);
    let status = BuildStatus::from_wire(wire::read_u64(r, "status").map_err(&e)?);
    let error_msg = read_text(r, "errorMsg", d)?;
    let mut res = BuildResult { status, error_msg, times_built: 0, start_time: 0, stop_time: 0, built_outputs: Vec::new() };
    let mut out = BuildOutcome { result: res.clone(), is_non_deterministic: false, cpu_user_us: None, cpu_system_us: None, built_outputs: BTreeMap::new() };
    if version >= WorkerVersion(1, 29) {
        res.times_built = wire::read_u64(r, "timesBuilt").map_err(&e)?;
        out.is_non_deterministic = wire::read_bool(r, "isNonDeterministic").map_err(&e)?;
        res.start_time = wire::read_u64(r, "startTime").map_err(&e)?;
        res.stop_time = wire::read_u64(r, "stopTime").map_err(&e)?;
    }
    if version >= WorkerVersion(1, 37) {
        for slot in [&mut out.cpu_user_us, &mut out.cpu_system_us] {
            if read_small(r, "optional tag", 1, d)? == 1 {
                *slot = Some(wire::read_u64(r, "cpu time").map_err(&e)? as i64);
            }
        }
    }
    if version >= WorkerVersion(1, 28) {
        let n = wire::read_u64(r, "builtOutputs").map_err(&e)?;
        if n > MAX_BUILT_OUTPUTS {
            return Err(protocol(d, format!("{n} built outputs")));
        }
        for _ in 0..n {
            let id = wire::read_string(r, MAX_PATH, "output id").map_err(&e)?;
            let json = wire::read_string(r, MAX_MSG, "realisation").map_err(&e)?;
            out.built_outputs.insert(id, json);
        }
    }
    out.result = res;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook_protocol::BuildOptions;
    use std::sync::{Arc, Mutex};

    const SD: &str = "/tmp/bh-worker-golden/store";

    fn golden(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn sp(base: &str) -> String {
        format!("{SD}/{base}")
    }

    /// A writer whose bytes the test can still see after the connection took it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A content-addressed (`fixed:r:sha256`) path info for a NAR.
    fn ca_info(path: String, nar: &[u8], references: Vec<String>, ca: bool) -> PathInfo {
        let mut hr = crate::hash::HashingReader::new(nar);
        io::copy(&mut hr, &mut io::sink()).unwrap();
        let (h, n, _) = hr.finish();
        let ca = if ca { format!("fixed:r:{}", h.to_nix32_prefixed()) } else { String::new() };
        PathInfo { path, deriver: String::new(), references, nar_size: n, nar_hash: h.to_nix32_prefixed(), ca, sigs: vec![] }
    }

    fn drv(name: &str) -> (String, Derivation) {
        let text = golden(&format!("{name}.drv"));
        let path = sp(match name {
            "worker-ok" => "rxk5pnn98ky5ljm6jjvihw57gk80gbqh-worker-ok.drv",
            _ => "my0zn2ji0x73g1ii4kgwarggy9b4ms83-worker-fail.drv",
        });
        let d = Derivation::parse(&path, &text).unwrap();
        (path, d)
    }

    /// What the client saw of the trusted session recorded by
    /// tests/golden/record-worker.sh.
    #[derive(Debug, Default)]
    struct Seen {
        events: Vec<Event>,
        valid_before: Vec<String>,
        valid_after: Vec<String>,
        info: Option<PathInfo>,
        missing_info: Option<PathInfo>,
        bad_upload: Option<String>,
        nar: Vec<u8>,
        built: Option<BuildOutcome>,
        failed: Option<BuildOutcome>,
        realisation: Option<Realisation>,
        missing_nar: Option<String>,
    }

    /// Replays the trusted session against `s2c`, writing requests into `c2s`.
    fn replay(s2c: &[u8], c2s: Shared) -> Result<(WorkerVersion, Option<String>, Seen), WorkerError> {
        let hello_nar = golden("hello-file.nar");
        let dir_nar = golden("dir.nar");
        let hello = ca_info(sp("46ax0m47x1x216zrhzjcsc59k7ygscmn-hello"), &hello_nar, vec![], true);
        let dir = ca_info(sp("wkhlvv9gz1j0889x719azhdbzi2mwkbb-dir"), &dir_nar, vec![], true);
        let ia = ca_info(sp("11111111111111111111111111111111-ia"), &hello_nar, vec![hello.path.clone()], false);
        let bad = PathInfo { path: sp("22222222222222222222222222222222-bad"), ca: String::new(), nar_hash: "0".repeat(64), ..hello.clone() };
        let missing = sp("33333333333333333333333333333333-missing");
        let mut seen = Seen::default();
        let mut events = Vec::new();
        let mut ev = |e: Event| events.push(e);
        let mut c = WorkerConn::handshake(s2c, c2s, &mut ev)?;
        c.set_options(&ClientOptions::for_build(&BuildOptions::default(), 3, false), &mut ev)?;
        let asked = [missing.clone(), hello.path.clone()];
        seen.valid_before = c.query_valid_paths(&asked, false, &mut ev)?;
        c.add_to_store_nar(&hello, &mut &hello_nar[..], false, true, &mut ev)?;
        seen.valid_after = c.query_valid_paths(&asked, false, &mut ev)?;
        seen.info = c.query_path_info(&hello.path, &mut ev)?;
        seen.missing_info = c.query_path_info(&missing, &mut ev)?;
        match c.add_to_store_nar(&bad, &mut &hello_nar[..], false, true, &mut ev) {
            Err(e @ WorkerError::Remote { .. }) => seen.bad_upload = Some(e.to_string()),
            other => return Err(protocol("test", format!("bad upload: {other:?}"))),
        }
        let nars = [dir_nar.clone(), hello_nar.clone()];
        c.add_multiple_to_store(&[dir, ia], &mut |i, w| w.write_all(&nars[i]), false, true, &mut ev)?;
        let mut r = c.nar_from_path(&hello.path, &mut ev)?;
        let mut hr = crate::hash::HashingReader::new(&mut r);
        crate::nar::skip(&mut hr).map_err(|e| protocol("test", e.to_string()))?;
        let (_, n, _) = hr.finish();
        seen.nar = hello_nar[..n as usize].to_vec();
        for (name, slot) in [("worker-ok", &mut seen.built), ("worker-fail", &mut seen.failed)] {
            let (p, d) = drv(name);
            *slot = Some(c.build_derivation(&p, &d, &[], BuildMode::Normal, &mut ev)?);
        }
        seen.realisation = c.query_realisation(&format!("sha256:{}!out", "0".repeat(64)), &mut ev)?;
        match c.nar_from_path(&missing, &mut ev) {
            Err(e @ WorkerError::Remote { .. }) => seen.missing_nar = Some(e.to_string()),
            Err(e) => return Err(e),
            Ok(_) => return Err(protocol("test", "a NAR of a missing path")),
        }
        let (v, nv) = (c.version, c.daemon_nix_version.clone());
        drop(c);
        seen.events = events;
        Ok((v, nv, seen))
    }

    #[test]
    fn decodes_the_trusted_session_captured_from_nix_2_8_and_sends_the_same_bytes() {
        let s2c = golden("worker-2.8-trusted-s2c.bin");
        let c2s = Shared::default();
        let (v, nv, seen) = replay(&s2c, c2s.clone()).unwrap();
        assert_eq!((v, nv.as_deref()), (WorkerVersion(1, 34), Some("2.8.0")));
        assert_eq!(seen.valid_before, Vec::<String>::new());
        assert_eq!(seen.valid_after, vec![sp("46ax0m47x1x216zrhzjcsc59k7ygscmn-hello")]);
        let info = seen.info.unwrap();
        assert_eq!((info.nar_size, info.nar_hash.as_str()), (120, "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"));
        assert_eq!(info.ca, "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw");
        crate::path_info::check(SD, &info).unwrap();
        assert_eq!(seen.missing_info, None);
        let bad = seen.bad_upload.unwrap();
        assert!(bad.contains("hash mismatch importing path") && bad.contains("22222222222222222222222222222222-bad"), "{bad}");
        assert_eq!(seen.nar, golden("hello-file.nar"));
        let built = seen.built.unwrap();
        assert_eq!((built.result.status, built.result.times_built), (BuildStatus::Built, 1), "{built:?}");
        assert!(built.result.stop_time >= built.result.start_time && built.result.start_time > 1_600_000_000);
        let failed = seen.failed.unwrap();
        assert_eq!(failed.result.status, BuildStatus::PermanentFailure);
        assert!(failed.result.error_msg.contains("failed with exit code 1"), "{}", failed.result.error_msg);
        assert_eq!(seen.realisation, None);
        assert!(seen.missing_nar.unwrap().contains("No such file or directory"));
        // the build's log came as a BuildLogLine (101) result
        let log_line = seen.events.iter().any(|e| matches!(e, Event::Result { result_type: 101, fields, .. } if fields == &[Field::String("building worker-ok".into())]));
        assert!(log_line, "{:#?}", seen.events);
        let start = seen.events.iter().find(|e| matches!(e, Event::StartActivity { activity_type: 105, .. })).unwrap();
        assert!(start.nix_log_line().contains("\"action\":\"start\"") && start.nix_log_line().contains("worker-ok.drv"));
        // our requests are byte for byte what the independent recorder sent and the daemon accepted
        let sent = c2s.0.lock().unwrap().clone();
        let want = golden("worker-2.8-trusted-c2s.bin");
        let first_diff = sent.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!((first_diff, sent.len()), (None, want.len()));
    }

    #[test]
    fn the_untrusted_session_reports_the_daemons_words_with_a_hint() {
        let s2c = golden("worker-2.8-untrusted-s2c.bin");
        let hello_nar = golden("hello-file.nar");
        let ia = ca_info(sp("11111111111111111111111111111111-ia"), &hello_nar, vec![sp("46ax0m47x1x216zrhzjcsc59k7ygscmn-hello")], false);
        let mut c = WorkerConn::handshake(&s2c[..], io::sink(), |_| {}).unwrap();
        assert_eq!(c.trust, None, "2.8 speaks 1.34, before the trust status");
        let e = c.add_to_store_nar(&ia, &mut &hello_nar[..], false, true, |_| {}).unwrap_err();
        let WorkerError::Remote { message, level, .. } = &e else { panic!("{e:?}") };
        assert!(message.contains("cannot add path") && message.ends_with("because it lacks a valid signature"), "{message}");
        assert_eq!(*level, Some(0));
        assert!(e.untrusted_hint().unwrap().contains("trusted-users"));
        let (p, d) = drv("worker-ok");
        let e = c.build_derivation(&p, &d, &[], BuildMode::Normal, |_| {}).unwrap_err();
        assert!(e.to_string().contains("you are not privileged to build input-addressed derivations"), "{e}");
        assert!(e.untrusted_hint().unwrap().contains("trusted-users"));
        let info = c.query_path_info(&sp("46ax0m47x1x216zrhzjcsc59k7ygscmn-hello"), |_| {}).unwrap().unwrap();
        assert_eq!(info.nar_size, 120);
    }

    #[test]
    fn truncated_or_mutated_replies_are_errors_not_panics() {
        let s2c = golden("worker-2.8-trusted-s2c.bin");
        // 2.8 sends the last error twice (before it hangs up); the client reads the first
        let tag = STDERR_ERROR.to_le_bytes();
        let second = s2c.windows(8).rposition(|w| w == tag).unwrap();
        for cut in (0..second).step_by(7) {
            assert!(replay(&s2c[..cut], Shared::default()).is_err(), "cut at {cut} accepted");
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in 0..1500 {
            let mut m = s2c.clone();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state as usize) % m.len();
            m[at] = match i % 3 {
                0 => m[at] ^ (1 << (state >> 61)),
                1 => 0xff,
                _ => 0,
            };
            let _ = replay(&m, Shared::default());
        }
        let u = golden("worker-2.8-untrusted-s2c.bin");
        for cut in 0..u.len() {
            let mut c = match WorkerConn::handshake(&u[..cut], io::sink(), |_| {}) {
                Ok(c) => c,
                Err(_) => continue,
            };
            let _ = c.query_path_info("/x", |_| {});
        }
    }

    fn hello_reply(minor: u8) -> Vec<u8> {
        let mut v = Vec::new();
        wire::write_u64(&mut v, WORKER_MAGIC_2).unwrap();
        wire::write_u64(&mut v, WorkerVersion(1, minor).to_wire()).unwrap();
        v
    }

    #[test]
    fn handshake_per_version() {
        // 1.38: features, version string, trust; a newer daemon is spoken to at 1.38
        let mut s = hello_reply(39);
        wire::write_strings(&mut s, &["realisation-with-path-not-hash"]).unwrap();
        wire::write_bytes(&mut s, b"2.35.0").unwrap();
        wire::write_u64(&mut s, 2).unwrap();
        wire::write_u64(&mut s, STDERR_NEXT).unwrap();
        wire::write_bytes(&mut s, b"warning: hello\n").unwrap();
        wire::write_u64(&mut s, STDERR_LAST).unwrap();
        let sent = Shared::default();
        let mut evs = Vec::new();
        let c = WorkerConn::handshake(&s[..], sent.clone(), |e| evs.push(e)).unwrap();
        assert_eq!((c.version, c.trust, c.daemon_nix_version.as_deref()), (WorkerVersion(1, 38), Some(Trust::NotTrusted), Some("2.35.0")));
        assert_eq!(c.daemon_features, vec!["realisation-with-path-not-hash"]);
        assert_eq!(evs, vec![Event::Next("warning: hello\n".into())]);
        // magic, version, no features, cpu affinity, reserveSpace
        assert_eq!(sent.0.lock().unwrap().len(), 5 * 8);
        // 1.21 (Nix 2.3): no version string, no trust; errors in the old format
        let mut s = hello_reply(21);
        wire::write_u64(&mut s, STDERR_ERROR).unwrap();
        wire::write_bytes(&mut s, b"user 'x' is not allowed to connect").unwrap();
        wire::write_u64(&mut s, 1).unwrap();
        let e = WorkerConn::handshake(&s[..], io::sink(), |_| {}).err().unwrap();
        assert!(matches!(&e, WorkerError::Remote { status: Some(1), message, .. } if message.contains("not allowed")), "{e:?}");
        // too old, another major, a MOTD
        let e = WorkerConn::handshake(&hello_reply(17)[..], io::sink(), |_| {}).err().unwrap();
        assert!(matches!(e, WorkerError::Version { got: WorkerVersion(1, 17) }), "{e}");
        let e = WorkerConn::handshake(&b"Welcome to b1!\n\0\0\0\0\0\0\0\0\0"[..], io::sink(), |_| {}).err().unwrap();
        assert!(e.to_string().contains("MOTD"), "{e}");
        assert!(matches!(WorkerConn::handshake(&[][..], io::sink(), |_| {}).err().unwrap(), WorkerError::Closed { .. }));
    }

    #[test]
    fn unknown_tags_and_huge_counts_are_protocol_errors() {
        let base = {
            let mut s = hello_reply(34);
            wire::write_bytes(&mut s, b"2.8.0").unwrap();
            s
        };
        let cases: Vec<(Vec<u64>, &str)> = vec![
            (vec![0x1234], "unknown stderr message"),
            (vec![STDERR_WRITE], "data where none is expected"),
            (vec![STDERR_READ, 8], "asked for data"),
            (vec![STDERR_RESULT, 1, 101, u64::MAX], "fields"),
            (vec![STDERR_RESULT, 1, 101, 1, 7], "unknown log field type"),
            (vec![STDERR_NEXT, u64::MAX], "more than the limit"),
        ];
        for (words, want) in cases {
            let mut s = base.clone();
            for w in words {
                wire::write_u64(&mut s, w).unwrap();
            }
            let e = WorkerConn::handshake(&s[..], io::sink(), |_| {}).err().unwrap();
            assert!(matches!(e, WorkerError::Protocol { .. }) && e.to_string().contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn old_daemons_pull_uploads_with_stderr_read() {
        // 1.22: the daemon asks for the NAR in pieces
        let nar = golden("hello-file.nar");
        let info = ca_info(sp("46ax0m47x1x216zrhzjcsc59k7ygscmn-hello"), &nar, vec![], true);
        let mut s = hello_reply(22);
        wire::write_u64(&mut s, STDERR_LAST).unwrap();
        for _ in 0..2 {
            wire::write_u64(&mut s, STDERR_READ).unwrap();
            wire::write_u64(&mut s, 100).unwrap();
        }
        wire::write_u64(&mut s, STDERR_LAST).unwrap();
        let sent = Shared::default();
        let mut c = WorkerConn::handshake(&s[..], sent.clone(), |_| {}).unwrap();
        let before = sent.0.lock().unwrap().len();
        c.add_to_store_nar(&info, &mut &nar[..], false, false, |_| {}).unwrap();
        let out = sent.0.lock().unwrap()[before..].to_vec();
        // the two answers are the NAR's 100 and 20 bytes, as padded strings, at the end
        let tail = &out[out.len() - (8 + 104 + 8 + 24)..];
        assert_eq!(&tail[..8], &100u64.to_le_bytes());
        assert_eq!(&tail[8..108], &nar[..100]);
        assert_eq!(&tail[112..120], &20u64.to_le_bytes());
        assert_eq!(&tail[120..140], &nar[100..]);
    }

    #[test]
    fn a_short_local_nar_is_our_error_and_the_stream_still_ends() {
        let nar = golden("hello-file.nar");
        let info = ca_info(sp("46ax0m47x1x216zrhzjcsc59k7ygscmn-hello"), &nar, vec![], true);
        let mut s = hello_reply(34);
        wire::write_bytes(&mut s, b"2.8.0").unwrap();
        wire::write_u64(&mut s, STDERR_LAST).unwrap();
        // what a daemon says of a cut NAR
        wire::write_u64(&mut s, STDERR_ERROR).unwrap();
        wire::write_bytes(&mut s, b"Error").unwrap();
        wire::write_u64(&mut s, 0).unwrap();
        wire::write_bytes(&mut s, b"Error").unwrap();
        wire::write_bytes(&mut s, b"unexpected end-of-file").unwrap();
        wire::write_u64(&mut s, 0).unwrap();
        wire::write_u64(&mut s, 0).unwrap();
        let sent = Shared::default();
        let mut c = WorkerConn::handshake(&s[..], sent.clone(), |_| {}).unwrap();
        let e = c.add_to_store_nar(&info, &mut &nar[..100], false, false, |_| {}).unwrap_err();
        assert!(matches!(&e, WorkerError::Io { .. }) && crate::session::chain(&e).contains("has 100 bytes, its info says 120"), "{e:?}");
        let out = sent.0.lock().unwrap().clone();
        assert_eq!(&out[out.len() - 8..], &[0; 8], "the frames are ended");
    }

    #[test]
    fn build_results_of_1_37_carry_cpu_times() {
        let (p, d) = drv("worker-ok");
        // status 0, errorMsg "", timesBuilt 1, nondet 0, start 10, stop 20, cpuUser Some(1500), cpuSystem None, builtOutputs 1
        let mut s2 = hello_reply(37);
        wire::write_bytes(&mut s2, b"2.20.0").unwrap();
        wire::write_u64(&mut s2, 1).unwrap();
        wire::write_u64(&mut s2, STDERR_LAST).unwrap();
        wire::write_u64(&mut s2, STDERR_LAST).unwrap();
        wire::write_u64(&mut s2, 0).unwrap();
        wire::write_bytes(&mut s2, b"").unwrap();
        for v in [1u64, 0, 10, 20, 1, 1500, 0, 1] {
            wire::write_u64(&mut s2, v).unwrap();
        }
        wire::write_bytes(&mut s2, b"sha256:00!out").unwrap();
        wire::write_bytes(&mut s2, br#"{"outPath":"x-out"}"#).unwrap();
        let mut c = WorkerConn::handshake(&s2[..], io::sink(), |_| {}).unwrap();
        assert_eq!(c.trust, Some(Trust::Trusted));
        let o = c.build_derivation(&p, &d, &[], BuildMode::Normal, |_| {}).unwrap();
        assert_eq!((o.result.status, o.cpu_user_us, o.cpu_system_us, o.result.stop_time), (BuildStatus::Built, Some(1500), None, 20));
        assert_eq!(o.built_outputs.get("sha256:00!out").map(String::as_str), Some(r#"{"outPath":"x-out"}"#));
    }
}
