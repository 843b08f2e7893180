//! A store on this disk read without a `nix-store` process: path metadata
//! and validity from its database ([`StoreDb`]) must be what a local
//! `nix-store --serve` answers. Throw-away stores under temporary roots, as
//! in `local_stores.rs`.

mod common;

use common::*;
use remote_lib::local_store::LocalStore;
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
    let db = local.open_db().expect("the database opens");
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
