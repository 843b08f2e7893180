//! The local store as the hook sees it: where it lives on disk (including a
//! `local?root=` chroot store), reading `.drv` files, path metadata and
//! validity read from its database ([`StoreDb`], read-only) when it is on
//! this disk, else from a local `nix-store --serve`, and registering
//! downloaded outputs.
//!
//! Reading the database costs no process: a `nix-store` start is about
//! 20 ms here, and several at once on a loaded machine were 40–110 ms on the
//! critical path of every build. Nix keeps the database in WAL mode, so a
//! reader runs alongside its writers.
//!
//! Outputs are registered with `nix-store --load-db`, which takes the same
//! lines as `--register-validity --hash-given` and, like it, no path lock:
//! the parent Nix holds the output locks while the hook runs, so
//! `nix-store --import` would deadlock on Nix 2.29+ (no `NIX_HELD_LOCKS`).
//! Unlike `--register-validity`, it does not look at the paths through their
//! logical names, so it also works for a store under another root
//! (`local?root=`); we set the metadata Nix would have set
//! ([`canonicalise`]) and verify every NAR hash and size ourselves before
//! anything is registered.

use crate::derivation::{Derivation, DerivationError};
use crate::serve::{PathInfo, ServeConn, ServeError};
use crate::store_path::StorePath;
use crate::transport::{ProcIn, ProcOut, RemoteProcess, StderrTap, TransportError};
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A problem with the local store.
#[derive(Debug, thiserror::Error)]
pub enum LocalStoreError {
    #[error("cannot read derivation '{path}'")]
    ReadDrv {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read derivation '{path}' through 'nix-store --store {store} --dump': {why}")]
    DumpDrv { path: String, store: String, why: String },
    #[error(transparent)]
    Drv(#[from] DerivationError),
    #[error("cannot start the local 'nix-store --serve'")]
    Spawn(#[source] TransportError),
    #[error("the local 'nix-store --serve' failed: {stderr}")]
    Serve {
        stderr: String,
        #[source]
        source: ServeError,
    },
    #[error("registering {paths} with 'nix-store --load-db' failed: {stderr}")]
    Register { paths: String, stderr: String },
    #[error("cannot run 'nix-store --load-db'")]
    RegisterIo(#[source] io::Error),
    #[error("recording where {drv_hash}'s outputs are (its realisations) in '{db}' failed")]
    Realisation {
        drv_hash: String,
        db: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("'{drv_hash}!{output}' is already realised here as '{have}', not as '{got}' which the builder built; the two builds differ (the derivation is not reproducible)")]
    RealisationConflict { drv_hash: String, output: String, have: String, got: String },
    #[error("cannot read path metadata from the store database '{db}'")]
    Db {
        db: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the store database '{db}' has '{path}' with {why}")]
    DbEntry { db: PathBuf, path: String, why: String },
    #[error("the store '{store}' is not on this machine's disk, so its database cannot be read here")]
    NotOnDisk { store: String },
    #[error("registered {paths}, but recording their content address and signatures in '{db}' failed (the paths are valid without them)")]
    Metadata {
        paths: String,
        db: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// The local store.
#[derive(Clone, Debug)]
pub struct LocalStore {
    /// The logical store directory (`/nix/store`).
    pub store_dir: String,
    /// Where `/` of the store lives (`/` or the chroot root).
    pub root: PathBuf,
    /// The state directory (its database, the load directory of a local store).
    state_dir: PathBuf,
    /// The `store` setting to pass as `--store`, if not the default.
    pub store_uri: Option<String>,
    /// The `nix-store` program.
    pub nix_store: String,
}

/// A local `nix-store --serve` session.
pub type LocalServe = (RemoteProcess, ServeConn<ProcOut, ProcIn>);

/// The store and state directories that apply when the `store` setting does
/// not name them (Nix's `NIX_STORE_DIR` and `NIX_STATE_DIR`).
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub store_dir: Option<String>,
    pub state_dir: Option<PathBuf>,
}

impl LocalStore {
    /// From the `store` setting with Nix's default directories.
    pub fn from_setting(store: Option<&str>, nix_store: &str) -> Self {
        Self::new(store, nix_store, &Defaults::default())
    }

    /// From the `store` setting, as Nix opens a local store: `local?root=R`
    /// (or `R` itself when it is a path) puts the store under R; `store=`
    /// and `state=` parameters name the logical store and state directories;
    /// otherwise `defaults` (the environment), then `/nix/store` and
    /// `/nix/var/nix` (under R when there is one).
    pub fn new(store: Option<&str>, nix_store: &str, defaults: &Defaults) -> Self {
        let mut root: Option<PathBuf> = None;
        let (mut store_dir, mut state) = (None, None);
        if let Some(s) = store {
            let (base, query) = s.split_once('?').unwrap_or((s, ""));
            // Nix 2.2x+ prints `--store /dir` as `local:///dir`.
            let base = base.strip_prefix("local://").unwrap_or(base);
            if base.starts_with('/') {
                root = Some(PathBuf::from(base));
            }
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("root", r)) => root = Some(PathBuf::from(r)),
                    Some(("store", d)) => store_dir = Some(d.to_string()),
                    Some(("state", d)) => state = Some(PathBuf::from(d)),
                    _ => {}
                }
            }
        }
        let store_dir = store_dir.or_else(|| defaults.store_dir.clone()).unwrap_or_else(|| "/nix/store".into());
        let state_dir = match (state, &root) {
            (Some(s), _) => s,
            (None, Some(r)) => r.join("nix/var/nix"),
            (None, None) => defaults.state_dir.clone().unwrap_or_else(|| "/nix/var/nix".into()),
        };
        LocalStore { store_dir, root: root.unwrap_or_else(|| PathBuf::from("/")), state_dir, store_uri: store.map(str::to_string), nix_store: nix_store.into() }
    }

    /// Where a store path is on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.root.join(p.as_str().trim_start_matches('/'))
    }

    /// The state directory (`/nix/var/nix`, or under the chroot root).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone()
    }

    /// Whether the store's files and database are on this machine (a local
    /// or daemon store), so that outputs can be unpacked and registered here.
    /// Other stores (a binary cache such as `file://…`) are reached only
    /// through `nix-store --store URI`.
    pub fn on_disk(&self) -> bool {
        self.store_uri.as_deref().is_none_or(crate::machines::is_local_store_uri)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.nix_store);
        if let Some(s) = &self.store_uri {
            c.arg("--store").arg(s);
        }
        c
    }

    /// Reads and parses a `.drv`: from disk, or through the store when it is
    /// not on this machine's disk.
    pub fn read_drv(&self, drv: &StorePath) -> Result<Derivation, LocalStoreError> {
        let text =
            if self.on_disk() { std::fs::read(self.real_path(drv)).map_err(|source| LocalStoreError::ReadDrv { path: drv.to_string(), source })? } else { self.dump_file(drv)? };
        Ok(Derivation::parse(drv.as_str(), &text)?)
    }

    /// The contents of a store path that is one regular file, through the
    /// store's own `nix-store --serve` (its size asked first, and bounded: a
    /// `.drv` is small).
    fn dump_file(&self, p: &StorePath) -> Result<Vec<u8>, LocalStoreError> {
        const MAX: u64 = 64 << 20;
        const LIMIT: Duration = Duration::from_secs(300);
        let fail = |why: String| LocalStoreError::DumpDrv { path: p.to_string(), store: self.store_uri.clone().unwrap_or_default(), why };
        let (proc, mut conn) = self.serve_handshake(self.spawn_serve()?, LIMIT)?;
        proc.watch.phase("reading a derivation", Some(LIMIT));
        let res = (|| -> Result<Vec<u8>, String> {
            let info = conn.query_path_infos(&[p.to_string()]).map_err(|e| e.to_string())?;
            let size = match info.first() {
                Some(i) if i.path == p.as_str() => i.nar_size,
                _ => return Err("the store does not have it".into()),
            };
            if size > MAX {
                return Err(format!("its archive is {size} bytes, more than a derivation can be"));
            }
            conn.send_dump_store_path(p.as_str()).and_then(|_| conn.flush()).map_err(|e| e.to_string())?;
            let mut nar = Vec::new();
            io::Read::read_to_end(&mut io::Read::take(conn.reader(), size), &mut nar).map_err(|e| e.to_string())?;
            if nar.len() as u64 != size {
                return Err("the archive ended early".into());
            }
            crate::nar::single_file(&nar).map_err(|e| e.to_string())
        })();
        drop(conn);
        let ended = proc.finish();
        res.map_err(|why| fail(if ended.tail.is_empty() { why } else { format!("{why}: {}", ended.tail) }))
    }

    /// Starts the local `nix-store --serve` (read-only for a store on disk;
    /// `--write` otherwise, since outputs are then imported through it); the
    /// handshake happens in [`LocalStore::serve_handshake`], so the process
    /// can start up meanwhile.
    pub fn spawn_serve(&self) -> Result<RemoteProcess, LocalStoreError> {
        let mut c = self.command();
        c.arg("--serve");
        if !self.on_disk() {
            c.arg("--write");
        }
        RemoteProcess::spawn(c, StderrTap::default()).map_err(LocalStoreError::Spawn)
    }

    /// Completes a session started by [`LocalStore::spawn_serve`]; the
    /// handshake may take at most `limit`. The session is then idle (no
    /// limit) until its user sets a phase.
    pub fn serve_handshake(&self, mut p: RemoteProcess, limit: Duration) -> Result<LocalServe, LocalStoreError> {
        p.watch.phase("the local nix-store --serve", Some(limit));
        let (Some(r), Some(w)) = (p.stdout.take(), p.stdin.take()) else {
            return Err(LocalStoreError::Serve { stderr: p.kill().tail, source: ServeError::Closed { during: "the handshake" } });
        };
        match ServeConn::handshake(r, w) {
            Ok(conn) => {
                p.watch.phase("idle", None);
                Ok((p, conn))
            }
            Err(source) => Err(LocalStoreError::Serve { stderr: p.kill().tail, source }),
        }
    }

    /// Where the store's database is.
    fn db_path(&self) -> PathBuf {
        self.state_dir.join("db/db.sqlite")
    }

    /// The store's database (`<state>/db/db.sqlite`), opened read-only for
    /// [`StoreDb::query_valid`] and [`StoreDb::query_path_infos`]; only for a
    /// store [on this disk](LocalStore::on_disk). Fails at once, not at the
    /// first question, when the file cannot be read or is not a Nix store
    /// database.
    pub fn open_db(&self) -> Result<StoreDb, LocalStoreError> {
        if !self.on_disk() {
            return Err(LocalStoreError::NotOnDisk { store: self.store_uri.clone().unwrap_or_default() });
        }
        let path = self.db_path();
        let sql = |source| LocalStoreError::Db { db: path.clone(), source };
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(&path, flags).map_err(sql)?;
        conn.busy_timeout(DB_BUSY).map_err(sql)?;
        // SQLite's page cache is 2 MB by default, filled by a closure of
        // tens of thousands of paths looked up once each; the pages it would
        // keep are in the kernel's cache anyway. The index's upper levels fit.
        conn.pragma_update(None, "cache_size", -512).map_err(sql)?;
        // Reads the schema (a shared lock, and the WAL index): the columns
        // asked for later exist in every Nix 2.x and Lix schema.
        conn.prepare_cached(PATH_INFO_SQL).map_err(sql)?;
        conn.prepare_cached(REFS_SQL).map_err(sql)?;
        Ok(StoreDb { conn, path })
    }

    /// Starts `nix-store --load-db` ahead of time. It
    /// registers nothing until [`Registrar::commit`] closes its input, and a
    /// registrar dropped without commit is killed, so nothing is registered.
    pub fn start_registrar(&self) -> Result<Registrar, LocalStoreError> {
        let mut c = self.command();
        c.arg("--load-db");
        let db = self.db_path();
        Ok(Registrar { proc: Some(RemoteProcess::spawn(c, StderrTap::default()).map_err(LocalStoreError::Spawn)?), db })
    }
}

impl LocalStore {
    /// Records the realisations of a content-addressed derivation's outputs
    /// (`drv_hash` is `sha256:<base16>` of its hash modulo) in the store's
    /// database, as Nix's `registerDrvOutput` does: one transaction, each
    /// path already valid; an output already realised at the same path is
    /// left as it is, at another path is an error.
    pub fn register_realisations(&self, drv_hash: &str, outputs: &[(String, StorePath)]) -> Result<(), LocalStoreError> {
        let db = self.db_path();
        let sql = |source| LocalStoreError::Realisation { drv_hash: drv_hash.to_string(), db: db.clone(), source };
        let mut conn = open_for_writing(&db).map_err(sql)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql)?;
        for (name, path) in outputs {
            let have: Option<String> = {
                let mut q = tx.prepare("SELECT v.path FROM Realisations r JOIN ValidPaths v ON v.id = r.outputPath WHERE r.drvPath = ?1 AND r.outputName = ?2").map_err(sql)?;
                let mut rows = q.query(rusqlite::params![drv_hash, name]).map_err(sql)?;
                match rows.next().map_err(sql)? {
                    Some(row) => Some(row.get(0).map_err(sql)?),
                    None => None,
                }
            };
            match have {
                Some(h) if h == path.as_str() => continue,
                Some(h) => return Err(LocalStoreError::RealisationConflict { drv_hash: drv_hash.into(), output: name.clone(), have: h, got: path.to_string() }),
                None => {
                    tx.execute(
                        "INSERT INTO Realisations (drvPath, outputName, outputPath, signatures) VALUES (?1, ?2, (SELECT id FROM ValidPaths WHERE path = ?3), '')",
                        rusqlite::params![drv_hash, name, path.as_str()],
                    )
                    .map_err(sql)?;
                }
            }
        }
        tx.commit().map_err(sql)
    }
}

/// How long a question to the database may wait for a lock. Readers of a
/// WAL database wait only while Nix recovers it or holds it exclusively.
const DB_BUSY: Duration = Duration::from_secs(60);

/// One path's row, as Nix's `queryPathInfo` reads it.
const PATH_INFO_SQL: &str = "SELECT id, hash, deriver, narSize, sigs, ca FROM ValidPaths WHERE path = ?1";
/// Its references, sorted as the serve protocol sends them (a `StorePathSet`).
const REFS_SQL: &str = "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?1 ORDER BY v.path";

/// The local store's database, open read-only (see [`LocalStore::open_db`]):
/// path metadata and validity without a `nix-store` process. Each question
/// is one read transaction, so it sees one state of the store.
pub struct StoreDb {
    conn: rusqlite::Connection,
    path: PathBuf,
}

impl StoreDb {
    fn sql(&self) -> impl Fn(rusqlite::Error) -> LocalStoreError + '_ {
        |source| LocalStoreError::Db { db: self.path.clone(), source }
    }

    /// Those of `paths` that are valid, in the order asked (`QueryValidPaths`
    /// without locking or substitution).
    pub fn query_valid(&self, paths: &[String]) -> Result<Vec<String>, LocalStoreError> {
        let sql = self.sql();
        let tx = self.conn.unchecked_transaction().map_err(&sql)?;
        let mut q = tx.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1").map_err(&sql)?;
        let mut out = Vec::new();
        for p in paths {
            if q.exists([p]).map_err(&sql)? {
                out.push(p.clone());
            }
        }
        Ok(out)
    }

    /// The metadata of those of `paths` that are valid, in the order asked,
    /// as a local `nix-store --serve` answers `QueryPathInfos`: the NAR hash
    /// as `sha256:<nix32>` (the database has `sha256:<base16>`), references
    /// sorted, signatures sorted and without repeats, no deriver as "".
    pub fn query_path_infos<S: AsRef<str>>(&self, paths: &[S]) -> Result<Vec<PathInfo>, LocalStoreError> {
        let sql = self.sql();
        let bad = |path: &str, why: String| LocalStoreError::DbEntry { db: self.path.clone(), path: path.to_string(), why };
        let tx = self.conn.unchecked_transaction().map_err(&sql)?;
        let mut info = tx.prepare_cached(PATH_INFO_SQL).map_err(&sql)?;
        let mut refs = tx.prepare_cached(REFS_SQL).map_err(&sql)?;
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let p = p.as_ref();
            use rusqlite::OptionalExtension;
            type Row = (i64, String, Option<String>, Option<i64>, Option<String>, Option<String>);
            let row: Option<Row> = info.query_row([p], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))).optional().map_err(&sql)?;
            let Some((id, hash, deriver, nar_size, sigs, ca)) = row else { continue };
            let nar_hash =
                crate::hash::Sha256Hash::parse(&hash).map_err(|_| bad(p, format!("NAR hash '{}', which is not 'sha256:' and base16 as Nix writes it", hash.escape_debug())))?;
            let nar_size = match nar_size {
                Some(n) if n > 0 => n as u64,
                _ => return Err(bad(p, "no NAR size".into())),
            };
            let references = refs.query_map([id], |r| r.get::<_, String>(0)).map_err(&sql)?.collect::<Result<Vec<_>, _>>().map_err(&sql)?;
            let sigs: std::collections::BTreeSet<&str> = sigs.as_deref().unwrap_or("").split(' ').filter(|s| !s.is_empty()).collect();
            out.push(PathInfo {
                path: p.to_string(),
                deriver: deriver.unwrap_or_default(),
                references,
                nar_size,
                nar_hash: nar_hash.to_nix32_prefixed(),
                ca: ca.unwrap_or_default(),
                sigs: sigs.into_iter().map(str::to_string).collect(),
            });
        }
        Ok(out)
    }
}

/// A waiting `nix-store --load-db` (see [`LocalStore::start_registrar`]).
pub struct Registrar {
    proc: Option<RemoteProcess>,
    /// The store's database, for what `--load-db` cannot take.
    db: PathBuf,
}

/// How long registration may take without a sign of life.
const REGISTER_LIMIT: Duration = Duration::from_secs(600);

impl Registrar {
    /// Sends `infos` and waits for the registration, one transaction. `infos`
    /// must be checked ([`crate::path_info::check`]: no newline can reach
    /// this line format) and closed under references together with what is
    /// already valid.
    pub fn commit(mut self, infos: &[PathInfo]) -> Result<(), LocalStoreError> {
        let mut input = String::new();
        for i in infos {
            input.push_str(&format!("{}\n{}\n{}\n{}\n{}\n", i.path, i.nar_hash, i.nar_size, i.deriver, i.references.len()));
            for r in &i.references {
                input.push_str(r);
                input.push('\n');
            }
        }
        let Some(mut proc) = self.proc.take() else { return Err(LocalStoreError::RegisterIo(io::Error::other("already committed"))) };
        proc.watch.phase("registering outputs", Some(REGISTER_LIMIT));
        let w = match proc.stdin.take() {
            Some(mut stdin) => stdin.write_all(input.as_bytes()),
            None => Err(io::Error::other("no input pipe")),
        };
        let ended = proc.finish();
        let paths = || infos.iter().map(|i| i.path.as_str()).collect::<Vec<_>>().join(", ");
        if !ended.status.is_some_and(|s| s.success()) || ended.stalled.is_some() {
            return Err(LocalStoreError::Register { paths: paths(), stderr: ended.tail });
        }
        w.map_err(LocalStoreError::RegisterIo)?;
        let extra: Vec<&PathInfo> = infos.iter().filter(|i| !i.ca.is_empty() || !i.sigs.is_empty()).collect();
        if !extra.is_empty() {
            record_metadata(&self.db, &extra).map_err(|source| LocalStoreError::Metadata { paths: paths(), db: self.db.clone(), source })?;
        }
        Ok(())
    }
}

/// The store's database opened to write. Every write here goes in an
/// IMMEDIATE transaction: the write lock is taken (waiting up to
/// [`DB_BUSY`]; Nix holds it only for short transactions) before the first
/// read. A deferred transaction that reads and then writes fails at once
/// with "database is locked" when another process committed in between (in
/// WAL mode a stale snapshot cannot become a writer), as two hooks recording
/// realisations at the same moment did.
fn open_for_writing(db: &std::path::Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(DB_BUSY)?;
    Ok(conn)
}

/// Records content addresses and signatures, which the registration line
/// format has no room for, in the store's database (the `ca` and `sigs`
/// columns of `ValidPaths`, present in every Nix 2.x and Lix schema), in one
/// transaction. Each path must have been registered just before.
fn record_metadata(db: &std::path::Path, infos: &[&PathInfo]) -> Result<(), rusqlite::Error> {
    let mut conn = open_for_writing(db)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for i in infos {
        let ca = (!i.ca.is_empty()).then_some(i.ca.as_str());
        let sigs = (!i.sigs.is_empty()).then(|| i.sigs.join(" "));
        let n = tx.execute("UPDATE ValidPaths SET ca = ?1, sigs = ?2 WHERE path = ?3", rusqlite::params![ca, sigs, i.path])?;
        if n != 1 {
            return Err(rusqlite::Error::QueryReturnedNoRows);
        }
    }
    tx.commit()
}

impl Drop for Registrar {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            // Killed before its input was closed: it has registered nothing.
            let _ = p.kill();
        }
    }
}

/// Gives an unpacked tree the metadata of a store path: every entry's
/// modification time is 1 (the Unix epoch plus one second), as Nix sets it;
/// permissions were set when the NAR was unpacked. Children before parents,
/// so that setting a child's time does not change its directory's again.
pub fn canonicalise(p: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let md = std::fs::symlink_metadata(p)?;
    if md.is_dir() {
        for e in std::fs::read_dir(p)? {
            canonicalise(&e?.path())?;
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let t = libc::timespec { tv_sec: 1, tv_nsec: 0 };
    let times = [t, t];
    // SAFETY: a valid NUL-terminated path and two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chroot_store_settings() {
        let s = LocalStore::from_setting(Some("local?root=/tmp/st"), "nix-store");
        assert_eq!(s.root, PathBuf::from("/tmp/st"));
        assert_eq!(s.state_dir(), PathBuf::from("/tmp/st/nix/var/nix"));
        let p = StorePath::parse("/nix/store", "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top").unwrap();
        assert_eq!(s.real_path(&p), PathBuf::from("/tmp/st/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top"));
        let d = LocalStore::from_setting(None, "nix-store");
        assert_eq!(d.state_dir(), PathBuf::from("/nix/var/nix"));
        assert_eq!(LocalStore::from_setting(Some("/tmp/x"), "nix-store").root, PathBuf::from("/tmp/x"));
        assert_eq!(LocalStore::from_setting(Some("local:///tmp/x"), "nix-store").root, PathBuf::from("/tmp/x"), "as Nix 2.34 passes --store /tmp/x");
        assert_eq!(LocalStore::from_setting(Some("local://"), "nix-store").root, PathBuf::from("/"));
    }

    #[test]
    fn store_and_state_directories_as_nix_opens_them() {
        let env = Defaults { store_dir: Some("/t/store".into()), state_dir: Some("/t/var/nix".into()) };
        let d = LocalStore::new(None, "nix-store", &env);
        assert_eq!((d.store_dir.as_str(), d.state_dir()), ("/t/store", PathBuf::from("/t/var/nix")));
        let l = LocalStore::new(Some("local"), "nix-store", &env);
        assert_eq!(l.state_dir(), PathBuf::from("/t/var/nix"), "no root: the environment's state directory");
        let r = LocalStore::new(Some("local?root=/r"), "nix-store", &env);
        assert_eq!((r.store_dir.as_str(), r.state_dir()), ("/t/store", PathBuf::from("/r/nix/var/nix")));
        let q = LocalStore::new(Some("local?root=/r&store=/s&state=/st"), "nix-store", &env);
        assert!(q.on_disk() && d.on_disk() && l.on_disk() && LocalStore::new(Some("daemon"), "nix-store", &env).on_disk());
        let cache = LocalStore::new(Some("file:///tmp/cache?compression=none"), "nix-store", &env);
        assert!(!cache.on_disk());
        assert_eq!(cache.state_dir(), PathBuf::from("/t/var/nix"), "the load directory stays the environment's");
        assert_eq!((q.store_dir.as_str(), q.state_dir()), ("/s", PathBuf::from("/st")));
        let p = StorePath::parse("/s", "/s/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top").unwrap();
        assert_eq!(q.real_path(&p), PathBuf::from("/r/s/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top"));
    }
}
