//! Moving closures between stores over serve sessions: which inputs the
//! builder lacks (one question), uploading them in dependency order as one
//! pipelined stream, and downloading outputs into the local store with every
//! NAR hash and size verified before anything is registered.

use crate::hash::{HashingReader, Sha256Hash};
use crate::local_store::{LocalStore, LocalStoreError, Registrar};
use crate::nar::{self, NarError};
use crate::serve::{PathInfo, ServeConn, ServeError};
use crate::store_path::StorePath;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::PathBuf;

/// What went wrong while copying.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("while talking to the {side}")]
    Serve {
        side: &'static str,
        #[source]
        source: ServeError,
    },
    #[error("'{path}' is not valid in the local store, so it cannot be copied to the builder")]
    MissingLocally { path: String },
    #[error("the builder did not report '{path}' as valid after building it")]
    MissingRemotely { path: String },
    #[error("NAR of '{path}' is corrupt")]
    Nar {
        path: String,
        #[source]
        source: NarError,
    },
    #[error("'{path}': NAR {what} mismatch: expected {expected}, got {got}; nothing was registered")]
    Mismatch { path: String, what: &'static str, expected: String, got: String },
    #[error("'{path}': bad NAR hash '{hash}' from the builder")]
    BadHash { path: String, hash: String },
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

/// Orders `infos` so that every path comes after the paths it references.
pub fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let mut by_path: BTreeMap<String, PathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::with_capacity(by_path.len());
    let keys: Vec<String> = by_path.keys().cloned().collect();
    fn visit(p: &str, by_path: &mut BTreeMap<String, PathInfo>, done: &mut BTreeSet<String>, out: &mut Vec<PathInfo>) {
        if done.contains(p) {
            return;
        }
        done.insert(p.to_string());
        if let Some(info) = by_path.get(p).cloned() {
            for r in &info.references {
                if r != p {
                    visit(r, by_path, done, out);
                }
            }
            out.push(by_path.remove(p).expect("present"));
        }
    }
    for k in keys {
        visit(&k, &mut by_path, &mut done, &mut out);
    }
    out
}

/// Asks the local store for the metadata of `missing` (one question), every
/// one of which must be valid there, in dependency order.
pub fn local_infos<LR: Read, LW: Write>(local: &mut ServeConn<LR, LW>, missing: &[String]) -> Result<Vec<PathInfo>, CopyError> {
    let infos = local.query_path_infos(missing).map_err(|source| CopyError::Serve { side: "local store", source })?;
    if let Some(p) = missing.iter().find(|p| !infos.iter().any(|i| &i.path == *p)) {
        return Err(CopyError::MissingLocally { path: p.clone() });
    }
    Ok(topo_sort(infos))
}

/// Copies the next NAR from the local store's replies to `w`: exactly
/// `info.nar_size` bytes, or an error.
fn copy_nar<LR: Read, LW: Write, W: Write + ?Sized>(local: &mut ServeConn<LR, LW>, info: &PathInfo, w: &mut W) -> Result<u64, CopyError> {
    let got = io::copy(&mut local.reader().take(info.nar_size), w).map_err(|source| CopyError::Io { what: "uploading", path: info.path.clone(), source })?;
    if got != info.nar_size {
        return Err(CopyError::Mismatch { path: info.path.clone(), what: "size", expected: info.nar_size.to_string(), got: got.to_string() });
    }
    Ok(got)
}

/// Asks the local store for all NARs at once; they are then read in order,
/// so the local `nix-store` never waits for us between paths. (Its replies
/// queue in the pipe; we read them as fast as the builder takes them.)
fn request_nars<LR: Read, LW: Write>(local: &mut ServeConn<LR, LW>, ordered: &[PathInfo]) -> Result<(), CopyError> {
    for info in ordered {
        local.send_dump_store_path(&info.path).map_err(|source| CopyError::Serve { side: "local store", source })?;
    }
    local.flush().map_err(|source| CopyError::Serve { side: "local store", source })
}

/// Copies `ordered` (from [`local_infos`]: absent on the builder, in
/// dependency order) from the local store to the builder: every path as
/// `AddToStoreNar` back to back, acknowledgements read at the end. Returns the
/// bytes of NAR sent.
pub fn upload<LR: Read, LW: Write, RR: Read, RW: Write>(
    local: &mut ServeConn<LR, LW>,
    remote: &mut ServeConn<RR, RW>,
    ordered: &[PathInfo],
) -> Result<u64, CopyError> {
    if ordered.is_empty() {
        return Ok(0);
    }
    request_nars(local, ordered)?;
    let mut sent = 0;
    for info in ordered {
        remote.send_add_to_store_nar_header(info).map_err(|source| CopyError::Serve { side: "builder", source })?;
        sent += copy_nar(local, info, remote.writer())?;
    }
    remote.flush().map_err(|source| CopyError::Serve { side: "builder", source })?;
    for _ in ordered {
        remote.read_ack("AddToStoreNar").map_err(|source| CopyError::Serve { side: "builder", source })?;
    }
    Ok(sent)
}

/// Asks the builder for the metadata of `outputs` (one question); every one
/// must be valid there.
pub fn remote_infos<RR: Read, RW: Write>(remote: &mut ServeConn<RR, RW>, outputs: &[StorePath]) -> Result<Vec<PathInfo>, CopyError> {
    let names: Vec<String> = outputs.iter().map(|p| p.to_string()).collect();
    let infos = remote.query_path_infos(&names).map_err(|source| CopyError::Serve { side: "builder", source })?;
    for p in &names {
        if !infos.iter().any(|i| &i.path == p) {
            return Err(CopyError::MissingRemotely { path: p.clone() });
        }
    }
    Ok(infos)
}

/// Downloads `outputs` over the interactive session: metadata in one
/// question, NAR requests pipelined, then [`receive_nars`]. Returns the NAR
/// bytes received.
pub fn download<RR: Read, RW: Write>(
    remote: &mut ServeConn<RR, RW>,
    local: &LocalStore,
    outputs: &[StorePath],
    registrar: Registrar,
    on_temp: &mut dyn FnMut(&std::path::Path),
) -> Result<u64, CopyError> {
    if outputs.is_empty() {
        return Ok(0);
    }
    let infos = remote_infos(remote, outputs)?;
    for i in &infos {
        remote.send_dump_store_path(&i.path).map_err(|source| CopyError::Serve { side: "builder", source })?;
    }
    remote.flush().map_err(|source| CopyError::Serve { side: "builder", source })?;
    receive_nars(remote.reader(), infos, outputs, local, registrar, on_temp)
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
/// zstd-compressed (`nix-store --serve --write | zstd` on the builder): all
/// `DumpStorePath` requests are written and the input closed, then the
/// decompressed replies go through [`receive_nars`]. `infos` come from
/// [`remote_infos`] on the interactive session.
pub fn download_bulk<W: Write, R: Read>(
    mut requests: W,
    replies: R,
    infos: Vec<PathInfo>,
    local: &LocalStore,
    outputs: &[StorePath],
    registrar: Registrar,
    on_temp: &mut dyn FnMut(&std::path::Path),
) -> Result<Moved, CopyError> {
    let bulk = |source| CopyError::Serve { side: "builder (bulk session)", source };
    let io = |source: io::Error| bulk(ServeError::Io { during: "sending requests", source });
    crate::serve::write_client_hello(&mut requests).map_err(io)?;
    for i in &infos {
        crate::serve::write_dump_store_path(&mut requests, &i.path).map_err(io)?;
    }
    requests.flush().map_err(io)?;
    drop(requests);
    let mut wire = Counter { inner: replies, count: 0 };
    let dec = zstd::stream::read::Decoder::new(&mut wire).map_err(|e| bulk(ServeError::Io { during: "starting zstd", source: e }))?;
    let mut dec = io::BufReader::with_capacity(256 * 1024, dec);
    crate::serve::read_server_hello(&mut dec).map_err(bulk)?;
    let nar = receive_nars(&mut dec, infos, outputs, local, registrar, on_temp)?;
    drop(dec);
    Ok(Moved { nar, wire: wire.count })
}

/// Uploads `ordered` (as for [`upload`]) over a one-directional bulk session whose requests are
/// zstd-compressed at `level` (`zstd -d | nix-store --serve --write` on the
/// builder): handshake, every `AddToStoreNar` with its NAR in dependency
/// order, end of stream; then the server's raw handshake and one
/// acknowledgement per path. The builder's Nix verifies every NAR's hash and
/// size before it registers the path.
pub fn upload_bulk<LR: Read, LW: Write, W: Write, R: Read + Send + 'static>(
    local: &mut ServeConn<LR, LW>,
    requests: W,
    replies: R,
    ordered: &[PathInfo],
    level: i32,
) -> Result<Moved, CopyError> {
    if ordered.is_empty() {
        return Ok(Moved::default());
    }
    let n = ordered.len();
    // Replies are read concurrently, so neither side can block on a full pipe.
    let reader = std::thread::spawn(move || -> Result<(), ServeError> {
        let mut r = io::BufReader::new(replies);
        crate::serve::read_server_hello(&mut r)?;
        for _ in 0..n {
            crate::serve::read_ack(&mut r, "AddToStoreNar")?;
        }
        Ok(())
    });
    let bulk = |source| CopyError::Serve { side: "builder (bulk session)", source };
    let io = |source: io::Error| bulk(ServeError::Io { during: "sending paths", source });
    let mut wire = Counter { inner: requests, count: 0 };
    let mut sent = 0;
    let res = (|| -> Result<(), CopyError> {
        let mut enc = zstd::stream::write::Encoder::new(&mut wire, level).map_err(io)?;
        crate::serve::write_client_hello(&mut enc).map_err(io)?;
        request_nars(local, ordered)?;
        for info in ordered {
            crate::serve::write_add_to_store_nar_header(&mut enc, info).map_err(io)?;
            sent += copy_nar(local, info, &mut enc)?;
        }
        enc.finish().map_err(io)?.flush().map_err(io)
    })();
    let wire_bytes = wire.count;
    drop(wire); // end of stream: the builder's zstd and nix-store finish
    let acks = reader.join().unwrap_or(Err(ServeError::Closed { during: "AddToStoreNar" }));
    // An error on the builder shows up on both sides; its reply is the better message.
    acks.map_err(bulk)?;
    res?;
    Ok(Moved { nar: sent, wire: wire_bytes })
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

/// Receives one NAR per `infos` entry from `r`, in order: each is unpacked to
/// a temporary name while being hashed, checked against the builder's hash and
/// size, moved into place, and then all are registered in one transaction. On
/// any error nothing is registered and nothing is left behind. `on_temp` is
/// told each temporary path (so a signal handler can remove it).
pub fn receive_nars<R: Read>(
    r: &mut R,
    infos: Vec<PathInfo>,
    outputs: &[StorePath],
    local: &LocalStore,
    registrar: Registrar,
    on_temp: &mut dyn FnMut(&std::path::Path),
) -> Result<u64, CopyError> {
    let mut cleanup = Cleanup(Vec::new());
    let mut finals = Vec::new();
    let mut received = 0;
    for info in &infos {
        let sp = outputs.iter().find(|p| p.as_str() == info.path).ok_or_else(|| CopyError::MissingRemotely { path: info.path.clone() })?;
        let final_path = local.real_path(sp);
        let tmp = final_path.with_file_name(format!(".{}.build-hook-{}", sp.base_name(), std::process::id()));
        let _ = nar::remove_tree(&tmp);
        on_temp(&tmp);
        cleanup.0.push(tmp.clone());
        let mut hr = HashingReader::new(&mut *r);
        let res = nar::restore(&mut hr, &tmp);
        let (hash, size, _) = hr.finish();
        res.map_err(|source| CopyError::Nar { path: info.path.clone(), source })?;
        let expected = Sha256Hash::parse(&info.nar_hash).map_err(|_| CopyError::BadHash { path: info.path.clone(), hash: info.nar_hash.clone() })?;
        if size != info.nar_size {
            return Err(CopyError::Mismatch { path: info.path.clone(), what: "size", expected: info.nar_size.to_string(), got: size.to_string() });
        }
        if hash != expected {
            return Err(CopyError::Mismatch { path: info.path.clone(), what: "hash", expected: expected.to_nix32_prefixed(), got: hash.to_nix32_prefixed() });
        }
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
    let infos: Vec<PathInfo> = infos
        .into_iter()
        .map(|mut i| {
            // Registration wants the hash in a form --hash-given parses.
            i.nar_hash = Sha256Hash::parse(&i.nar_hash).map(|h| h.to_nix32_prefixed()).unwrap_or(i.nar_hash);
            i
        })
        .collect();
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
}
