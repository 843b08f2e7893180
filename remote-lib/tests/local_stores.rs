//! The middle tier: copying, receiving and registering between two
//! throw-away local stores (`nix-store --store DIR`), with a real
//! `nix-store --serve --write` on the "builder" side — no root, no network,
//! no namespaces. Needs `nix-store` on PATH (scripts/install-deps.sh).

#![allow(clippy::unwrap_used)] // a test crate: a failed step is a failed test

use remote_lib::copy::{self, Receive};
use remote_lib::local_store::{LocalServe, LocalStore};
use remote_lib::serve::ServeConn;
use remote_lib::store_path::StorePath;
use remote_lib::transport::{ProcIn, ProcOut, RemoteProcess, StderrTap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn nix_store() -> &'static str {
    let ok = Command::new("nix-store").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "these tests need nix-store on PATH: run scripts/install-deps.sh (Debian: apt-get install nix-bin)");
    "nix-store"
}

/// A throw-away store under a temporary root.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new() -> Store {
        Store { dir: tempfile::tempdir().unwrap() }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn uri(&self) -> String {
        self.root().display().to_string()
    }
    fn local(&self) -> LocalStore {
        LocalStore::from_setting(Some(&self.uri()), nix_store())
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(nix_store());
        c.arg("--store").arg(self.uri());
        c
    }
    /// Adds files with the given contents; returns their store paths.
    fn add(&self, contents: &[String]) -> Vec<String> {
        let src = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let p = src.path().join(format!("f{i}"));
                std::fs::write(&p, c).unwrap();
                p
            })
            .collect();
        let mut out = Vec::new();
        for chunk in files.chunks(500) {
            let o = self.cmd().arg("--add").args(chunk).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            out.extend(String::from_utf8(o.stdout).unwrap().lines().map(str::to_string));
        }
        out
    }
    fn valid(&self, path: &str) -> bool {
        self.cmd().args(["--check-validity", path]).output().unwrap().status.success()
    }
    fn verify(&self, path: &str) -> bool {
        self.cmd().args(["--verify-path", path]).output().unwrap().status.success()
    }
}

/// A `nix-store --serve --write` on the store at `root`, as a builder's.
fn serve(root: &Path) -> (RemoteProcess, ServeConn<ProcOut, ProcIn>) {
    let mut c = Command::new(nix_store());
    c.arg("--store").arg(root).args(["--serve", "--write"]);
    let mut p = RemoteProcess::spawn(c, StderrTap::default()).unwrap();
    p.watch.phase("test", Some(Duration::from_secs(60)));
    let (r, w) = (p.stdout.take().unwrap(), p.stdin.take().unwrap());
    let conn = ServeConn::handshake(r, w).unwrap();
    (p, conn)
}

/// The hook's local `nix-store --serve` on the store at `root`.
fn local_serve(root: &Path) -> LocalServe {
    let l = LocalStore::from_setting(Some(&root.display().to_string()), nix_store());
    l.serve_handshake(l.spawn_serve().unwrap(), Duration::from_secs(60)).unwrap()
}

/// Runs `f` in a thread and fails if it does not end within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("did not finish within {limit:?}: a deadlock?"))
}

#[test]
fn two_thousand_paths_upload_without_deadlock_interactive_and_compressed() {
    for level in [0, 3] {
        let (local, builder) = (Store::new(), Store::new());
        let paths = local.add(&(0..2000).map(|i| format!("input {i} level {level}\n")).collect::<Vec<_>>());
        let (lr, br, ps) = (local.root().to_path_buf(), builder.root().to_path_buf(), paths.clone());
        let sent = within(Duration::from_secs(120), move || {
            let mut ls = local_serve(&lr);
            let ordered = copy::local_infos(&mut ls.1, &ps).unwrap();
            assert_eq!(ordered.len(), 2000);
            if level == 0 {
                let (p, mut remote) = serve(&br);
                let n = copy::upload(&mut ls.1, &mut remote, &ordered).unwrap();
                drop(remote);
                assert!(p.finish().status.unwrap().success());
                n
            } else {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("zstd -d -q -c | nix-store --store '{}' --serve --write", br.display()));
                let mut p = RemoteProcess::spawn(c, StderrTap::default()).unwrap();
                let (w, r) = (p.stdin.take().unwrap(), p.stdout.take().unwrap());
                let moved = copy::upload_bulk(&mut ls.1, w, r, &ordered, level).unwrap();
                assert!(p.finish().status.unwrap().success());
                moved.nar
            }
        });
        assert!(sent > 0);
        for p in [&paths[0], &paths[999], &paths[1999]] {
            assert!(builder.valid(p), "{p} is not valid on the builder (level {level})");
        }
    }
}

fn sp(p: &str) -> StorePath {
    StorePath::parse("/nix/store", p).unwrap()
}

#[test]
fn outputs_download_verified_registered_and_canonical() {
    let builder = Store::new();
    let outs = builder.add(&["output one\n".to_string(), "output two\n".to_string()]);
    let outputs: Vec<StorePath> = outs.iter().map(|p| sp(p)).collect();
    for compressed in [false, true] {
        let local = Store::new();
        let store = local.local();
        let (p, mut remote) = serve(builder.root());
        let infos = copy::remote_infos(&mut remote, "/nix/store", &outputs).unwrap();
        let mut ls = local_serve(local.root());
        copy::check_references(&mut ls.1, &infos).unwrap();
        let into = Receive { local: &store, outputs: &outputs, fixed: &[] };
        let registrar = store.start_registrar().unwrap();
        if compressed {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("nix-store --store '{}' --serve --write | zstd -q -c -3", builder.uri()));
            let mut bulk = RemoteProcess::spawn(c, StderrTap::default()).unwrap();
            let (w, r) = (bulk.stdin.take().unwrap(), bulk.stdout.take().unwrap());
            copy::download_bulk(w, r, infos, &into, registrar, &mut |_| {}).unwrap();
            assert!(bulk.finish().status.unwrap().success());
        } else {
            copy::download(&mut remote, infos, &into, registrar, &mut |_| {}).unwrap();
        }
        drop(remote);
        let _ = p.finish();
        for o in &outs {
            assert!(local.valid(o) && local.verify(o), "{o} not valid and intact (compressed: {compressed})");
            let md = std::fs::symlink_metadata(store.real_path(&sp(o))).unwrap();
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            assert_eq!((md.mtime(), md.permissions().mode() & 0o777), (1, 0o444), "store metadata");
        }
    }
}

#[test]
fn a_failed_registration_leaves_nothing_behind() {
    let (local, builder) = (Store::new(), Store::new());
    let outs = builder.add(&["rolled back\n".to_string()]);
    let outputs: Vec<StorePath> = outs.iter().map(|p| sp(p)).collect();
    local.add(&["something, so that the store exists\n".to_string()]);
    // A nix-store whose registration fails, for this store.
    let fake = local.root().join("failing-nix-store");
    std::fs::write(&fake, "#!/bin/sh\ncat >/dev/null; echo 'error: the database is on fire' >&2; exit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = LocalStore::from_setting(Some(&local.uri()), fake.to_str().unwrap());
    let (p, mut remote) = serve(builder.root());
    let infos = copy::remote_infos(&mut remote, "/nix/store", &outputs).unwrap();
    let into = Receive { local: &store, outputs: &outputs, fixed: &[] };
    let mut temps = Vec::new();
    let err = copy::download(&mut remote, infos, &into, store.start_registrar().unwrap(), &mut |t| temps.push(t.to_path_buf())).unwrap_err();
    drop(remote);
    let _ = p.finish();
    assert!(remote_lib::session::chain(&err).contains("the database is on fire"), "{}", remote_lib::session::chain(&err));
    assert!(!store.real_path(&outputs[0]).exists(), "the output was left on disk");
    assert!(temps.iter().all(|t| !t.exists()), "a temporary was left");
    assert!(!local.valid(&outs[0]));
}

#[test]
fn references_must_be_outputs_or_valid_here() {
    let (local, builder) = (Store::new(), Store::new());
    let outs = builder.add(&["x\n".to_string()]);
    let (p, mut remote) = serve(builder.root());
    let mut infos = copy::remote_infos(&mut remote, "/nix/store", &[sp(&outs[0])]).unwrap();
    drop(remote);
    let _ = p.finish();
    infos[0].references = vec!["/nix/store/00000000000000000000000000000000-elsewhere".into()];
    let mut ls = local_serve(local.root());
    let e = copy::check_references(&mut ls.1, &infos).unwrap_err();
    assert!(e.to_string().contains("rejected") && remote_lib::session::chain(&e).contains("neither an output"), "{}", remote_lib::session::chain(&e));
}
