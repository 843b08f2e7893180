//! Moving closures between stores over serve sessions: which inputs the
//! builder lacks, uploading them in dependency order as one pipelined
//! stream, and downloading outputs into the local store with every NAR read
//! through its announced size, hashed, checked and (for fixed outputs)
//! compared with the `.drv`'s hash before anything is registered.
//!
//! The local side is asked through [`PathMeta`] (the store's database, or a
//! local `nix-store --serve`) and uploads take their NARs from a
//! [`NarSource`]: written from disk ([`DiskNars`]) or streamed by a serve
//! session ([`ServeNars`]).
//!
//! No pipe is filled before its other end is read: at most [`WINDOW`]
//! requests are ahead of the replies read, acknowledgements are read while
//! uploading, and a bulk session's requests are written by their own thread.

use crate::hash::{HashingReader, Sha256Hash};
use crate::local_store::{LocalStore, LocalStoreError, Registrar, StoreDb};
use crate::nar::{self, NarError};
use crate::path_info::{self, Bounded, FixedHash, PathInfoError};
use crate::serve::{PathInfo, ServeConn, ServeError};
use crate::store_path::StorePath;
use crate::wire::WireError;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Requests sent ahead of the replies read (each a few hundred bytes, so
/// the window never fills a pipe).
pub const WINDOW: usize = 64;

/// What went wrong while copying.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("talking to the builder")]
    Builder {
        during: &'static str,
        #[source]
        source: ServeError,
    },
    #[error("talking to the local nix-store")]
    LocalServe {
        during: &'static str,
        #[source]
        source: ServeError,
    },
    #[error("'{path}' is not valid in the local store, so it cannot be copied to the builder")]
    MissingLocally { path: String },
    #[error("the builder did not report '{path}' as valid after building it")]
    MissingRemotely { path: String },
    #[error("rejected what the builder sent (nothing was registered)")]
    Rejected(#[from] PathInfoError),
    #[error("'{path}' changed on disk since it was registered (its NAR is now {got} bytes, not the {registered} registered); run 'nix-store --verify --check-contents --repair'")]
    ChangedLocally { path: String, registered: u64, got: u64 },
    #[error("I/O error while {what} '{path}'")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Local(#[from] LocalStoreError),
}

impl CopyError {
    /// The builder's stream ended (EOF or a broken pipe): whether the
    /// connection was lost or the builder refused is decided from how its
    /// process ended.
    pub fn builder_closed(&self) -> bool {
        matches!(self, CopyError::Builder { source: ServeError::Closed { .. }, .. })
    }
    /// The fault is on this machine, not the builder's.
    pub fn is_local(&self) -> bool {
        matches!(self, CopyError::LocalServe { .. } | CopyError::MissingLocally { .. } | CopyError::ChangedLocally { .. } | CopyError::Io { .. } | CopyError::Local(_))
    }
}

fn builder(during: &'static str) -> impl Fn(ServeError) -> CopyError {
    move |source| CopyError::Builder { during, source }
}
fn local_serve(during: &'static str) -> impl Fn(ServeError) -> CopyError {
    move |source| CopyError::LocalServe { during, source }
}
/// A write to the builder failed: a broken pipe means its stream closed.
fn builder_io(during: &'static str) -> impl Fn(io::Error) -> CopyError {
    move |e| {
        let source = if e.kind() == io::ErrorKind::BrokenPipe { ServeError::Closed { during } } else { ServeError::Io { during, source: e } };
        CopyError::Builder { during, source }
    }
}

/// Orders `infos` so that every path comes after the paths it references
/// (references outside `infos` and cycles through self-references are
/// ignored). Iterative, so a deep closure cannot overflow the stack.
pub fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let index: std::collections::HashMap<&str, usize> = infos.iter().enumerate().map(|(i, p)| (p.path.as_str(), i)).collect();
    // 0: not seen, 1: on the stack, 2: placed
    let mut state = vec![0u8; infos.len()];
    let mut order = Vec::with_capacity(infos.len());
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for start in 0..infos.len() {
        if state[start] != 0 {
            continue;
        }
        state[start] = 1;
        stack.push((start, 0));
        while let Some((node, next)) = stack.last_mut() {
            let (node, refs) = (*node, &infos[*node].references);
            if *next < refs.len() {
                let r = refs[*next].as_str();
                *next += 1;
                if let Some(&j) = index.get(r) {
                    if state[j] == 0 {
                        state[j] = 1;
                        stack.push((j, 0));
                    }
                }
            } else {
                state[node] = 2;
                order.push(node);
                stack.pop();
            }
        }
    }
    drop(index);
    // Reordered in place: a second vector of tens of thousands of path
    // infos was most of the hook's memory growth with the path count.
    let mut infos = infos;
    permute(&mut infos, &mut order);
    infos
}

/// Moves to the front of `ordered` (in dependency order, see
/// [`topo_sort`]) the paths marked in `front` whose references in
/// `ordered` are all moved too, keeping the relative order of both parts,
/// so the result is in dependency order still. Returns how many moved.
pub fn to_front(ordered: &mut [PathInfo], front: &[bool]) -> usize {
    let index: std::collections::HashMap<&str, usize> = ordered.iter().enumerate().map(|(i, p)| (p.path.as_str(), i)).collect();
    let mut moved = vec![false; ordered.len()];
    for (i, info) in ordered.iter().enumerate() {
        // References come first, so theirs is already decided.
        moved[i] = front.get(i).copied().unwrap_or(false) && info.references.iter().all(|r| index.get(r.as_str()).is_none_or(|&j| j == i || moved[j]));
    }
    drop(index);
    let mut order: Vec<usize> = (0..ordered.len()).filter(|&i| moved[i]).chain((0..ordered.len()).filter(|&i| !moved[i])).collect();
    let n = moved.iter().filter(|&&m| m).count();
    permute(ordered, &mut order);
    n
}

/// Reorders `v` so that `v[k]` becomes what `v[order[k]]` was (`order` a
/// permutation of `0..v.len()`, used up), by swaps along each cycle.
fn permute<T>(v: &mut [T], order: &mut [usize]) {
    const DONE: usize = usize::MAX;
    for start in 0..order.len() {
        let mut k = start;
        while order[k] != DONE {
            let from = order[k];
            order[k] = DONE;
            if from == start {
                break;
            }
            v.swap(k, from);
            k = from;
        }
    }
}

/// What the local store says about its paths: which are valid and their
/// metadata (as `QueryValidPaths` without locking or substitution and
/// `QueryPathInfos` answer).
pub trait PathMeta {
    fn query_valid(&mut self, paths: &[String]) -> Result<Vec<String>, CopyError>;
    fn query_path_infos(&mut self, paths: &[&str]) -> Result<Vec<PathInfo>, CopyError>;
}

impl<R: Read, W: Write> PathMeta for ServeConn<R, W> {
    fn query_valid(&mut self, paths: &[String]) -> Result<Vec<String>, CopyError> {
        self.query_valid_paths(paths, false, false).map_err(local_serve("QueryValidPaths"))
    }
    fn query_path_infos(&mut self, paths: &[&str]) -> Result<Vec<PathInfo>, CopyError> {
        ServeConn::query_path_infos(self, paths).map_err(local_serve("QueryPathInfos"))
    }
}

impl PathMeta for StoreDb {
    fn query_valid(&mut self, paths: &[String]) -> Result<Vec<String>, CopyError> {
        Ok(StoreDb::query_valid(self, paths)?)
    }
    fn query_path_infos(&mut self, paths: &[&str]) -> Result<Vec<PathInfo>, CopyError> {
        Ok(StoreDb::query_path_infos(self, paths)?)
    }
}

/// Asks the local store for the metadata of `missing` (one question), every
/// one of which must be valid there, in dependency order.
pub fn local_infos<S: AsRef<str>>(local: &mut dyn PathMeta, missing: &[S]) -> Result<Vec<PathInfo>, CopyError> {
    let missing: Vec<&str> = missing.iter().map(AsRef::as_ref).collect();
    let infos = local.query_path_infos(&missing)?;
    if infos.len() != missing.len() {
        let have: BTreeSet<&str> = infos.iter().map(|i| i.path.as_str()).collect();
        if let Some(p) = missing.iter().find(|p| !have.contains(*p)) {
            return Err(CopyError::MissingLocally { path: p.to_string() });
        }
    }
    Ok(topo_sort(infos))
}

/// Where an upload's NARs come from. For each path of an upload, in order,
/// [`NarSource::before`] and then [`NarSource::write_nar`], which writes
/// exactly `info.nar_size` bytes. A failed read is a local fault, a failed
/// write the builder's.
pub trait NarSource {
    /// Runs before NAR `i` of `ordered` is written.
    fn before(&mut self, ordered: &[PathInfo], i: usize) -> Result<(), CopyError>;
    /// Whether NARs are requested ahead of the one being written: an upload
    /// from such a source cannot stop between two paths.
    fn reads_ahead(&self) -> bool {
        false
    }
    /// Writes the NAR of `info` to `w`; returns its size.
    fn write_nar(&mut self, info: &PathInfo, w: &mut dyn Write) -> Result<u64, CopyError>;
}

/// NARs streamed by a serve session (`DumpStorePath`), with at most
/// [`WINDOW`] requests ahead of the NAR being read.
pub struct ServeNars<'a, R: Read, W: Write> {
    conn: &'a mut ServeConn<R, W>,
    requested: usize,
}

impl<'a, R: Read, W: Write> ServeNars<'a, R, W> {
    /// For one upload; nothing may be pending on `conn`.
    pub fn new(conn: &'a mut ServeConn<R, W>) -> Self {
        ServeNars { conn, requested: 0 }
    }
}

impl<R: Read, W: Write> NarSource for ServeNars<'_, R, W> {
    fn reads_ahead(&self) -> bool {
        true
    }

    fn before(&mut self, ordered: &[PathInfo], i: usize) -> Result<(), CopyError> {
        let target = (i + WINDOW).min(ordered.len());
        if self.requested >= target {
            return Ok(());
        }
        while self.requested < target {
            self.conn.send_dump_store_path(&ordered[self.requested].path).map_err(local_serve("DumpStorePath"))?;
            self.requested += 1;
        }
        self.conn.flush().map_err(local_serve("DumpStorePath"))
    }

    /// Copies the next NAR from the session's replies: exactly
    /// `info.nar_size` bytes.
    fn write_nar(&mut self, info: &PathInfo, w: &mut dyn Write) -> Result<u64, CopyError> {
        let mut r = self.conn.reader().take(info.nar_size);
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::LocalServe { during: "DumpStorePath", source: ServeError::Io { during: "DumpStorePath", source: e } }),
            };
            w.write_all(&buf[..n]).map_err(builder_io("AddToStoreNar"))?;
            got += n as u64;
        }
        if got != info.nar_size {
            return Err(CopyError::LocalServe { during: "DumpStorePath", source: ServeError::Closed { during: "DumpStorePath" } });
        }
        Ok(got)
    }
}

/// NARs written from the files of a store on this machine's disk
/// ([`nar::dump`]), no process involved. A NAR whose size is not the one
/// registered (the files changed since) is a local error, and no byte past
/// the registered size reaches the builder.
pub struct DiskNars<'a> {
    store: &'a LocalStore,
}

impl<'a> DiskNars<'a> {
    pub fn new(store: &'a LocalStore) -> Self {
        DiskNars { store }
    }
}

/// The writer under [`DiskNars`]: counts every byte, passes on at most
/// `limit`, and keeps the first error of the writer below (the builder's),
/// so that it is told from a failed read.
struct Limited<'a> {
    inner: &'a mut dyn Write,
    limit: u64,
    count: u64,
    failed: Option<io::Error>,
}

impl Write for Limited<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let pass = (buf.len() as u64).min(self.limit.saturating_sub(self.count)) as usize;
        if pass > 0 {
            if let Err(e) = self.inner.write_all(&buf[..pass]) {
                let kind = e.kind();
                self.failed = Some(e);
                return Err(io::Error::new(kind, "the write failed"));
            }
        }
        self.count += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NarSource for DiskNars<'_> {
    fn before(&mut self, _: &[PathInfo], _: usize) -> Result<(), CopyError> {
        Ok(())
    }

    fn write_nar(&mut self, info: &PathInfo, w: &mut dyn Write) -> Result<u64, CopyError> {
        let read_err = |source| CopyError::Io { what: "reading", path: info.path.clone(), source };
        let sp = StorePath::parse(&self.store.store_dir, &info.path).map_err(|e| read_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut out = Limited { inner: w, limit: info.nar_size, count: 0, failed: None };
        let res = nar::dump(&self.store.real_path(&sp), &mut out);
        if let Some(e) = out.failed.take() {
            return Err(builder_io("AddToStoreNar")(e));
        }
        res.map_err(read_err)?;
        if out.count != info.nar_size {
            return Err(CopyError::ChangedLocally { path: info.path.clone(), registered: info.nar_size, got: out.count });
        }
        Ok(out.count)
    }
}

/// Copies `ordered` (from [`local_infos`]: absent on the builder, in
/// dependency order) from the local store to the builder as back-to-back
/// `AddToStoreNar` requests, reading acknowledgements as it goes so that at
/// most 2 × [`WINDOW`] are ever pending. Returns the bytes of NAR sent.
pub fn upload<RR: Read, RW: Write>(local: &mut dyn NarSource, remote: &mut ServeConn<RR, RW>, ordered: &[PathInfo]) -> Result<u64, CopyError> {
    upload_while(local, remote, ordered, &mut |_| true).map(|(sent, _)| sent)
}

/// As [`upload`], asking `go_on` before each path whether to send it: at
/// the first `false` the upload ends there, every path sent before it
/// acknowledged. A source that reads ahead ([`NarSource::reads_ahead`])
/// is not asked: everything is sent. Returns the bytes of NAR sent and how
/// many paths.
pub fn upload_while<RR: Read, RW: Write>(
    local: &mut dyn NarSource,
    remote: &mut ServeConn<RR, RW>,
    ordered: &[PathInfo],
    go_on: &mut dyn FnMut(&PathInfo) -> bool,
) -> Result<(u64, usize), CopyError> {
    let (mut acked, mut sent) = (0, 0);
    let ack = |remote: &mut ServeConn<RR, RW>, acked: &mut usize| -> Result<(), CopyError> {
        remote.read_ack("AddToStoreNar").map_err(builder("AddToStoreNar"))?;
        *acked += 1;
        Ok(())
    };
    let mut count = ordered.len();
    for (i, info) in ordered.iter().enumerate() {
        if !local.reads_ahead() && !go_on(info) {
            count = i;
            break;
        }
        local.before(ordered, i)?;
        remote.send_add_to_store_nar_header(info).map_err(builder("AddToStoreNar"))?;
        sent += local.write_nar(info, remote.writer())?;
        if i + 1 - acked >= 2 * WINDOW {
            remote.flush().map_err(builder("AddToStoreNar"))?;
            while i + 1 - acked > WINDOW {
                ack(remote, &mut acked)?;
            }
        }
    }
    remote.flush().map_err(builder("AddToStoreNar"))?;
    while acked < count {
        ack(remote, &mut acked)?;
    }
    Ok((sent, count))
}

/// Copies `ordered` to an `ssh-ng://` builder through the bridge in one
/// request ([`crate::bridge::CMD_ADD_MULTIPLE`]): every path's metadata,
/// then every NAR in the same order, then one acknowledgement. The bridge
/// streams them into one `AddMultipleToStore`. Returns the bytes of NAR sent.
pub fn upload_multiple<RR: Read, RW: Write>(local: &mut dyn NarSource, remote: &mut ServeConn<RR, RW>, ordered: &[PathInfo]) -> Result<u64, CopyError> {
    let d = "AddMultipleToStore";
    remote.send_add_multiple_header(ordered).map_err(builder(d))?;
    let mut sent = 0;
    for (i, info) in ordered.iter().enumerate() {
        local.before(ordered, i)?;
        sent += local.write_nar(info, remote.writer())?;
    }
    remote.flush().map_err(builder(d))?;
    remote.read_ack(d).map_err(builder(d))?;
    Ok(sent)
}

/// Copies `ordered` (checked, in dependency order) from the builder into a
/// local store that is not on this machine's disk (a binary cache), through
/// the local `nix-store --serve --write`, which checks each NAR against its
/// announced hash as it imports it. The same requests as [`upload`], the
/// other way round.
pub fn import_outputs<RR: Read, RW: Write, LR: Read, LW: Write>(remote: &mut ServeConn<RR, RW>, local: &mut ServeConn<LR, LW>, ordered: &[PathInfo]) -> Result<u64, CopyError> {
    upload(&mut ServeNars::new(remote), local, ordered).map_err(|e| match e {
        CopyError::Builder { during, source } => CopyError::LocalServe { during, source },
        CopyError::LocalServe { during, source } => CopyError::Builder { during, source },
        CopyError::MissingLocally { path } => CopyError::MissingRemotely { path },
        e => e,
    })
}

/// Asks the builder for the metadata of `outputs` (one question): every one
/// must be valid there, and every entry is checked ([`path_info::check`]).
pub fn remote_infos<RR: Read, RW: Write>(remote: &mut ServeConn<RR, RW>, store_dir: &str, outputs: &[StorePath]) -> Result<Vec<PathInfo>, CopyError> {
    let names: Vec<String> = outputs.iter().map(|p| p.to_string()).collect();
    let infos = remote.query_path_infos(&names).map_err(builder("QueryPathInfos"))?;
    let infos = infos.iter().map(|i| path_info::check(store_dir, i)).collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = names.iter().find(|p| !infos.iter().any(|i| &i.path == *p)) {
        return Err(CopyError::MissingRemotely { path: p.clone() });
    }
    Ok(infos)
}

/// References of `infos` that are neither among them nor valid in the local
/// store (asked through `local`) make the reply a lie: such a path would be
/// registered with a dangling reference.
pub fn check_references(local: &mut dyn PathMeta, infos: &[PathInfo]) -> Result<(), CopyError> {
    let ours: BTreeSet<&str> = infos.iter().map(|i| i.path.as_str()).collect();
    let others: BTreeSet<String> = infos.iter().flat_map(|i| i.references.iter()).filter(|r| !ours.contains(r.as_str())).cloned().collect();
    if others.is_empty() {
        return Ok(());
    }
    let others: Vec<String> = others.into_iter().collect();
    let valid: BTreeSet<String> = local.query_valid(&others)?.into_iter().collect();
    for i in infos {
        if let Some(r) = i.references.iter().find(|r| !ours.contains(r.as_str()) && !valid.contains(*r)) {
            return Err(PathInfoError { path: i.path.clone(), why: format!("it references '{r}', which is neither an output of this build nor valid locally") }.into());
        }
    }
    Ok(())
}

/// Downloads the outputs described by `infos` (from [`remote_infos`]) over
/// the interactive session, with at most [`WINDOW`] `DumpStorePath`
/// requests ahead of the NAR being read, then [`receive_nars`]. Returns the
/// NAR bytes received.
pub fn download<RR: Read, RW: Write>(
    remote: &mut ServeConn<RR, RW>,
    infos: Vec<PathInfo>,
    into: &Receive,
    registrar: Registrar,
    on_temp: &mut dyn FnMut(&Path),
) -> Result<u64, CopyError> {
    let mut requested = 0;
    let paths: Vec<String> = infos.iter().map(|i| i.path.clone()).collect();
    let (r, w) = remote.split();
    let mut before = |i: usize| -> Result<(), CopyError> {
        let target = (i + WINDOW).min(paths.len());
        if requested < target {
            while requested < target {
                crate::serve::write_dump_store_path(w, &paths[requested]).map_err(builder_io("DumpStorePath"))?;
                requested += 1;
            }
            w.flush().map_err(builder_io("DumpStorePath"))?;
        }
        Ok(())
    };
    receive_nars(r, infos, into, registrar, on_temp, &mut before)
}

/// Counts bytes passing through a reader or writer.
pub struct Counter<T> {
    pub inner: T,
    pub count: u64,
}

impl<T: Read> Read for Counter<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Counter<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes moved by a bulk transfer: NAR bytes and bytes on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub nar: u64,
    pub wire: u64,
}

/// Downloads outputs over a one-directional bulk session whose replies are
/// zstd-compressed (`nix-store --serve --write | zstd` on the builder): the
/// `DumpStorePath` requests are written by a thread of their own (so the
/// builder's replies are read while requests are still going out), then the
/// decompressed replies go through [`receive_nars`].
pub fn download_bulk<W: Write + Send + 'static, R: Read>(
    mut requests: W,
    replies: R,
    infos: Vec<PathInfo>,
    into: &Receive,
    registrar: Registrar,
    on_temp: &mut dyn FnMut(&Path),
) -> Result<Moved, CopyError> {
    let during = "a bulk download";
    let paths: Vec<String> = infos.iter().map(|i| i.path.clone()).collect();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        crate::serve::write_client_hello(&mut requests)?;
        for p in &paths {
            crate::serve::write_dump_store_path(&mut requests, p)?;
        }
        requests.flush()
        // dropping `requests` ends the builder's input
    });
    let mut wire = Counter { inner: replies, count: 0 };
    let res = (|| {
        let dec = zstd::stream::read::Decoder::new(&mut wire).map_err(|e| CopyError::Builder { during, source: ServeError::Io { during: "starting zstd", source: e } })?;
        let mut dec = io::BufReader::with_capacity(256 * 1024, dec);
        crate::serve::read_server_hello(&mut dec).map_err(builder(during))?;
        receive_nars(&mut dec, infos, into, registrar, on_temp, &mut |_| Ok(()))
    })();
    // The writer ends once its requests are written or the session is gone.
    let sent = writer.join().unwrap_or_else(|_| Err(io::Error::other("the request writer panicked")));
    let nar = res?;
    sent.map_err(builder_io(during))?;
    Ok(Moved { nar, wire: wire.count })
}

/// Uploads `ordered` (as for [`upload`]) over a one-directional bulk session
/// whose requests are zstd-compressed at `level` (`zstd -d | nix-store
/// --serve --write` on the builder): handshake, every `AddToStoreNar` with
/// its NAR in dependency order, end of stream. The server's handshake and
/// acknowledgements are read by a thread meanwhile. The builder's Nix
/// verifies every NAR's hash and size before it registers the path.
pub fn upload_bulk<W: Write, R: Read + Send + 'static>(local: &mut dyn NarSource, requests: W, replies: R, ordered: &[PathInfo], level: i32) -> Result<Moved, CopyError> {
    if ordered.is_empty() {
        return Ok(Moved::default());
    }
    let n = ordered.len();
    let during = "a bulk upload";
    let reader = std::thread::spawn(move || -> Result<(), ServeError> {
        let mut r = io::BufReader::new(replies);
        crate::serve::read_server_hello(&mut r)?;
        for _ in 0..n {
            crate::serve::read_ack(&mut r, "AddToStoreNar")?;
        }
        Ok(())
    });
    let io = builder_io(during);
    let mut wire = Counter { inner: requests, count: 0 };
    let mut sent = 0;
    let res = (|| -> Result<(), CopyError> {
        // Buffered: a NAR written from disk comes in many small writes,
        // each of which would otherwise be a call into zstd.
        let mut enc = io::BufWriter::with_capacity(128 * 1024, zstd::stream::write::Encoder::new(&mut wire, level).map_err(&io)?);
        crate::serve::write_client_hello(&mut enc).map_err(&io)?;
        for (i, info) in ordered.iter().enumerate() {
            local.before(ordered, i)?;
            crate::serve::write_add_to_store_nar_header(&mut enc, info).map_err(&io)?;
            sent += local.write_nar(info, &mut enc)?;
        }
        let enc = enc.into_inner().map_err(|e| io(e.into_error()))?;
        enc.finish().map_err(&io)?.flush().map_err(&io)
    })();
    let wire_bytes = wire.count;
    drop(wire); // end of stream: the builder's zstd and nix-store finish
    let acks = reader.join().unwrap_or(Err(ServeError::Closed { during: "AddToStoreNar" }));
    // A local failure is ours whatever the builder then said.
    if let Err(e) = &res {
        if e.is_local() {
            return res.map(|_| Moved::default());
        }
    }
    // An error on the builder shows up on both sides; its reply says more.
    acks.map_err(builder(during))?;
    res?;
    Ok(Moved { nar: sent, wire: wire_bytes })
}

/// Where received outputs go and what they must be.
pub struct Receive<'a> {
    pub local: &'a LocalStore,
    /// The outputs being fetched (each `infos` entry must be one of them).
    pub outputs: &'a [StorePath],
    /// Fixed-output outputs and the hash their `.drv` declares.
    pub fixed: &'a [(StorePath, FixedHash)],
}

/// Removes partially unpacked outputs unless disarmed.
struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = nar::remove_tree(p);
        }
    }
}

/// Receives one NAR per `infos` entry from `r`, in order (`before(i)` runs
/// before NAR `i` is read). Each is read through a limit of its announced
/// size, unpacked to a temporary name while hashed, checked against the
/// builder's hash and size (and the `.drv`'s hash for a fixed output), moved
/// into place, and then all are registered in one transaction. On any error
/// nothing is registered and nothing is left behind. `on_temp` is told each
/// temporary path (so a signal handler can remove it).
pub fn receive_nars<R: Read>(
    r: &mut R,
    infos: Vec<PathInfo>,
    into: &Receive,
    registrar: Registrar,
    on_temp: &mut dyn FnMut(&Path),
    before: &mut dyn FnMut(usize) -> Result<(), CopyError>,
) -> Result<u64, CopyError> {
    let mut cleanup = Cleanup(Vec::new());
    let mut finals = Vec::new();
    let mut received = 0;
    let mut infos = infos;
    for (i, info) in infos.iter_mut().enumerate() {
        let path = info.path.clone();
        let rejected = |why: String| CopyError::Rejected(PathInfoError { path: path.clone(), why });
        let sp = into.outputs.iter().find(|p| p.as_str() == info.path).ok_or_else(|| rejected("it is not an output being fetched".into()))?;
        let expected = Sha256Hash::parse(&info.nar_hash).map_err(|_| rejected(format!("bad NAR hash '{}'", info.nar_hash)))?;
        before(i)?;
        let final_path = into.local.real_path(sp);
        let tmp = final_path.with_file_name(format!(".{}.build-hook-{}", sp.base_name(), std::process::id()));
        let _ = nar::remove_tree(&tmp);
        on_temp(&tmp);
        cleanup.0.push(tmp.clone());
        let mut hr = HashingReader::new(Bounded::new(&mut *r, info.nar_size));
        let res = nar::restore(&mut hr, &tmp);
        let (hash, size, bounded) = hr.finish();
        match res {
            Ok(()) => {}
            Err(NarError::Wire(WireError::Eof { .. })) if bounded.exhausted() => {
                return Err(rejected(format!("the NAR is longer than the {} bytes the builder announced", info.nar_size)));
            }
            Err(NarError::Wire(WireError::Eof { .. })) => return Err(CopyError::Builder { during: "DumpStorePath", source: ServeError::Closed { during: "DumpStorePath" } }),
            Err(NarError::Write { path, source }) => return Err(CopyError::Io { what: "unpacking", path: path.display().to_string(), source }),
            Err(e) => return Err(rejected(e.to_string())),
        }
        if size != info.nar_size {
            return Err(rejected(format!("NAR size mismatch: announced {}, got {size}", info.nar_size)));
        }
        if hash != expected {
            return Err(rejected(format!("NAR hash mismatch: expected {}, got {}", expected.to_nix32_prefixed(), hash.to_nix32_prefixed())));
        }
        // Only a content address we computed is registered: the builder's
        // claim for anything else cannot be checked here.
        let claimed = std::mem::take(&mut info.ca);
        if let Some((_, fixed)) = into.fixed.iter().find(|(p, _)| p == sp) {
            fixed.verify(&info.path, &tmp, &hash)?;
            let ca = fixed.ca();
            if !claimed.is_empty() && claimed != ca {
                return Err(rejected(format!("content address '{claimed}' does not match the derivation's '{ca}'")));
            }
            info.ca = ca;
        }
        crate::local_store::canonicalise(&tmp).map_err(|source| CopyError::Io { what: "setting the metadata of", path: info.path.clone(), source })?;
        received += size;
        finals.push((tmp, final_path, info.path.clone()));
    }
    // Everything arrived intact: move into place (stale invalid leftovers first).
    for (tmp, fin, path) in &finals {
        nar::remove_tree(fin).map_err(|source| CopyError::Io { what: "removing a stale copy of", path: path.clone(), source })?;
        std::fs::rename(tmp, fin).map_err(|source| CopyError::Io { what: "moving into place", path: path.clone(), source })?;
        cleanup.0.retain(|p| p != tmp);
        cleanup.0.push(fin.clone());
    }
    registrar.commit(&topo_sort(infos))?;
    cleanup.0.clear();
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(p: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: p.into(),
            deriver: String::new(),
            references: refs.iter().map(|s| s.to_string()).collect(),
            nar_size: 0,
            nar_hash: String::new(),
            ca: String::new(),
            sigs: vec![],
        }
    }

    #[test]
    fn topo_sort_puts_references_first() {
        let sorted = topo_sort(vec![info("a", &["b", "c", "a"]), info("b", &["c", "z"]), info("c", &[])]);
        let order: Vec<_> = sorted.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(order, ["c", "b", "a"]);
    }

    #[test]
    fn to_front_keeps_dependency_order() {
        // d refs c (not marked); b refs a; e refs itself and a path outside.
        let mut v = vec![info("a", &[]), info("c", &[]), info("b", &["a"]), info("d", &["c"]), info("e", &["e", "zz"])];
        let n = to_front(&mut v, &[true, false, true, true, true]);
        let order: Vec<_> = v.iter().map(|i| i.path.as_str()).collect();
        assert_eq!((n, order), (3, vec!["a", "b", "e", "c", "d"]));
        let mut none = vec![info("a", &[]), info("b", &["a"])];
        assert_eq!(to_front(&mut none, &[false, true]), 0, "b's reference stays behind, so b does");
        assert_eq!(none.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn permute_moves_every_element_to_its_place() {
        // new[k] = old[order[k]], for cycles of every length and fixed points
        for order in [vec![], vec![0], vec![1, 0], vec![2, 0, 1], vec![1, 2, 0], vec![0, 3, 1, 2, 4, 6, 5], vec![4, 3, 2, 1, 0]] {
            let old: Vec<usize> = (100..100 + order.len()).collect();
            let mut v = old.clone();
            permute(&mut v, &mut order.clone());
            let want: Vec<usize> = order.iter().map(|&i| old[i]).collect();
            assert_eq!(v, want, "order {order:?}");
        }
        // a pseudo-random permutation of 1,000
        let mut order: Vec<usize> = (0..1000).collect();
        let mut x = 7u64;
        for i in (1..order.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (x >> 33) as usize % (i + 1));
        }
        let mut v: Vec<usize> = (0..1000).collect();
        permute(&mut v, &mut order.clone());
        assert_eq!(v, order);
    }

    #[test]
    fn topo_sort_handles_a_deep_chain() {
        let n = 200_000;
        let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let mut infos: Vec<PathInfo> = names.iter().map(|p| info(p, &[])).collect();
        for i in 0..n - 1 {
            infos[i].references = vec![names[i + 1].clone()];
        }
        let sorted = topo_sort(infos);
        assert_eq!(sorted.len(), n);
        assert_eq!(sorted[0].path, names[n - 1]);
        assert_eq!(sorted[n - 1].path, names[0]);
    }
}
