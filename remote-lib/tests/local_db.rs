//! A store on this disk read without a `nix-store` process: path metadata
//! and validity from its database ([`StoreDb`]) must be what a local
//! `nix-store --serve` answers, and NARs written from its files
//! ([`DiskNars`]) what `nix-store --dump` writes. Throw-away stores under
//! temporary roots, as in `local_stores.rs`.

mod common;

use common::*;
use remote_lib::copy::{self, CopyError, DiskNars, NarSource, PathMeta};
use remote_lib::local_store::LocalStore;
use remote_lib::serve::PathInfo;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Builds `drv` in the store at `root` (chrooted, as every build in a store
/// under another root) and returns its output.
fn realise(s: &Scratch, root: &Path, drv: &str) -> String {
    let out = Command::new(builder_program(s)).arg("--store").arg(root).args(["-r", drv]).output().expect("running nix-store -r");
    assert!(out.status.success(), "building {drv} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// Signs `path` in the store at `root` with a new key named `name`.
fn sign(s: &Scratch, root: &Path, path: &str, name: &str) {
    let (sk, pk) = (s.path().join(format!("{name}.sec")), s.path().join(format!("{name}.pub")));
    let ok = Command::new("nix-store").arg("--generate-binary-cache-key").arg(name).arg(&sk).arg(&pk).status().expect("nix-store");
    assert!(ok.success());
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "store", "sign", "--store"])
        .arg(root)
        .arg("--key-file")
        .arg(&sk)
        .arg(path)
        .output()
        .expect("running nix store sign");
    assert!(out.status.success(), "nix store sign: {}", String::from_utf8_lossy(&out.stderr));
}

/// `nix-store --dump` of `path` in the store at `root` (its files: with
/// `--store`, Nix 2.8 would look for the logical path).
fn nix_dump(root: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("nix-store").arg("--dump").arg(on_disk(root, path)).output().expect("running nix-store --dump");
    assert!(out.status.success(), "nix-store --dump {path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The disk NAR of `info`.
fn disk_nar(local: &LocalStore, info: &PathInfo) -> Result<Vec<u8>, CopyError> {
    let mut nar = Vec::new();
    let n = DiskNars::new(local).write_nar(info, &mut nar)?;
    assert_eq!(n, nar.len() as u64);
    Ok(nar)
}

/// A directory with everything a NAR has: nested directories, an empty
/// one, an empty file, an executable, symlinks, and a file of several
/// read chunks.
fn odd_tree(scratch: &Path, name: &str) -> std::path::PathBuf {
    let d = scratch.join(name);
    std::fs::create_dir_all(d.join("a/b/c")).expect("mkdir");
    std::fs::create_dir_all(d.join("empty-dir")).expect("mkdir");
    std::fs::write(d.join("empty"), "").expect("write");
    std::fs::write(d.join("a/b/c/deep"), "deep\n").expect("write");
    std::fs::write(d.join("run"), "#!/bin/sh\nexit 0\n").expect("write");
    std::fs::set_permissions(d.join("run"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink("a/b/c/deep", d.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/nowhere/at/all", d.join("dangling")).expect("symlink");
    let big: Vec<u8> = (0..300_001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(d.join("a/big"), big).expect("write");
    d
}

#[test]
fn the_database_answers_as_nix_store_serve_does() {
    let s = Scratch::new("db-infos");
    let b = s.store("B");
    // References (text paths), content addresses (text:, fixed:r:), a build
    // output with a deriver, a `.drv` with references, signatures.
    let [leaf, mid, top] = text_closure(&b, "db");
    let added = add_files(&b, s.path(), "db-added", 1).remove(0);
    let tree = add_tree(&b, s.path(), "db-tree");
    let input = eval_path(&b, "builtins.toFile \"db-input\" \"the input\"");
    let drv = eval_path(
        &b,
        &format!(
            "let input = builtins.toFile \"db-input\" \"the input\"; in (derivation {{ name = \"db-out\"; system = \"{}\"; builder = \"/bin/sh\"; args = [\"-c\" \"echo built from ${{input}} > $out\"]; }}).drvPath",
            remote_lib::LOCAL_SYSTEM
        ),
    );
    let out = realise(&s, &b, &drv);
    sign(&s, &b, &top, "first-key");
    sign(&s, &b, &top, "second-key");
    let absent = format!("{STORE_DIR}/00000000000000000000000000000000-absent");
    // On disk but never registered: not valid either.
    let unregistered = format!("{STORE_DIR}/11111111111111111111111111111111-unregistered");
    std::fs::write(on_disk(&b, &unregistered), "not registered").expect("write");
    let asked: Vec<String> =
        vec![top.clone(), absent.clone(), mid.clone(), leaf.clone(), added.clone(), unregistered.clone(), tree.clone(), drv.clone(), out.clone(), input.clone()];

    let local = local_store(&b);
    let mut db = local.open_db().expect("the database opens");
    let infos = db.query_path_infos(&asked).expect("path infos from the database");
    let (lp, mut ls) = local_serve(&b);
    let served = ls.query_path_infos(&asked).expect("QueryPathInfos");
    let served_valid = ls.query_valid_paths(&asked, false, false).expect("QueryValidPaths");
    drop(ls);
    let _ = lp.finish();
    // Nix 2.8's serve answers in store-path order (it reads the question
    // into a set); the database in the order asked.
    let (mut by_path, mut served) = (infos.clone(), served);
    by_path.sort_by(|x, y| x.path.cmp(&y.path));
    served.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(by_path, served, "the database's answer is the serve's, field for field");

    let valid: Vec<String> = asked.iter().filter(|p| **p != absent && **p != unregistered).cloned().collect();
    assert_eq!(infos.iter().map(|i| i.path.clone()).collect::<Vec<_>>(), valid, "the valid ones, in the order asked");
    assert_eq!(db.query_valid(&asked).expect("validity from the database"), valid);
    let mut sorted = valid.clone();
    sorted.sort();
    let mut served_valid = served_valid;
    served_valid.sort();
    assert_eq!(sorted, served_valid);
    assert!(db.query_valid(std::slice::from_ref(&absent)).expect("validity").is_empty());
    // Through the trait the job uses, too.
    assert_eq!(PathMeta::query_valid(&mut db, &asked).expect("validity"), valid);

    // And what nix-store --query says of each.
    for i in &infos {
        let q = |what: &str| nix_store(&b, &["-q", what, &i.path]).trim().to_string();
        assert_eq!(i.nar_hash, q("--hash"), "{}", i.path);
        assert!(i.nar_hash.starts_with("sha256:") && i.nar_hash.len() == 7 + 52, "{}", i.nar_hash);
        assert_eq!(i.nar_size.to_string(), q("--size"), "{}", i.path);
        assert_eq!(i.references, references(&b, &i.path), "{}", i.path);
        let deriver = q("--deriver");
        assert_eq!(if i.deriver.is_empty() { "unknown-deriver" } else { &i.deriver }, deriver, "{}", i.path);
    }
    let by = |p: &str| infos.iter().find(|i| i.path == p).expect("asked");
    assert_eq!(by(&out).deriver, drv);
    assert_eq!(by(&out).references, vec![input.clone()]);
    assert!(by(&drv).references.contains(&input), "{:?}", by(&drv).references);
    assert_eq!(by(&top).references, {
        let mut r = vec![leaf.clone(), mid.clone()];
        r.sort();
        r
    });
    assert!(by(&added).ca.starts_with("fixed:r:sha256:"), "{}", by(&added).ca);
    assert!(by(&leaf).ca.starts_with("text:sha256:"), "{}", by(&leaf).ca);
    assert!(by(&out).ca.is_empty());
    let sigs = &by(&top).sigs;
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    assert!(sigs[0].starts_with("first-key:") && sigs[1].starts_with("second-key:"), "{sigs:?}");
    assert!(by(&mid).sigs.is_empty());
}

#[test]
fn a_store_without_a_database_is_an_error_not_an_empty_answer() {
    let s = Scratch::new("db-none");
    let local = local_store(&s.store("nothing-here"));
    let e = local.open_db().err().expect("no database");
    assert!(remote_lib::session::chain(&e).contains("nothing-here/nix/var/nix/db/db.sqlite"), "{e}");
    let cache = LocalStore::from_setting(Some(&format!("file://{}", s.path().display())), "nix-store");
    assert!(cache.open_db().is_err(), "a binary cache has no database here");
}

#[test]
fn a_path_written_from_disk_is_what_nix_store_dump_writes() {
    let s = Scratch::new("disk-nar");
    let b = s.store("B");
    let odd = nix_store(&b, &["--add", &odd_tree(s.path(), "odd").to_string_lossy()]).trim().to_string();
    let empty_file = s.path().join("empty-file");
    std::fs::write(&empty_file, "").expect("write");
    let empty = nix_store(&b, &["--add", &empty_file.to_string_lossy()]).trim().to_string();
    let link_target = s.path().join("just-a-link");
    std::os::unix::fs::symlink("somewhere/else", &link_target).expect("symlink");
    let link = nix_store(&b, &["--add", &link_target.to_string_lossy()]).trim().to_string();
    let mut paths = vec![odd, empty, link, add_tree(&b, s.path(), "tree")];
    paths.extend(text_closure(&b, "nar"));
    let local = local_store(&b);
    let infos = local.open_db().expect("db").query_path_infos(&paths).expect("infos");
    assert_eq!(infos.len(), paths.len());
    for i in &infos {
        let nar = disk_nar(&local, i).expect("written from disk");
        assert!(nar == nix_dump(&b, &i.path), "{}: the disk NAR differs from nix-store --dump", i.path);
        assert_eq!(nar.len() as u64, i.nar_size, "{}", i.path);
        let (hash, _, _) = {
            let mut hr = remote_lib::hash::HashingReader::new(&nar[..]);
            io::copy(&mut hr, &mut io::sink()).expect("hash");
            hr.finish()
        };
        assert_eq!(hash.to_nix32_prefixed(), i.nar_hash, "{}", i.path);
    }
}

/// Makes a store path's files writable again, as a careless user would.
fn tamper(p: &Path, f: impl FnOnce(&Path)) {
    remote_lib::nar::make_writable(p);
    f(p);
}

#[test]
fn a_path_changed_on_disk_is_a_local_error_naming_it() {
    let s = Scratch::new("disk-changed");
    let b = s.store("B");
    let grown = add_tree(&b, s.path(), "grown");
    let shrunk = add_tree(&b, s.path(), "shrunk");
    let gone = add_tree(&b, s.path(), "gone");
    let local = local_store(&b);
    let infos = local.open_db().expect("db").query_path_infos(&[grown.clone(), shrunk.clone(), gone.clone()]).expect("infos");
    tamper(&on_disk(&b, &grown), |p| {
        let mut f = std::fs::OpenOptions::new().append(true).open(p.join("data")).expect("open");
        f.write_all(b"one more line\n").expect("append");
    });
    tamper(&on_disk(&b, &shrunk), |p| std::fs::remove_file(p.join("data")).expect("rm"));
    tamper(&on_disk(&b, &gone), |p| remote_lib::nar::remove_tree(p).expect("rm -r"));
    for (i, size_hint) in infos.iter().zip(["more", "less", "none"]) {
        let mut nar = Vec::new();
        let e = DiskNars::new(&local).write_nar(i, &mut nar).expect_err("changed");
        let msg = remote_lib::session::chain(&e);
        assert!(e.is_local() && !e.builder_closed(), "{msg}");
        assert!(msg.contains(&i.path), "names the path: {msg}");
        assert!(nar.len() as u64 <= i.nar_size, "nothing past the registered size reaches the builder ({} > {})", nar.len(), i.nar_size);
        match (size_hint, &e) {
            ("more", CopyError::ChangedLocally { registered, got, .. }) => assert!(got > registered),
            ("less", CopyError::ChangedLocally { registered, got, .. }) => assert!(got < registered),
            ("none", CopyError::Io { .. }) => {}
            _ => panic!("{size_hint}: unexpected {e:?}"),
        }
        if size_hint != "none" {
            assert!(msg.contains("nix-store --verify --check-contents --repair"), "says what to do: {msg}");
        }
    }
}

/// A builder whose input is gone.
struct Broken;
impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_write_from_disk_is_the_builders() {
    let s = Scratch::new("disk-broken");
    let b = s.store("B");
    let tree = add_tree(&b, s.path(), "tree");
    let local = local_store(&b);
    let info = local.open_db().expect("db").query_path_infos(std::slice::from_ref(&tree)).expect("infos").remove(0);
    let e = DiskNars::new(&local).write_nar(&info, &mut Broken).expect_err("the write fails");
    assert!(!e.is_local() && e.builder_closed(), "a broken pipe is the builder's stream ending: {e:?}");
}

#[test]
fn uploads_from_disk_arrive_intact_interactive_and_bulk() {
    let s = Scratch::new("disk-upload");
    let (a, a2, b) = (s.store("A"), s.store("A2"), s.store("B"));
    let mut paths = text_closure(&b, "dup").to_vec();
    paths.push(add_tree(&b, s.path(), "tree"));
    paths.push(nix_store(&b, &["--add", &odd_tree(s.path(), "odd").to_string_lossy()]).trim().to_string());
    paths.extend(add_files(&b, s.path(), "dup", 300));
    let local = local_store(&b);
    let mut db = local.open_db().expect("db");
    let ordered = copy::local_infos(&mut db, &paths).expect("infos in dependency order");
    let absent = format!("{STORE_DIR}/00000000000000000000000000000000-absent");
    match copy::local_infos(&mut db, &[paths[0].clone(), absent.clone()]) {
        Err(e @ CopyError::MissingLocally { .. }) => assert!(e.is_local() && e.to_string().contains(&absent), "{e}"),
        other => panic!("expected MissingLocally, got {other:?}"),
    }

    // Interactive: back-to-back AddToStoreNar, the builder's Nix checking each hash.
    let (rp, mut remote) = builder_serve(&a);
    let sent = copy::upload(&mut DiskNars::new(&local), &mut remote, &ordered).expect("upload from disk");
    drop(remote);
    assert!(rp.finish().status.is_some_and(|s| s.success()));
    assert_eq!(sent, nar_bytes(&ordered));

    // Bulk: zstd -d | nix-store --serve --write.
    let mut bulk = bulk_process(&a2, "zstd -d -q -c | {serve}");
    let (w, r) = (bulk.stdin.take().expect("stdin"), bulk.stdout.take().expect("stdout"));
    let moved = copy::upload_bulk(&mut DiskNars::new(&local), w, r, &ordered, 3).expect("bulk upload from disk");
    let ended = bulk.finish();
    assert!(ended.status.is_some_and(|s| s.success()), "{}", ended.tail);
    assert_eq!(moved.nar, nar_bytes(&ordered));

    for store in [&a, &a2] {
        assert_eq!(valid_paths(store, &paths), paths, "every path valid in {}", store.display());
        for p in &paths[..5] {
            assert_eq!(references(store, p), references(&b, p), "references of {p}");
            verify_path(store, p);
        }
    }
}

/// Two hooks record realisations in the same store at the same moment: one
/// that has read the table must not fail with "database is locked" when the
/// other commits first (a deferred transaction cannot upgrade its stale
/// snapshot in WAL mode; seen in a CI run of Nix's floating-CA test).
#[test]
fn realisations_are_recorded_while_another_process_writes() {
    let s = Scratch::new("db-realise");
    let b = s.store("B");
    let [leaf, mid, _] = text_closure(&b, "realise");
    let db = b.join("nix/var/nix/db/db.sqlite");
    let schema = "CREATE TABLE IF NOT EXISTS Realisations (id integer primary key autoincrement not null, drvPath text not null, outputName text not null, \
                  outputPath integer not null, signatures text, foreign key (outputPath) references ValidPaths(id) on delete cascade)";
    rusqlite::Connection::open(&db).expect("db").execute(schema, []).expect("Realisations table");
    let (tx_held, rx_held) = std::sync::mpsc::channel::<()>();
    let other = {
        let db = db.clone();
        std::thread::spawn(move || {
            let mut c = rusqlite::Connection::open(&db).expect("db");
            let t = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("the other writer's lock");
            t.execute(
                "INSERT INTO Realisations (drvPath, outputName, outputPath, signatures) VALUES ('sha256:other', 'out', (SELECT id FROM ValidPaths WHERE path = ?1), '')",
                [&mid],
            )
            .expect("the other writer's row");
            tx_held.send(()).expect("signal");
            std::thread::sleep(std::time::Duration::from_millis(300));
            t.commit().expect("the other writer commits");
        })
    };
    rx_held.recv().expect("the other writer holds the lock");
    let local = local_store(&b);
    let leaf_path = remote_lib::store_path::StorePath::parse(STORE_DIR, &leaf).expect("store path");
    local.register_realisations("sha256:mine", &[("out".into(), leaf_path)]).expect("recorded after the other writer committed");
    other.join().expect("the other writer");
    let n: i64 = rusqlite::Connection::open(&db).expect("db").query_row("SELECT count(*) FROM Realisations", [], |r| r.get(0)).expect("count");
    assert_eq!(n, 2, "both rows are there");
}
