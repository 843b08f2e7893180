//! A client for the `nix-store --serve` protocol (§5), over any byte pipe:
//! the remote builder through ssh, or the local store through a local
//! `nix-store --serve`. We announce version 2.7 and gate every optional field
//! on `min(0x207, server version)`, which stays in sync with every Nix from
//! 2.3 to 2.35 and with Lix.

use crate::derivation::Derivation;
use crate::hook_protocol::BuildOptions;
use crate::wire::{self, WireError};
use std::io::{self, BufReader, BufWriter, Read, Write};

pub const SERVE_MAGIC_1: u64 = 0x390c9deb;
pub const SERVE_MAGIC_2: u64 = 0x5452eecb;
pub const CLIENT_VERSION: ServeVersion = ServeVersion(2, 7);

const MAX_PATH: usize = 4096;
const MAX_MSG: usize = 16 * 1024 * 1024;

/// A protocol version `major.minor`, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServeVersion(pub u8, pub u8);

impl ServeVersion {
    pub fn from_wire(v: u64) -> Self {
        ServeVersion(((v >> 8) & 0xff) as u8, (v & 0xff) as u8)
    }
    pub fn to_wire(self) -> u64 {
        ((self.0 as u64) << 8) | self.1 as u64
    }
}

/// What went wrong talking to a `nix-store --serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("'nix-store --serve' protocol mismatch: expected magic {SERVE_MAGIC_2:#x}, got {got:#x} (is something printing text on login, like a MOTD in .bashrc?)")]
    Magic { got: u64 },
    #[error("unsupported 'nix-store --serve' protocol version {0}.{1}; this hook speaks 2.x")]
    Version(u8, u8),
    #[error("the connection ended during {during}")]
    Closed { during: &'static str },
    #[error("protocol error during {during}")]
    Wire {
        during: &'static str,
        #[source]
        source: WireError,
    },
    #[error("I/O error during {during}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the server answered {got} to {during}, expected 1")]
    Ack { during: &'static str, got: u64 },
}

fn wire_err(during: &'static str) -> impl Fn(WireError) -> ServeError {
    move |e| match e {
        WireError::Eof { .. } => ServeError::Closed { during },
        WireError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe => ServeError::Closed { during },
        e => ServeError::Wire { during, source: e },
    }
}

fn io_err(during: &'static str) -> impl Fn(io::Error) -> ServeError {
    move |e| {
        if e.kind() == io::ErrorKind::BrokenPipe || e.kind() == io::ErrorKind::UnexpectedEof {
            ServeError::Closed { during }
        } else {
            ServeError::Io { during, source: e }
        }
    }
}

/// Path metadata as `QueryPathInfos` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    pub deriver: String,
    pub references: Vec<String>,
    pub nar_size: u64,
    /// As sent (`sha256:<nix32>` from Nix); empty from servers older than 2.4.
    pub nar_hash: String,
    pub ca: String,
    pub sigs: Vec<String>,
}

/// The reply to `BuildDerivation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildResult {
    pub status: u64,
    pub error_msg: String,
    pub times_built: u64,
    pub start_time: u64,
    pub stop_time: u64,
}

impl BuildResult {
    /// Built, Substituted, AlreadyValid, ResolvesToAlreadyValid.
    pub fn success(&self) -> bool {
        matches!(self.status, 0 | 1 | 2 | 13)
    }
    pub fn status_name(&self) -> &'static str {
        [
            "Built",
            "Substituted",
            "AlreadyValid",
            "PermanentFailure",
            "InputRejected",
            "OutputRejected",
            "TransientFailure",
            "CachedFailure",
            "TimedOut",
            "MiscFailure",
            "DependencyFailed",
            "LogLimitExceeded",
            "NotDeterministic",
            "ResolvesToAlreadyValid",
            "NoSubstituters",
        ]
        .get(self.status as usize)
        .copied()
        .unwrap_or("unknown status")
    }
}

/// An open serve session.
pub struct ServeConn<R: Read, W: Write> {
    r: BufReader<R>,
    w: BufWriter<W>,
    pub server_version: ServeVersion,
}

impl<R: Read, W: Write> ServeConn<R, W> {
    /// Sends our magic and version and checks the server's.
    pub fn handshake(r: R, w: W) -> Result<Self, ServeError> {
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let during = "the handshake";
        write_client_hello(&mut w).map_err(io_err(during))?;
        w.flush().map_err(io_err(during))?;
        let v = read_server_hello(&mut r)?;
        Ok(ServeConn { r, w, server_version: v })
    }

    fn minor(&self) -> u8 {
        self.server_version.min(CLIENT_VERSION).1
    }

    /// The buffered reader (for NAR bytes following `DumpStorePath`).
    pub fn reader(&mut self) -> &mut BufReader<R> {
        &mut self.r
    }
    /// The buffered writer.
    pub fn writer(&mut self) -> &mut BufWriter<W> {
        &mut self.w
    }

    pub fn flush(&mut self) -> Result<(), ServeError> {
        self.w.flush().map_err(io_err("sending a request"))
    }

    /// cmd 1: which of `paths` are valid.
    pub fn query_valid_paths(&mut self, paths: &[String], lock: bool, substitute: bool) -> Result<Vec<String>, ServeError> {
        let d = "QueryValidPaths";
        (|| {
            wire::write_u64(&mut self.w, 1)?;
            wire::write_u64(&mut self.w, lock as u64)?;
            wire::write_u64(&mut self.w, substitute as u64)?;
            wire::write_strings(&mut self.w, paths)?;
            self.w.flush()
        })()
        .map_err(io_err(d))?;
        wire::read_strings(&mut self.r, MAX_PATH, "valid paths").map_err(wire_err(d))
    }

    /// cmd 2: metadata of the valid ones among `paths`.
    pub fn query_path_infos(&mut self, paths: &[String]) -> Result<Vec<PathInfo>, ServeError> {
        let d = "QueryPathInfos";
        (|| {
            wire::write_u64(&mut self.w, 2)?;
            wire::write_strings(&mut self.w, paths)?;
            self.w.flush()
        })()
        .map_err(io_err(d))?;
        let minor = self.minor();
        let r = &mut self.r;
        let e = wire_err(d);
        let mut out = Vec::new();
        loop {
            let path = wire::read_string(r, MAX_PATH, "path").map_err(&e)?;
            if path.is_empty() {
                return Ok(out);
            }
            let deriver = wire::read_string(r, MAX_PATH, "deriver").map_err(&e)?;
            let references = wire::read_strings(r, MAX_PATH, "references").map_err(&e)?;
            let _download = wire::read_u64(r, "downloadSize").map_err(&e)?;
            let nar_size = wire::read_u64(r, "narSize").map_err(&e)?;
            let (nar_hash, ca, sigs) = if minor >= 4 {
                (
                    wire::read_string(r, 256, "narHash").map_err(&e)?,
                    wire::read_string(r, 1024, "ca").map_err(&e)?,
                    wire::read_strings(r, 1024, "sigs").map_err(&e)?,
                )
            } else {
                Default::default()
            };
            out.push(PathInfo { path, deriver, references, nar_size, nar_hash, ca, sigs });
        }
    }

    /// cmd 3: asks for the NAR of `path`; read it from [`Self::reader`].
    pub fn send_dump_store_path(&mut self, path: &str) -> Result<(), ServeError> {
        write_dump_store_path(&mut self.w, path).map_err(io_err("DumpStorePath"))
    }

    /// cmd 9 header; exactly `info.nar_size` NAR bytes must follow on
    /// [`Self::writer`], then the ack is read with [`Self::read_ack`].
    pub fn send_add_to_store_nar_header(&mut self, info: &PathInfo) -> Result<(), ServeError> {
        write_add_to_store_nar_header(&mut self.w, info).map_err(io_err("AddToStoreNar"))
    }

    /// Reads the `1` that acknowledges an `AddToStoreNar`.
    pub fn read_ack(&mut self, during: &'static str) -> Result<(), ServeError> {
        read_ack(&mut self.r, during)
    }

    /// cmd 8: builds `drv` on the server; the log flows on the server's stderr.
    pub fn build_derivation(&mut self, drv_path: &str, drv: &Derivation, inputs: &[String], opts: &BuildOptions) -> Result<BuildResult, ServeError> {
        let d = "BuildDerivation";
        let minor = self.minor();
        (|| {
            wire::write_u64(&mut self.w, 8)?;
            wire::write_bytes(&mut self.w, drv_path.as_bytes())?;
            drv.write_basic(&mut self.w, inputs)?;
            write_build_options(&mut self.w, opts, minor)?;
            self.w.flush()
        })()
        .map_err(io_err(d))?;
        let r = &mut self.r;
        let e = wire_err(d);
        let status = wire::read_u64(r, "status").map_err(&e)?;
        let error_msg = wire::read_string(r, MAX_MSG, "errorMsg").map_err(&e)?;
        let mut res = BuildResult { status, error_msg, times_built: 0, start_time: 0, stop_time: 0 };
        if minor >= 3 {
            res.times_built = wire::read_u64(r, "timesBuilt").map_err(&e)?;
            let _nondet = wire::read_u64(r, "isNonDeterministic").map_err(&e)?;
            res.start_time = wire::read_u64(r, "startTime").map_err(&e)?;
            res.stop_time = wire::read_u64(r, "stopTime").map_err(&e)?;
        }
        if minor >= 6 {
            // builtOutputs: consumed; input-addressed outputs are known from the drv.
            let n = wire::read_u64(r, "builtOutputs").map_err(&e)?;
            for _ in 0..n {
                wire::read_string(r, MAX_PATH, "output id").map_err(&e)?;
                wire::read_string(r, MAX_MSG, "realisation").map_err(&e)?;
            }
        }
        Ok(res)
    }

    /// Gives back the underlying streams (after flushing).
    pub fn into_inner(self) -> (BufReader<R>, Result<W, io::Error>) {
        (self.r, self.w.into_inner().map_err(|e| e.into_error()))
    }
}

/// The client's half of the handshake, for one-directional bulk sessions
/// that do not wait for the server's reply before sending requests.
pub fn write_client_hello<W: Write + ?Sized>(w: &mut W) -> io::Result<()> {
    wire::write_u64(w, SERVE_MAGIC_1)?;
    wire::write_u64(w, CLIENT_VERSION.to_wire())
}

/// Reads and checks the server's half of the handshake.
pub fn read_server_hello<R: Read + ?Sized>(r: &mut R) -> Result<ServeVersion, ServeError> {
    let during = "the handshake";
    let magic = wire::read_u64(r, "server magic").map_err(wire_err(during))?;
    if magic != SERVE_MAGIC_2 {
        return Err(ServeError::Magic { got: magic });
    }
    let v = ServeVersion::from_wire(wire::read_u64(r, "server version").map_err(wire_err(during))?);
    if v.0 != 2 {
        return Err(ServeError::Version(v.0, v.1));
    }
    Ok(v)
}

/// `AddToStoreNar` (cmd 9) up to the NAR bytes, which must follow.
pub fn write_add_to_store_nar_header<W: Write + ?Sized>(w: &mut W, info: &PathInfo) -> io::Result<()> {
    wire::write_u64(w, 9)?;
    wire::write_bytes(w, info.path.as_bytes())?;
    wire::write_bytes(w, info.deriver.as_bytes())?;
    wire::write_bytes(w, info.nar_hash.as_bytes())?;
    wire::write_strings(w, &info.references)?;
    wire::write_u64(w, 0)?; // registration time: now
    wire::write_u64(w, info.nar_size)?;
    wire::write_u64(w, 0)?; // ultimate
    wire::write_strings(w, &info.sigs)?;
    wire::write_bytes(w, info.ca.as_bytes())
}

/// `DumpStorePath` (cmd 3).
pub fn write_dump_store_path<W: Write + ?Sized>(w: &mut W, path: &str) -> io::Result<()> {
    wire::write_u64(w, 3)?;
    wire::write_bytes(w, path.as_bytes())
}

/// Reads the `1` acknowledging an `AddToStoreNar`.
pub fn read_ack<R: Read + ?Sized>(r: &mut R, during: &'static str) -> Result<(), ServeError> {
    match wire::read_u64(r, "ack").map_err(wire_err(during))? {
        1 => Ok(()),
        got => Err(ServeError::Ack { during, got }),
    }
}

/// Writes BuildOptions (§5.4) for the negotiated minor version.
pub fn write_build_options<W: Write + ?Sized>(w: &mut W, o: &BuildOptions, minor: u8) -> io::Result<()> {
    wire::write_u64(w, o.max_silent_time)?;
    wire::write_u64(w, o.build_timeout)?;
    if minor >= 2 {
        wire::write_u64(w, o.max_log_size)?;
    }
    if minor >= 3 {
        wire::write_u64(w, 0)?; // nrRepeats: 2.13+ servers reject anything else
        wire::write_u64(w, 0)?; // enforceDeterminism: ignored by 2.13+
    }
    if minor >= 7 {
        wire::write_u64(w, o.keep_failed as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering_and_wire_form() {
        assert!(ServeVersion(2, 5) < ServeVersion(2, 7));
        assert_eq!(ServeVersion::from_wire(0x207), ServeVersion(2, 7));
        assert_eq!(CLIENT_VERSION.to_wire(), 0x207);
    }

    #[test]
    fn build_options_per_version() {
        let o = BuildOptions { max_silent_time: 1, build_timeout: 2, max_log_size: 3, keep_failed: true };
        let mut v = Vec::new();
        write_build_options(&mut v, &o, 7).unwrap();
        assert_eq!(v.len(), 6 * 8);
        v.clear();
        write_build_options(&mut v, &o, 5).unwrap();
        assert_eq!(v.len(), 5 * 8);
        v.clear();
        write_build_options(&mut v, &o, 1).unwrap();
        assert_eq!(v.len(), 2 * 8);
    }

    #[test]
    fn handshake_rejects_a_motd() {
        let reply = b"Welcome to b1!\n\0\0\0\0\0\0\0\0\0".to_vec();
        let err = ServeConn::handshake(&reply[..], Vec::new()).err().unwrap();
        assert!(matches!(err, ServeError::Magic { .. }), "{err}");
    }

    #[test]
    fn decodes_the_reply_stream_captured_from_nix_2_8() {
        // Recorded by tests/golden/record.sh: the server side of a session of
        // handshake, QueryValidPaths, BuildDerivation, QueryPathInfos, DumpStorePath.
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/serve-s2c.bin");
        let bytes = std::fs::read(&p).unwrap();
        let drv = Derivation::parse(
            "/nix/store/00000000000000000000000000000000-x.drv",
            br#"Derive([("out","/nix/store/00000000000000000000000000000000-x","","")],[],[],"x86_64-linux","/bin/sh",[],[])"#,
        )
        .unwrap();
        let mut c = ServeConn::handshake(&bytes[..], io::sink()).unwrap();
        assert_eq!(c.server_version, ServeVersion(2, 7));
        assert_eq!(c.query_valid_paths(&[], false, false).unwrap(), Vec::<String>::new());
        let res = c.build_derivation("/nix/store/x.drv", &drv, &[], &BuildOptions::default()).unwrap();
        assert!(res.success(), "{res:?}");
        assert_eq!(res.times_built, 1);
        let infos = c.query_path_infos(&[]).unwrap();
        assert_eq!(infos.len(), 1);
        assert!(infos[0].nar_hash.starts_with("sha256:"));
        assert_eq!(infos[0].nar_size, 120);
        let mut hr = crate::hash::HashingReader::new(c.reader());
        crate::nar::skip(&mut hr).unwrap();
        let (h, n, _) = hr.finish();
        assert_eq!((n, h.to_nix32_prefixed()), (120, infos[0].nar_hash.clone()));
        assert!(c.reader().fill_buf_empty());
    }

    trait Empty {
        fn fill_buf_empty(&mut self) -> bool;
    }
    impl<R: Read> Empty for BufReader<R> {
        fn fill_buf_empty(&mut self) -> bool {
            use std::io::BufRead;
            self.fill_buf().map(|b| b.is_empty()).unwrap_or(false)
        }
    }
}
