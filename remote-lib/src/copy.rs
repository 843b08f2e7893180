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
    #[error("{side}: {source}")]
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

/// Copies `missing` (already known to be absent on the builder) from the local
/// store to the builder: one metadata question locally, then every path as
/// `AddToStoreNar` back to back, acknowledgements read at the end. Returns the
/// bytes of NAR sent.
pub fn upload<LR: Read, LW: Write, RR: Read, RW: Write>(
    local: &mut ServeConn<LR, LW>,
    remote: &mut ServeConn<RR, RW>,
    missing: &[String],
) -> Result<u64, CopyError> {
    if missing.is_empty() {
        return Ok(0);
    }
    let infos = local.query_path_infos(missing).map_err(|source| CopyError::Serve { side: "local store", source })?;
    if let Some(p) = missing.iter().find(|p| !infos.iter().any(|i| &i.path == *p)) {
        return Err(CopyError::MissingLocally { path: p.clone() });
    }
    let ordered = topo_sort(infos);
    let mut sent = 0;
    for info in &ordered {
        remote.send_add_to_store_nar_header(info).map_err(|source| CopyError::Serve { side: "builder", source })?;
        local.send_dump_store_path(&info.path).map_err(|source| CopyError::Serve { side: "local store", source })?;
        local.flush().map_err(|source| CopyError::Serve { side: "local store", source })?;
        let mut nar = local.reader().take(info.nar_size);
        let n = io::copy(&mut nar, remote.writer()).map_err(|source| CopyError::Io { what: "uploading", path: info.path.clone(), source })?;
        if n != info.nar_size {
            return Err(CopyError::Mismatch { path: info.path.clone(), what: "size", expected: info.nar_size.to_string(), got: n.to_string() });
        }
        sent += n;
    }
    remote.flush().map_err(|source| CopyError::Serve { side: "builder", source })?;
    for _ in &ordered {
        remote.read_ack("AddToStoreNar").map_err(|source| CopyError::Serve { side: "builder", source })?;
    }
    Ok(sent)
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

/// Downloads `outputs` from the builder into the local store: metadata in one
/// question, NAR requests pipelined, each NAR unpacked to a temporary name
/// while being hashed, checked against the builder's hash and size, moved into
/// place, and then all registered in one transaction. On any error nothing is
/// registered and nothing is left behind. `registrar` is a registration
/// process started ahead of time; `on_temp` is told each temporary path (so a
/// signal handler can remove it).
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
    let names: Vec<String> = outputs.iter().map(|p| p.to_string()).collect();
    let infos = remote.query_path_infos(&names).map_err(|source| CopyError::Serve { side: "builder", source })?;
    for p in &names {
        if !infos.iter().any(|i| &i.path == p) {
            return Err(CopyError::MissingRemotely { path: p.clone() });
        }
    }
    for i in &infos {
        remote.send_dump_store_path(&i.path).map_err(|source| CopyError::Serve { side: "builder", source })?;
    }
    remote.flush().map_err(|source| CopyError::Serve { side: "builder", source })?;
    let mut cleanup = Cleanup(Vec::new());
    let mut finals = Vec::new();
    let mut received = 0;
    for info in &infos {
        let sp = outputs.iter().find(|p| p.as_str() == info.path).expect("asked for it");
        let final_path = local.real_path(sp);
        let tmp = final_path.with_file_name(format!(".{}.build-hook-{}", sp.base_name(), std::process::id()));
        let _ = nar::remove_tree(&tmp);
        on_temp(&tmp);
        cleanup.0.push(tmp.clone());
        let mut hr = HashingReader::new(remote.reader());
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
    let infos: Vec<PathInfo> = infos.into_iter().map(|mut i| {
        // Registration wants the hash in a form --hash-given parses.
        i.nar_hash = Sha256Hash::parse(&i.nar_hash).map(|h| h.to_nix32_prefixed()).unwrap_or(i.nar_hash);
        i
    }).collect();
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
