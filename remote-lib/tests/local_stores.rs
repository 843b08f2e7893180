//! The middle tier: copying, receiving and registering against two
//! throw-away local stores (`nix-store --store DIR`), a "builder" A served by
//! `nix-store --serve --write --store A` and the hook's local store B, with
//! real Nix and no root-only setup, namespaces or ssh. See docs/testing.md.

mod common;

use common::*;
use remote_lib::copy::{self, CopyError, Receive};
use remote_lib::local_store::{LocalStore, LocalStoreError};
use remote_lib::serve::PathInfo;
use remote_lib::session::{self, Fault, SessionError};
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// Uploads `paths` (valid in B) to A over the interactive session and
/// returns the ordered infos and the NAR bytes sent.
fn upload_interactive(a: &Path, b: &Path, paths: &[String]) -> (Vec<PathInfo>, u64) {
    let (lp, mut ls) = local_serve(b);
    let (rp, mut remote) = builder_serve(a);
    assert!(remote.query_valid_paths(paths, false, false).expect("QueryValidPaths").is_empty(), "A starts empty");
    let ordered = copy::local_infos(&mut ls, paths).expect("local infos");
    let sent = copy::upload(&mut copy::ServeNars::new(&mut ls), &mut remote, &ordered).expect("upload");
    drop((ls, remote));
    assert!(rp.finish().status.is_some_and(|s| s.success()), "the builder's nix-store ended cleanly");
    let _ = lp.finish();
    (ordered, sent)
}

fn assert_same_closure(a: &Path, b: &Path, paths: &[String]) {
    assert_eq!(valid_paths(a, paths), paths, "every path is valid in A");
    for p in paths {
        assert_eq!(references(a, p), references(b, p), "references of {p}");
        verify_path(a, p);
    }
}

#[test]
fn upload_of_a_closure_keeps_references() {
    let s = Scratch::new("upload");
    let (a, b) = (s.store("A"), s.store("B"));
    let [leaf, mid, top] = text_closure(&b, "up");
    let tree = add_tree(&b, s.path(), "tree");
    // Asked for in the wrong order: the copy must put references first.
    let paths = vec![top.clone(), tree.clone(), mid.clone(), leaf.clone()];
    let (ordered, sent) = upload_interactive(&a, &b, &paths);
    let order: Vec<&str> = ordered.iter().map(|i| i.path.as_str()).collect();
    let pos = |p: &str| order.iter().position(|o| *o == p).expect("in the order");
    assert!(pos(&leaf) < pos(&mid) && pos(&mid) < pos(&top), "{order:?}");
    assert_eq!(sent, nar_bytes(&ordered));
    assert_eq!(references(&a, &top), {
        let mut v = vec![leaf.clone(), mid.clone()];
        v.sort();
        v
    });
    assert_same_closure(&a, &b, &paths);
}

#[test]
fn local_infos_names_a_path_missing_locally() {
    let s = Scratch::new("missing");
    let b = s.store("B");
    let [leaf, ..] = text_closure(&b, "miss");
    let absent = "/nix/store/00000000000000000000000000000000-absent".to_string();
    let (lp, mut ls) = local_serve(&b);
    match copy::local_infos(&mut ls, &[leaf, absent.clone()]) {
        Err(e @ CopyError::MissingLocally { .. }) => {
            assert!(e.is_local());
            assert!(e.to_string().contains(&absent), "{e}");
        }
        other => panic!("expected MissingLocally, got {other:?}"),
    }
    drop(ls);
    let _ = lp.finish();
}

#[test]
fn two_thousand_paths_in_one_upload_do_not_deadlock() {
    let s = Scratch::new("many");
    let (a, b) = (s.store("A"), s.store("B"));
    let paths = add_files(&b, s.path(), "many", 2000);
    let marker = a.to_string_lossy().into_owned();
    let t = Instant::now();
    let (a2, b2, p2) = (a.clone(), b.clone(), paths.clone());
    let (ordered, _) = within(LIMIT, &marker, move || upload_interactive(&a2, &b2, &p2));
    assert_eq!(ordered.len(), 2000);
    assert_eq!(valid_paths(&a, &paths).len(), 2000, "all 2000 valid in A after {:?}", t.elapsed());
}

#[test]
fn bulk_upload_with_zstd() {
    let s = Scratch::new("bulk-up");
    let (a, b) = (s.store("A"), s.store("B"));
    let mut paths = text_closure(&b, "bulk").to_vec();
    paths.push(add_tree(&b, s.path(), "tree"));
    paths.extend(add_files(&b, s.path(), "bulk", 2000));
    let marker = a.to_string_lossy().into_owned();
    let (a2, b2, p2) = (a.clone(), b.clone(), paths.clone());
    let (moved, ordered) = within(LIMIT, &marker, move || {
        let (lp, mut ls) = local_serve(&b2);
        let ordered = copy::local_infos(&mut ls, &p2).expect("local infos");
        let mut bulk = bulk_process(&a2, "zstd -d -q -c | {serve}");
        let (w, r) = (bulk.stdin.take().expect("stdin"), bulk.stdout.take().expect("stdout"));
        let moved = copy::upload_bulk(&mut copy::ServeNars::new(&mut ls), w, r, &ordered, 3).expect("bulk upload");
        let ended = bulk.finish();
        assert!(ended.status.is_some_and(|s| s.success()), "the bulk session ended cleanly: {}", ended.tail);
        drop(ls);
        let _ = lp.finish();
        (moved, ordered)
    });
    assert_eq!(moved.nar, nar_bytes(&ordered));
    assert!(moved.wire > 0 && moved.wire < moved.nar, "zstd made the stream smaller: {moved:?}");
    assert_same_closure(&a, &b, &paths[..4]);
    assert_eq!(valid_paths(&a, &paths).len(), paths.len());
}

/// A's infos for `outputs` (checked), in the order of `outputs`.
fn outputs_of(a: &Path, outputs: &[String]) -> Vec<PathInfo> {
    let (rp, mut remote) = builder_serve(a);
    let mut infos = copy::remote_infos(&mut remote, STORE_DIR, &store_paths(outputs)).expect("remote infos");
    infos.sort_by_key(|i| outputs.iter().position(|o| *o == i.path));
    drop(remote);
    let _ = rp.finish();
    infos
}

/// Modes and modification times of every entry under `p`, by relative path.
fn metadata_tree(p: &Path) -> Vec<(PathBuf, u32, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(q) = stack.pop() {
        let md = std::fs::symlink_metadata(&q).expect("metadata");
        out.push((q.strip_prefix(p).expect("under").to_path_buf(), md.mode(), md.mtime()));
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&q).expect("read_dir").map(|e| e.expect("entry").path()));
        }
    }
    out.sort();
    out
}

fn assert_received(a: &Path, b: &Path, outputs: &[String]) {
    assert_eq!(valid_paths(b, outputs), outputs, "every output is valid in B");
    for p in outputs {
        verify_path(b, p);
        assert_eq!(references(b, p), references(a, p), "references of {p}");
        let (ma, mb) = (metadata_tree(&on_disk(a, p)), metadata_tree(&on_disk(b, p)));
        assert_eq!(ma, mb, "modes and times of {p} as Nix has them in A");
        for (rel, mode, mtime) in &mb {
            assert_eq!(*mtime, 1, "{p}/{}: mtime", rel.display());
            if mode & 0o170000 != 0o120000 {
                assert_eq!(mode & 0o222, 0, "{p}/{}: not writable", rel.display());
            }
        }
    }
    assert!(store_entries(b, "build-hook").is_empty(), "no temporary left: {:?}", store_entries(b, "build-hook"));
}

#[test]
fn download_registers_outputs_as_nix_would() {
    let s = Scratch::new("down");
    let (a, b) = (s.store("A"), s.store("B"));
    let mut outputs = text_closure(&a, "down").to_vec();
    outputs.push(add_tree(&a, s.path(), "tree"));
    let infos = outputs_of(&a, &outputs);
    let local = local_store(&b);
    let (lp, mut ls) = local_serve(&b);
    copy::check_references(&mut ls, &infos).expect("references are among the outputs");
    let (rp, mut remote) = builder_serve(&a);
    let sps = store_paths(&outputs);
    let into = Receive { local: &local, outputs: &sps, fixed: &[] };
    let mut temps = Vec::new();
    let got = copy::download(&mut remote, infos.clone(), &into, local.start_registrar().expect("registrar"), &mut |p| temps.push(p.to_path_buf())).expect("download");
    assert_eq!(got, nar_bytes(&infos));
    assert_eq!(temps.len(), outputs.len(), "each output was unpacked under a temporary name first");
    assert!(temps.iter().all(|t| !t.exists()), "temporaries are gone: {temps:?}");
    drop((remote, ls));
    let _ = (rp.finish(), lp.finish());
    assert_received(&a, &b, &outputs);
}

#[test]
fn bulk_download_with_zstd() {
    let s = Scratch::new("bulk-down");
    let (a, b) = (s.store("A"), s.store("B"));
    let mut outputs = text_closure(&a, "bdown").to_vec();
    outputs.push(add_tree(&a, s.path(), "tree"));
    let infos = outputs_of(&a, &outputs);
    init_store(&b);
    let local = local_store(&b);
    let sps = store_paths(&outputs);
    let into = Receive { local: &local, outputs: &sps, fixed: &[] };
    let mut bulk = bulk_process(&a, "{serve} | zstd -q -c -3");
    let (w, r) = (bulk.stdin.take().expect("stdin"), bulk.stdout.take().expect("stdout"));
    let moved = copy::download_bulk(w, r, infos.clone(), &into, local.start_registrar().expect("registrar"), &mut |_| {}).expect("bulk download");
    let _ = bulk.finish();
    assert_eq!(moved.nar, nar_bytes(&infos));
    assert!(moved.wire > 0 && moved.wire < moved.nar, "{moved:?}");
    assert_received(&a, &b, &outputs);
}

#[test]
fn check_references_rejects_a_dangling_reference() {
    let s = Scratch::new("dangling");
    let (a, b) = (s.store("A"), s.store("B"));
    let [leaf, mid, _] = text_closure(&a, "dang");
    // Only `mid` is fetched; its reference `leaf` is neither fetched nor in B.
    let infos = outputs_of(&a, std::slice::from_ref(&mid));
    let (lp, mut ls) = local_serve(&b);
    let e = copy::check_references(&mut ls, &infos).expect_err("a dangling reference");
    let msg = session::chain(&e);
    assert!(matches!(e, CopyError::Rejected(ref p) if p.path == mid), "{msg}");
    assert!(msg.contains(&leaf) && msg.contains("neither an output"), "{msg}");
    drop(ls);
    let _ = lp.finish();
    // Once the reference is valid in B (fetched on its own), the same reply is fine.
    let (rp, mut remote) = builder_serve(&a);
    let local = local_store(&b);
    let sps = store_paths(std::slice::from_ref(&leaf));
    let into = Receive { local: &local, outputs: &sps, fixed: &[] };
    let li = copy::remote_infos(&mut remote, STORE_DIR, &sps).expect("infos");
    copy::download(&mut remote, li, &into, local.start_registrar().expect("registrar"), &mut |_| {}).expect("download leaf");
    drop(remote);
    let _ = rp.finish();
    let (lp, mut ls) = local_serve(&b);
    copy::check_references(&mut ls, &infos).expect("the reference is valid in B now");
    drop(ls);
    let _ = lp.finish();
}

/// A `nix-store` for B whose `--load-db` fails: every other command is the
/// real one.
fn failing_registration(s: &Scratch, b: &Path) -> LocalStore {
    use std::os::unix::fs::PermissionsExt;
    let script = s.path().join("nix-store-failing-load-db");
    std::fs::write(
        &script,
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --load-db ] && { cat >/dev/null; echo 'error: the database is on fire' >&2; exit 1; }; done\nexec nix-store \"$@\"\n",
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    LocalStore::from_setting(Some(&b.to_string_lossy()), &script.to_string_lossy())
}

fn assert_nothing_left(b: &Path, outputs: &[String]) {
    for p in outputs {
        assert!(std::fs::symlink_metadata(on_disk(b, p)).is_err(), "{p} is not on disk in B");
    }
    assert!(store_entries(b, "build-hook").is_empty(), "no temporary left: {:?}", store_entries(b, "build-hook"));
    if b.join("nix/var/nix/db").exists() {
        assert!(valid_paths(b, outputs).is_empty(), "nothing valid in B");
    }
}

#[test]
fn failed_registration_rolls_back() {
    let s = Scratch::new("rollback");
    let (a, b) = (s.store("A"), s.store("B"));
    // B exists (has a database) before the failed fetch.
    init_store(&b);
    let mut outputs = text_closure(&a, "rb").to_vec();
    outputs.push(add_tree(&a, s.path(), "tree"));
    let infos = outputs_of(&a, &outputs);
    let local = failing_registration(&s, &b);
    let (rp, mut remote) = builder_serve(&a);
    let sps = store_paths(&outputs);
    let into = Receive { local: &local, outputs: &sps, fixed: &[] };
    let mut temps = Vec::new();
    let e = copy::download(&mut remote, infos, &into, local.start_registrar().expect("registrar"), &mut |p| temps.push(p.to_path_buf())).expect_err("registration fails");
    drop(remote);
    let _ = rp.finish();
    let msg = session::chain(&e);
    assert!(matches!(e, CopyError::Local(LocalStoreError::Register { .. })), "{msg}");
    assert!(e.is_local(), "a failed registration is this machine's fault");
    assert!(msg.contains("the database is on fire") && msg.contains(&outputs[0]), "{msg}");
    assert_eq!(temps.len(), outputs.len());
    assert!(temps.iter().all(|t| std::fs::symlink_metadata(t).is_err()), "{temps:?}");
    assert_nothing_left(&b, &outputs);
}

/// The real NAR of `path` in A.
fn nar_of(a: &Path, path: &str) -> Vec<u8> {
    let out = std::process::Command::new("nix-store").arg("--store").arg(a).args(["--dump"]).arg(on_disk(a, path)).output().expect("nix-store --dump");
    assert!(out.status.success());
    out.stdout
}

/// Feeds `stream` to `receive_nars` for `infos` (outputs `outputs`) into B.
fn receive(b: &Path, outputs: &[String], infos: Vec<PathInfo>, stream: Vec<u8>) -> Result<u64, CopyError> {
    let local = local_store(b);
    let sps = store_paths(outputs);
    let into = Receive { local: &local, outputs: &sps, fixed: &[] };
    copy::receive_nars(&mut Cursor::new(stream), infos, &into, local.start_registrar().expect("registrar"), &mut |_| {}, &mut |_| Ok(()))
}

#[test]
fn a_lying_builder_is_caught_before_anything_is_registered() {
    let s = Scratch::new("liar");
    let (a, b) = (s.store("A"), s.store("B"));
    init_store(&b);
    let good = add_tree(&a, s.path(), "good");
    let bad = add_tree(&a, s.path(), "bad-one");
    let outputs = vec![good.clone(), bad.clone()];
    let infos = outputs_of(&a, &outputs);
    let (good_nar, bad_nar) = (nar_of(&a, &good), nar_of(&a, &bad));
    assert_eq!(infos[1].nar_size, bad_nar.len() as u64);
    let with = |f: &dyn Fn(&mut PathInfo)| {
        let mut v = infos.clone();
        f(&mut v[1]);
        v
    };
    let stream = |bad: &[u8]| [good_nar.clone(), bad.to_vec()].concat();

    // Longer than announced: the NAR goes on past the announced size.
    let e = receive(&b, &outputs, with(&|i| i.nar_size -= 16), stream(&bad_nar)).expect_err("longer");
    let msg = session::chain(&e);
    assert!(matches!(e, CopyError::Rejected(ref p) if p.path == bad) && msg.contains("longer than"), "{msg}");
    assert_nothing_left(&b, &outputs);

    // Shorter than announced: the NAR ends before the announced size.
    let e = receive(&b, &outputs, with(&|i| i.nar_size += 16), stream(&[bad_nar.clone(), vec![0; 16]].concat())).expect_err("shorter");
    let msg = session::chain(&e);
    assert!(matches!(e, CopyError::Rejected(ref p) if p.path == bad) && msg.contains("size mismatch"), "{msg}");
    assert_nothing_left(&b, &outputs);

    // A wrong hash.
    let other = infos[0].nar_hash.clone();
    assert_ne!(other, infos[1].nar_hash);
    let e = receive(&b, &outputs, with(&|i| i.nar_hash = other.clone()), stream(&bad_nar)).expect_err("wrong hash");
    let msg = session::chain(&e);
    assert!(matches!(e, CopyError::Rejected(ref p) if p.path == bad) && msg.contains("hash mismatch"), "{msg}");
    assert_nothing_left(&b, &outputs);

    // A stream that is cut in the middle of a NAR: the connection ended.
    let e = receive(&b, &outputs, infos.clone(), stream(&bad_nar[..bad_nar.len() / 2])).expect_err("cut");
    assert!(e.builder_closed(), "{}", session::chain(&e));
    assert_nothing_left(&b, &outputs);

    // A path that is not an output being fetched.
    let e = receive(&b, &outputs[..1], infos.clone(), stream(&bad_nar)).expect_err("not asked for");
    assert!(matches!(e, CopyError::Rejected(ref p) if p.path == bad), "{}", session::chain(&e));
    assert_nothing_left(&b, &outputs);

    // And the honest stream goes through.
    receive(&b, &outputs, infos.clone(), stream(&bad_nar)).expect("honest");
    assert_eq!(valid_paths(&b, &outputs), outputs);
    verify_path(&b, &bad);
}

#[test]
fn a_builder_that_refuses_a_nar_is_refused_in_its_own_words() {
    let s = Scratch::new("refused");
    let (a, b) = (s.store("A"), s.store("B"));
    let paths = text_closure(&b, "ref").to_vec();
    let (lp, mut ls) = local_serve(&b);
    let mut ordered = copy::local_infos(&mut ls, &paths).expect("infos");
    // Announce the wrong hash for the first path: the builder's Nix checks it.
    ordered[0].nar_hash = ordered[1].nar_hash.clone();
    let (rp, mut remote) = builder_serve(&a);
    let e = copy::upload(&mut copy::ServeNars::new(&mut ls), &mut remote, &ordered).expect_err("the builder refuses");
    assert!(e.builder_closed(), "{}", session::chain(&e));
    drop(remote);
    let ended = rp.finish();
    let v = session::verdict("ssh://a", "uploading inputs", Fault::from(&e), &ended);
    match &v {
        SessionError::Refused { builder_said, .. } => assert!(builder_said.contains("hash mismatch"), "{v:?}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(valid_paths(&a, &paths).is_empty(), "nothing registered on the builder");
    drop(ls);
    let _ = lp.finish();
}

// ---- A whole job without ssh: `ssh://localhost?remote-store=A` runs the
// builder's `nix-store --serve --write --store A` directly, as Nix does.

use remote_lib::health::HealthStore;
use remote_lib::hook_protocol::{Accepted, BuildOptions};
use remote_lib::job::{self, Context, Events, JobError, Plan};
use remote_lib::machines::{self, Machine};
use remote_lib::nixlog::Level;
use remote_lib::session::{Session, Timeouts};
use remote_lib::slots::LoadDir;
use remote_lib::transport::SshConfig;
use std::sync::Mutex;

/// Records what a job reports.
#[derive(Default)]
struct Recorder {
    lines: Mutex<Vec<String>>,
    temps: Mutex<Vec<PathBuf>>,
}

impl Events for Recorder {
    fn log(&self, _level: Level, text: &str) {
        self.lines.lock().expect("lock").push(text.to_string());
    }
    fn start(&self, _level: Level, text: &str) -> u64 {
        self.lines.lock().expect("lock").push(format!("start: {text}"));
        1
    }
    fn stop(&self, _id: u64) {}
    fn temp(&self, path: &Path) {
        self.temps.lock().expect("lock").push(path.to_path_buf());
    }
}

fn machine(a: &Path, program: &Path) -> Machine {
    let line = format!("ssh://localhost?remote-store={}&remote-program={} {} - 1 1", a.display(), program.display(), remote_lib::LOCAL_SYSTEM);
    let p = machines::parse(&line, "test", remote_lib::LOCAL_SYSTEM, &mut |_: &str| Ok(None));
    assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
    let m = p.machines.into_iter().next().expect("one machine");
    assert_eq!(m.ssh.remote_store.as_deref(), Some(a.to_str().expect("utf-8")));
    m
}

fn ssh_config(s: &Scratch) -> SshConfig {
    SshConfig {
        program: "ssh".into(),
        connect_timeout: 5,
        server_alive_interval: 15,
        server_alive_count_max: 4,
        control_dir: None,
        control_persist: 0,
        known_hosts_dir: s.path().join("known-hosts"),
        extra_opts: vec![],
        ciphers: None,
        bridge: None,
    }
}

const TIMEOUTS: Timeouts = Timeouts { handshake: Duration::from_secs(30), stall: Duration::from_secs(30), build_silent: Some(Duration::from_secs(60)) };

/// A derivation in B whose output refers to a `builtins.toFile` input:
/// (drv path, input closure as Nix sends it, the input).
fn derivation(b: &Path, tag: &str) -> (String, Vec<String>, String) {
    let input = eval_path(b, &format!("builtins.toFile \"input-{tag}\" \"the input\""));
    let drv = eval_path(
        b,
        &format!(
            "let input = builtins.toFile \"input-{tag}\" \"the input\"; in (derivation {{ name = \"out-{tag}\"; system = \"{}\"; builder = \"/bin/sh\"; args = [\"-c\" \"echo built from ${{input}} > $out\"]; }}).drvPath",
            remote_lib::LOCAL_SYSTEM
        ),
    );
    let mut inputs: Vec<String> = nix_store(b, &["-qR", &input]).lines().map(str::to_string).collect();
    inputs.sort();
    (drv, inputs, input)
}

/// A `nix-store` for the hook's local store that notes each command line
/// in `log` before running the real one.
fn logged_nix_store(s: &Scratch, log: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let script = s.path().join("local-nix-store");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$*\" >> '{}'\nexec nix-store \"$@\"\n", log.display())).expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script.to_string_lossy().into_owned()
}

/// How a job is to find B's database.
#[derive(Clone, Copy, PartialEq)]
enum Db {
    Readable,
    /// The input's row has its NAR hash in a form Nix reads but never
    /// writes (SRI): the job must go on through a local `nix-store --serve`.
    Unusual,
}

/// Runs a whole job from B to A; returns the hook's log lines and the
/// local `nix-store` command lines it ran.
fn run_job(level: i32, tag: &str, db: Db) -> (String, Vec<String>) {
    let s = Scratch::new(tag);
    let (a, b) = (s.store("A"), s.store("B"));
    init_store(&a);
    let (drv, inputs, input) = derivation(&b, tag);
    if db == Db::Unusual {
        use base64::Engine;
        let conn = rusqlite::Connection::open(b.join("nix/var/nix/db/db.sqlite")).expect("open B's database");
        let hash: String = conn.query_row("SELECT hash FROM ValidPaths WHERE path = ?1", [&input], |r| r.get(0)).expect("the input's row");
        let raw = remote_lib::hash::Sha256Hash::parse(&hash).expect("sha256:<base16>");
        let sri = format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(raw.0));
        assert_eq!(conn.execute("UPDATE ValidPaths SET hash = ?1 WHERE path = ?2", [&sri, &input]).expect("update"), 1);
    }
    let log = s.path().join("local-nix-store.log");
    let mut local = local_store(&b);
    local.nix_store = logged_nix_store(&s, &log);
    let plan = Plan::new(&local, &drv, Accepted { inputs: inputs.clone(), wanted_outputs: vec!["out".into()] }).expect("plan");
    assert_eq!(plan.wanted.len(), 1);
    let out = plan.wanted[0].to_string();
    let m = machine(&a, &builder_program(&s));
    let ssh = ssh_config(&s);
    let (load, health) = (LoadDir::new(s.path().join("load")), HealthStore::new(s.path().join("health")));
    let ctx = Context { local: &local, ssh: &ssh, load: &load, health: &health, forced_level: Some(level), options: BuildOptions::default(), substitute: false };
    let ev = Recorder::default();
    let session = Session::connect(&m, &ssh, TIMEOUTS).expect("connect");
    let mut stats = job::Stats::default();
    job::Job::new(&ctx, &m, &plan, session, &ev).expect("job").run(&mut stats, || ()).unwrap_or_else(|e| panic!("the job failed: {e}; log: {:?}", ev.lines.lock()));
    assert!(stats.build_secs > 0.0 && stats.download_bytes > 0, "{stats:?}");
    // The input went to A, the output came back to B, valid and intact.
    assert_eq!(valid_paths(&a, &inputs), inputs);
    assert_eq!(valid_paths(&b, std::slice::from_ref(&out)), std::slice::from_ref(&out));
    verify_path(&b, &out);
    assert_eq!(references(&b, &out), std::slice::from_ref(&input));
    assert_eq!(std::fs::read_to_string(on_disk(&b, &out)).expect("output"), format!("built from {input}\n"));
    assert_eq!(std::fs::symlink_metadata(on_disk(&b, &out)).expect("output").mtime(), 1);
    let lines = ev.lines.lock().expect("lock").join("\n");
    let how = if level > 0 { format!("zstd -{level}") } else { "uncompressed".to_string() };
    assert!(lines.contains("copied 1 paths to") && lines.contains("copied 1 outputs from") && lines.contains(&how), "{lines}");
    assert!(ev.temps.lock().expect("lock").iter().all(|t| !t.exists()));
    assert!(store_entries(&b, "build-hook").is_empty());
    let ran = std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect();
    (lines, ran)
}

/// A job into a store on this disk runs one local `nix-store`: the
/// registration. Metadata come from the database, NARs from the files.
fn run_job_directly(level: i32, tag: &str) {
    let (lines, ran) = run_job(level, tag, Db::Readable);
    assert_eq!(ran.len(), 1, "one local nix-store: {ran:?}");
    assert!(ran[0].ends_with("--load-db"), "{ran:?}");
    assert!(!lines.contains("instead"), "{lines}");
}

#[test]
fn a_whole_job_over_the_interactive_session() {
    run_job_directly(0, "job-raw");
}

#[test]
fn a_whole_job_with_zstd_bulk_sessions() {
    run_job_directly(3, "job-zstd");
}

#[test]
fn a_database_the_hook_cannot_read_is_asked_through_nix_store_serve() {
    let (lines, ran) = run_job(0, "job-fallback", Db::Unusual);
    assert!(lines.contains("which is not 'sha256:' and base16 as Nix writes it") && lines.contains("asking a local 'nix-store --serve' instead"), "said at Talkative: {lines}");
    assert_eq!(lines.matches("instead").count(), 1, "said once: {lines}");
    let serves = ran.iter().filter(|r| r.contains("--serve")).count();
    assert_eq!(serves, 1, "one local nix-store --serve, started when needed: {ran:?}");
    assert!(ran.iter().any(|r| r.ends_with("--load-db")), "{ran:?}");
}

#[test]
fn a_builder_killed_mid_job_is_a_lost_connection() {
    let s = Scratch::new("lost");
    let (a, b) = (s.store("A"), s.store("B"));
    init_store(&a);
    let (drv, inputs, _) = derivation(&b, "lost");
    let local = local_store(&b);
    let plan = Plan::new(&local, &drv, Accepted { inputs: inputs.clone(), wanted_outputs: vec!["out".into()] }).expect("plan");
    let m = machine(&a, &builder_program(&s));
    let ssh = ssh_config(&s);
    let (load, health) = (LoadDir::new(s.path().join("load")), HealthStore::new(s.path().join("health")));
    let ctx = Context { local: &local, ssh: &ssh, load: &load, health: &health, forced_level: Some(0), options: BuildOptions::default(), substitute: false };
    let ev = Recorder::default();
    let session = Session::connect(&m, &ssh, TIMEOUTS).expect("connect");
    let mut job = job::Job::new(&ctx, &m, &plan, session, &ev).expect("job");
    let marker = format!("--store\0{}", a.display());
    let pids = pids_with(&marker);
    assert_eq!(pids.len(), 1, "one builder process serving A: {pids:?}");
    let killed = std::process::Command::new("kill").arg("-9").arg(pids[0].to_string()).status().expect("kill");
    assert!(killed.success());
    match job.upload_inputs() {
        Err(JobError::Builder(e @ SessionError::Lost { .. })) => {
            assert!(e.is_lost());
            assert!(e.to_string().contains("killed by signal 9"), "{e}");
        }
        Err(other) => panic!("expected a lost connection, got {other:?}"),
        Ok(()) => panic!("the upload cannot succeed with the builder gone"),
    }
    drop(job);
    assert!(valid_paths(&a, &inputs).is_empty());
}
