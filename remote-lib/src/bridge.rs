//! The `ssh-ng://` bridge: a `nix-store --serve` server on one pair of
//! pipes, backed by a `nix-daemon --stdio` client ([`crate::worker`]) on
//! another. The hook runs it as a child process in front of
//! `ssh HOST nix-daemon --stdio`, so that an `ssh-ng://` builder is driven by
//! the same job, checks, watchdog and fail-over as an `ssh://` one: the
//! session sees a serve peer, and this process's exit status carries the
//! verdict (255 when ssh lost the connection, 1 when the daemon refused,
//! with its words on stderr).
//!
//! Only the serve commands the hook sends are served: `QueryValidPaths`,
//! `QueryPathInfos`, `DumpStorePath`, `BuildDerivation` and
//! `AddToStoreNar`. Everything the client sends is bounded as the serve
//! protocol's own reader bounds it; everything the daemon sends is checked
//! by the worker client, and again by the hook when it reads our replies.

use crate::derivation::Derivation;
use crate::nar;
use crate::path_info::Bounded;
use crate::serve::{PathInfo, ServeVersion, SERVE_MAGIC_1, SERVE_MAGIC_2};
use crate::wire::{self, WireError};
use crate::worker::{BuildMode, ClientOptions, Event, WorkerConn, WorkerError};
use std::io::{self, BufReader, BufWriter, Read, Write};

/// The serve version the bridge speaks as a server.
pub const BRIDGE_VERSION: ServeVersion = ServeVersion(2, 7);

/// Bridge-only serve command: whether the daemon trusts us and what it is.
/// Reply: u64 0 (it does not say), 1 (trusted) or 2 (not trusted); the
/// daemon protocol version as text (`1.38`); its Nix version (or "").
pub const CMD_TRUST: u64 = 100;
/// Bridge-only serve command: build a derivation by its path (valid on the
/// builder), as a daemon that does not trust us allows for input-addressed
/// derivations. Request: drv path, output names, then the build options as
/// for `BuildDerivation`; reply: a `BuildResult` as for `BuildDerivation`.
pub const CMD_BUILD_PATHS: u64 = 101;
/// Bridge-only serve command: many paths in one request. Request: u64
/// count, each path's metadata as `AddToStoreNar` sends it, then each NAR
/// in the same order; reply: u64 1. One `AddMultipleToStore` for daemons of
/// 1.32 and later, else one `AddToStoreNar` each.
pub const CMD_ADD_MULTIPLE: u64 = 102;
/// Paths one `CMD_ADD_MULTIPLE` may carry.
const MAX_MULTIPLE: u64 = 1 << 20;

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The hook's side of the bridge: its stream ended or was malformed.
    #[error("the hook's serve stream: {0}")]
    Client(#[from] WireError),
    #[error("writing to the hook: {0}")]
    ClientIo(#[source] io::Error),
    #[error("serve command {0} is not served by the ssh-ng bridge")]
    Unsupported(u64),
    /// The daemon's side, in the worker client's words.
    #[error(transparent)]
    Daemon(#[from] WorkerError),
}

impl BridgeError {
    /// The daemon refused something because it does not trust us (`trust`
    /// as its handshake said): an upload or a build request, not a build
    /// that ran and failed.
    pub fn refused_for_trust(&self, trust: Option<crate::worker::Trust>) -> bool {
        trust == Some(crate::worker::Trust::NotTrusted)
            && matches!(self, BridgeError::Daemon(WorkerError::Remote { during, .. }) if ["AddToStoreNar", "AddMultipleToStore", "BuildDerivation"].contains(during))
    }

    /// The connection to the daemon ended (EOF or a broken pipe): whether
    /// that was the link or the daemon is for ssh's exit status to tell.
    pub fn daemon_closed(&self) -> bool {
        matches!(self, BridgeError::Daemon(WorkerError::Closed { .. }))
    }
}

/// Nix's result types that carry a line of the build's log
/// (`resBuildLogLine`, `resPostBuildLogLine`).
const LOG_LINE_RESULTS: [u64; 2] = [101, 107];

/// Where the daemon's messages go (this process's stderr, which the hook
/// forwards as the builder's log, as `nix-store --serve`'s stderr is): its
/// messages and the build's log lines as text; activities (progress) are
/// not shown.
fn log_sink(log: &mut dyn Write) -> impl FnMut(Event) + '_ {
    move |e| {
        let text = match &e {
            Event::Next(text) => text.clone(),
            Event::Result { result_type, fields, .. } if LOG_LINE_RESULTS.contains(result_type) => match fields.first() {
                Some(crate::worker::Field::String(s)) => s.clone(),
                _ => return,
            },
            _ => return,
        };
        let line = if text.ends_with('\n') { text } else { format!("{text}\n") };
        let _ = log.write_all(line.as_bytes());
        let _ = log.flush();
    }
}

/// Serves the hook on `(client_r, client_w)` with the daemon on
/// `(daemon_r, daemon_w)` until the hook closes its stream (`Ok`).
/// `options` are sent to the daemon before each build, with the build
/// settings the hook sends in `BuildDerivation`.
pub fn serve<CR: Read + Send, CW: Write, DR: Read, DW: Write + Send>(
    client_r: CR,
    client_w: CW,
    daemon_r: DR,
    daemon_w: DW,
    options: ClientOptions,
    log: &mut dyn Write,
    trust: &mut Option<crate::worker::Trust>,
) -> Result<(), BridgeError> {
    let mut cr = BufReader::with_capacity(256 * 1024, client_r);
    let mut cw = BufWriter::with_capacity(256 * 1024, client_w);
    // The daemon first: if it refuses us, the hook hears it as a refusal at connect.
    let mut d = WorkerConn::handshake(daemon_r, daemon_w, log_sink(log))?;
    *trust = d.trust;
    let magic = wire::read_u64(&mut cr, "client magic")?;
    if magic != SERVE_MAGIC_1 {
        return Err(BridgeError::Client(WireError::TooLong { what: "client magic", len: magic, limit: SERVE_MAGIC_1 }));
    }
    let client = ServeVersion::from_wire(wire::read_u64(&mut cr, "client version")?);
    let minor = client.1.min(BRIDGE_VERSION.1);
    let out = |cw: &mut BufWriter<CW>, f: &mut dyn FnMut(&mut BufWriter<CW>) -> io::Result<()>| f(cw).and_then(|_| cw.flush()).map_err(BridgeError::ClientIo);
    out(&mut cw, &mut |w| {
        wire::write_u64(w, SERVE_MAGIC_2)?;
        wire::write_u64(w, BRIDGE_VERSION.to_wire())
    })?;
    loop {
        let cmd = match wire::read_u64(&mut cr, "serve command") {
            Ok(c) => c,
            Err(WireError::Eof { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match cmd {
            1 => {
                let _lock = wire::read_u64(&mut cr, "lock")?;
                let substitute = wire::read_u64(&mut cr, "substitute")? != 0;
                let paths = wire::read_strings(&mut cr, 4096, "paths")?;
                let valid = d.query_valid_paths(&paths, substitute, log_sink(log))?;
                out(&mut cw, &mut |w| wire::write_strings(w, &valid))?;
            }
            2 => {
                let paths = wire::read_strings(&mut cr, 4096, "paths")?;
                let mut infos = Vec::new();
                for p in &paths {
                    if let Some(i) = d.query_path_info(p, log_sink(log))? {
                        infos.push(i);
                    }
                }
                out(&mut cw, &mut |w| {
                    for i in &infos {
                        write_serve_info(w, i, minor)?;
                    }
                    wire::write_bytes(w, b"")
                })?;
            }
            3 => {
                let path = wire::read_string(&mut cr, 4096, "path")?;
                let mut nar_in = d.nar_from_path(&path, log_sink(log))?;
                // Walking the archive finds its end; every byte read is passed on.
                let mut tee = Tee { inner: &mut nar_in, copy: &mut cw, failed: None };
                let walked = nar::skip(&mut tee);
                if let Some(e) = tee.failed.take() {
                    return Err(BridgeError::ClientIo(e));
                }
                walked.map_err(|e| WorkerError::Protocol { during: "NarFromPath", why: e.to_string() })?;
                cw.flush().map_err(BridgeError::ClientIo)?;
            }
            CMD_TRUST => {
                let t = match d.trust {
                    None => 0,
                    Some(crate::worker::Trust::Trusted) => 1,
                    Some(crate::worker::Trust::NotTrusted) => 2,
                };
                let proto = d.daemon_version.to_string();
                let nix = d.daemon_nix_version.clone().unwrap_or_default();
                out(&mut cw, &mut |w| {
                    wire::write_u64(w, t)?;
                    wire::write_bytes(w, proto.as_bytes())?;
                    wire::write_bytes(w, nix.as_bytes())
                })?;
            }
            8 | CMD_BUILD_PATHS => {
                let drv_path = wire::read_string(&mut cr, 4096, "derivation path")?;
                let (drv, outputs) = if cmd == 8 { (Some(Derivation::read_basic(&mut cr)?), Vec::new()) } else { (None, wire::read_strings(&mut cr, 4096, "outputs")?) };
                let mut o = options.clone();
                o.max_silent_time = wire::read_u64(&mut cr, "maxSilentTime")?;
                let build_timeout = wire::read_u64(&mut cr, "buildTimeout")?;
                let mut max_log_size = 0;
                if minor >= 2 {
                    max_log_size = wire::read_u64(&mut cr, "maxLogSize")?;
                }
                if minor >= 3 {
                    let _repeats = wire::read_u64(&mut cr, "nrRepeats")?;
                    let _enforce = wire::read_u64(&mut cr, "enforceDeterminism")?;
                }
                if minor >= 7 {
                    o.keep_failed = wire::read_u64(&mut cr, "keepFailed")? != 0;
                }
                o.overrides.retain(|(k, _)| k != "timeout" && k != "max-build-log-size");
                if build_timeout != 0 {
                    o.overrides.push(("timeout".into(), build_timeout.to_string()));
                }
                if max_log_size != 0 {
                    o.overrides.push(("max-build-log-size".into(), max_log_size.to_string()));
                }
                d.set_options(&o, log_sink(log))?;
                let res = match &drv {
                    Some(drv) => d.build_derivation(&drv_path, drv, &drv.input_srcs, BuildMode::Normal, log_sink(log))?,
                    None => d.build_paths(&drv_path, &outputs, BuildMode::Normal, log_sink(log))?,
                };
                let r = &res.result;
                out(&mut cw, &mut |w| {
                    wire::write_u64(w, r.status.to_wire())?;
                    wire::write_bytes(w, r.error_msg.as_bytes())?;
                    if minor >= 3 {
                        for v in [r.times_built, res.is_non_deterministic as u64, r.start_time, r.stop_time] {
                            wire::write_u64(w, v)?;
                        }
                    }
                    if minor >= 6 {
                        wire::write_u64(w, res.built_outputs.len() as u64)?;
                        for (id, json) in &res.built_outputs {
                            wire::write_bytes(w, id.as_bytes())?;
                            wire::write_bytes(w, json.as_bytes())?;
                        }
                    }
                    Ok(())
                })?;
            }
            9 => {
                let info = read_path_info_fields(&mut cr)?;
                let mut nar_in = Bounded::new(&mut cr, info.nar_size);
                d.add_to_store_nar(&info, &mut nar_in, false, true, log_sink(log))?;
                out(&mut cw, &mut |w| wire::write_u64(w, 1))?;
            }
            CMD_ADD_MULTIPLE => {
                let n = wire::read_u64(&mut cr, "paths")?;
                if n > MAX_MULTIPLE {
                    return Err(BridgeError::Client(WireError::TooLong { what: "paths", len: n, limit: MAX_MULTIPLE }));
                }
                let infos = (0..n).map(|_| read_path_info_fields(&mut cr)).collect::<Result<Vec<_>, _>>()?;
                if d.version >= crate::worker::WorkerVersion(1, 32) {
                    let cr = &mut cr;
                    let mut nar_of = |i: usize, w: &mut dyn Write| -> io::Result<()> {
                        let got = io::copy(&mut Bounded::new(&mut *cr, infos[i].nar_size), w)?;
                        if got != infos[i].nar_size {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the hook's NAR stream ended early"));
                        }
                        Ok(())
                    };
                    d.add_multiple_to_store(&infos, &mut nar_of, false, true, log_sink(log))?;
                } else {
                    for info in &infos {
                        let mut nar_in = Bounded::new(&mut cr, info.nar_size);
                        d.add_to_store_nar(info, &mut nar_in, false, true, log_sink(log))?;
                    }
                }
                out(&mut cw, &mut |w| wire::write_u64(w, 1))?;
            }
            other => return Err(BridgeError::Unsupported(other)),
        }
    }
}

/// A path's metadata as `AddToStoreNar` sends it (bounded).
fn read_path_info_fields<R: Read>(r: &mut R) -> Result<PathInfo, WireError> {
    let path = wire::read_string(r, 4096, "path")?;
    let deriver = wire::read_string(r, 4096, "deriver")?;
    let nar_hash = wire::read_string(r, 4096, "narHash")?;
    let references = wire::read_strings(r, 4096, "references")?;
    let _registration_time = wire::read_u64(r, "registrationTime")?;
    let nar_size = wire::read_u64(r, "narSize")?;
    let _ultimate = wire::read_u64(r, "ultimate")?;
    let sigs = wire::read_strings(r, 4096, "sigs")?;
    let ca = wire::read_string(r, 4096, "ca")?;
    Ok(PathInfo { path, deriver, references, nar_size, nar_hash, ca, sigs })
}

/// One `QueryPathInfos` entry in the serve protocol's form for `minor`.
fn write_serve_info<W: Write>(w: &mut W, i: &PathInfo, minor: u8) -> io::Result<()> {
    wire::write_bytes(w, i.path.as_bytes())?;
    wire::write_bytes(w, i.deriver.as_bytes())?;
    wire::write_strings(w, &i.references)?;
    wire::write_u64(w, i.nar_size)?; // downloadSize
    wire::write_u64(w, i.nar_size)?;
    if minor >= 4 {
        wire::write_bytes(w, i.nar_hash.as_bytes())?;
        wire::write_bytes(w, i.ca.as_bytes())?;
        wire::write_strings(w, &i.sigs)?;
    }
    Ok(())
}

/// Passes on every byte read through it.
struct Tee<'a, R, W: Write> {
    inner: &'a mut R,
    copy: &'a mut W,
    /// A write that failed (the read then fails too).
    failed: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.copy.write_all(&buf[..n]) {
            let err = io::Error::new(e.kind(), e.to_string());
            self.failed = Some(e);
            return Err(err);
        }
        Ok(n)
    }
}
