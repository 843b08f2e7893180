//! Golden bytes of Nix 2.34.8's `nix-daemon --stdio` (Debian sid's nix-bin,
//! run in the sid chroot of tests/lib/chroots.sh), replayed through
//! [`WorkerConn`]: the same two sessions as the Nix 2.8 captures (whose tests
//! are in src/worker.rs), recorded by `tests/golden/record-worker.sh sid`
//! with the independent client `record-worker.py`. 2.34 answers at protocol
//! 1.38: it sends its (empty) feature list, its version, whether it trusts
//! the client, and colours the store paths in its
//! error messages with ANSI escapes.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used)]

use remote_lib::derivation::Derivation;
use remote_lib::hash::HashingReader;
use remote_lib::hook_protocol::BuildOptions;
use remote_lib::serve::{BuildStatus, PathInfo};
use remote_lib::worker::{BuildMode, BuildOutcome, ClientOptions, Event, Field, Realisation, Trust, WorkerConn, WorkerError, WorkerVersion, STDERR_ERROR};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// The recorder's store directory (a fixed one, so the paths are the same on every run).
const SD: &str = "/tmp/bh-worker-golden/store";
const HELLO: &str = "46ax0m47x1x216zrhzjcsc59k7ygscmn-hello";
const HELLO_NAR_HASH: &str = "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";

fn golden(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sp(base: &str) -> String {
    format!("{SD}/{base}")
}

/// Without the ANSI escapes Nix >= 2.2x puts around store paths in its messages.
fn plain(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A writer whose bytes the test can still see after the connection took it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A path info for a NAR; content-addressed (`fixed:r:sha256`) when `ca`.
fn info(path: String, nar: &[u8], references: Vec<String>, ca: bool) -> PathInfo {
    let mut hr = HashingReader::new(nar);
    io::copy(&mut hr, &mut io::sink()).unwrap();
    let (h, n, _) = hr.finish();
    let ca = if ca { format!("fixed:r:{}", h.to_nix32_prefixed()) } else { String::new() };
    PathInfo { path, deriver: String::new(), references, nar_size: n, nar_hash: h.to_nix32_prefixed(), ca, sigs: vec![] }
}

fn drv(name: &str) -> (String, Derivation) {
    let text = golden(&format!("{name}.drv"));
    let path = sp(match name {
        "worker-ok" => "rxk5pnn98ky5ljm6jjvihw57gk80gbqh-worker-ok.drv",
        _ => "my0zn2ji0x73g1ii4kgwarggy9b4ms83-worker-fail.drv",
    });
    let d = Derivation::parse(&path, &text).unwrap();
    (path, d)
}

fn other(why: String) -> WorkerError {
    WorkerError::Protocol { during: "the test", why }
}

/// What the client saw of the trusted session.
#[derive(Debug, Default)]
struct Seen {
    trust: Option<Trust>,
    features: Vec<String>,
    events: Vec<Event>,
    valid_before: Vec<String>,
    valid_after: Vec<String>,
    info: Option<PathInfo>,
    missing_info: Option<PathInfo>,
    bad_upload: Option<WorkerError>,
    nar: Vec<u8>,
    built: Option<BuildOutcome>,
    failed: Option<BuildOutcome>,
    realisation: Option<Realisation>,
    missing_nar: Option<WorkerError>,
}

/// Replays the trusted session (record-worker.py's order of requests)
/// against `s2c`, writing the requests into `c2s`.
fn replay(s2c: &[u8], c2s: Shared) -> Result<(WorkerVersion, WorkerVersion, Option<String>, Seen), WorkerError> {
    let hello_nar = golden("hello-file.nar");
    let dir_nar = golden("dir.nar");
    let hello = info(sp(HELLO), &hello_nar, vec![], true);
    let dir = info(sp("wkhlvv9gz1j0889x719azhdbzi2mwkbb-dir"), &dir_nar, vec![], true);
    let ia = info(sp("11111111111111111111111111111111-ia"), &hello_nar, vec![hello.path.clone()], false);
    let bad = PathInfo { path: sp("22222222222222222222222222222222-bad"), ca: String::new(), nar_hash: "0".repeat(64), ..hello.clone() };
    let missing = sp("33333333333333333333333333333333-missing");
    let mut seen = Seen::default();
    let mut events = Vec::new();
    let mut ev = |e: Event| events.push(e);
    let mut c = WorkerConn::handshake(s2c, c2s, &mut ev)?;
    (seen.trust, seen.features) = (c.trust, c.daemon_features.clone());
    c.set_options(&ClientOptions::for_build(&BuildOptions::default(), 3, false), &mut ev)?;
    let asked = [missing.clone(), hello.path.clone()];
    seen.valid_before = c.query_valid_paths(&asked, false, &mut ev)?;
    c.add_to_store_nar(&hello, &mut &hello_nar[..], false, true, &mut ev)?;
    seen.valid_after = c.query_valid_paths(&asked, false, &mut ev)?;
    seen.info = c.query_path_info(&hello.path, &mut ev)?;
    seen.missing_info = c.query_path_info(&missing, &mut ev)?;
    match c.add_to_store_nar(&bad, &mut &hello_nar[..], false, true, &mut ev) {
        Err(e @ WorkerError::Remote { .. }) => seen.bad_upload = Some(e),
        other_reply => return Err(other(format!("bad upload: {other_reply:?}"))),
    }
    let nars = [dir_nar.clone(), hello_nar.clone()];
    c.add_multiple_to_store(&[dir, ia], &mut |i, w| w.write_all(&nars[i]), false, true, &mut ev)?;
    let mut r = c.nar_from_path(&hello.path, &mut ev)?;
    let mut hr = HashingReader::new(&mut r);
    remote_lib::nar::skip(&mut hr).map_err(|e| other(e.to_string()))?;
    let (_, n, _) = hr.finish();
    seen.nar = hello_nar[..n as usize].to_vec();
    for (name, slot) in [("worker-ok", &mut seen.built), ("worker-fail", &mut seen.failed)] {
        let (p, d) = drv(name);
        *slot = Some(c.build_derivation(&p, &d, &[], BuildMode::Normal, &mut ev)?);
    }
    seen.realisation = c.query_realisation(&format!("sha256:{}!out", "0".repeat(64)), &mut ev)?;
    match c.nar_from_path(&missing, &mut ev) {
        Err(e @ WorkerError::Remote { .. }) => seen.missing_nar = Some(e),
        Err(e) => return Err(e),
        Ok(_) => return Err(other("a NAR of a missing path".into())),
    }
    let (v, dv, nv) = (c.version, c.daemon_version, c.daemon_nix_version.clone());
    drop(c);
    seen.events = events;
    Ok((v, dv, nv, seen))
}

#[test]
fn decodes_the_trusted_session_captured_from_nix_2_34_and_sends_the_same_bytes() {
    let s2c = golden("worker-2.34-trusted-s2c.bin");
    let c2s = Shared::default();
    let (v, dv, nv, seen) = replay(&s2c, c2s.clone()).unwrap();
    assert_eq!((v, dv, nv.as_deref()), (WorkerVersion(1, 38), WorkerVersion(1, 38), Some("2.34.8")));
    assert_eq!((seen.trust, seen.features.as_slice()), (Some(Trust::Trusted), &[][..]));
    assert_eq!(seen.valid_before, Vec::<String>::new());
    assert_eq!(seen.valid_after, vec![sp(HELLO)]);
    let i = seen.info.unwrap();
    assert_eq!((i.path.as_str(), i.nar_size, i.nar_hash.as_str()), (sp(HELLO).as_str(), 120, HELLO_NAR_HASH));
    assert_eq!(i.ca, format!("fixed:r:{HELLO_NAR_HASH}"));
    assert_eq!((i.deriver.as_str(), i.references.len(), i.sigs.len()), ("", 0, 0));
    remote_lib::path_info::check(SD, &i).unwrap();
    assert_eq!(seen.missing_info, None);
    let Some(WorkerError::Remote { message, level, status, .. }) = seen.bad_upload else { panic!("{:?}", seen.bad_upload) };
    let m = plain(&message);
    assert!(m.starts_with("hash mismatch importing path '/tmp/bh-worker-golden/store/22222222222222222222222222222222-bad'"), "{m}");
    assert!(m.contains(HELLO_NAR_HASH), "{m}");
    assert!(message.contains("\u{1b}[35;1m"), "2.34 colours the path: {message:?}");
    assert_eq!((level, status), (Some(0), None));
    assert_eq!(seen.nar, golden("hello-file.nar"));
    let built = seen.built.unwrap();
    assert_eq!((built.result.status, built.is_non_deterministic), (BuildStatus::Built, false), "{built:?}");
    assert!(built.result.error_msg.is_empty(), "{built:?}");
    // Unlike 2.8 (timesBuilt 1, the start and stop times), 2.34's daemon
    // answers BuildDerivation with timesBuilt 0, times 0 and no CPU times
    // (1.37's optional fields, absent): Store::buildDerivation returns the
    // result of a trampoline goal, which does not carry them.
    assert_eq!((built.result.times_built, built.result.start_time, built.result.stop_time), (0, 0, 0), "{built:?}");
    assert_eq!((built.cpu_user_us, built.cpu_system_us), (None, None), "{built:?}");
    // the realisation of worker-ok's (input-addressed) output, as JSON
    let id = "sha256:16fb93a5c4b3b6754c5bb97610127cac56e833e438a568780bf1a93b295fe635!out";
    assert_eq!(built.built_outputs.keys().collect::<Vec<_>>(), [id], "{built:?}");
    assert_eq!(built.built_outputs[id], format!("{{\"dependentRealisations\":{{}},\"id\":\"{id}\",\"outPath\":\"6ppva4bvwn3sq4fr7hdh3siawbi1w01z-worker-ok\",\"signatures\":[]}}"));
    let failed = seen.failed.unwrap();
    assert_eq!((failed.result.status, failed.result.times_built, failed.built_outputs.len()), (BuildStatus::PermanentFailure, 0, 0), "{failed:?}");
    let m = plain(&failed.result.error_msg);
    assert!(m.contains("Cannot build '/tmp/bh-worker-golden/store/my0zn2ji0x73g1ii4kgwarggy9b4ms83-worker-fail.drv'"), "{m}");
    assert!(m.contains("builder failed with exit code 1") && m.contains("> failing on purpose"), "{m}");
    assert_eq!(seen.realisation, None);
    let Some(WorkerError::Remote { message, .. }) = seen.missing_nar else { panic!("{:?}", seen.missing_nar) };
    assert_eq!(plain(&message), "path '/tmp/bh-worker-golden/store/33333333333333333333333333333333-missing' is not a valid store path");
    // the build's log came as a BuildLogLine (101) result, its start as a Build (105) activity
    let log_line = seen.events.iter().any(|e| matches!(e, Event::Result { result_type: 101, fields, .. } if fields == &[Field::String("building worker-ok".into())]));
    assert!(log_line, "{:#?}", seen.events);
    let start = seen.events.iter().find(|e| matches!(e, Event::StartActivity { activity_type: 105, .. })).unwrap();
    assert!(start.nix_log_line().contains("\"action\":\"start\"") && start.nix_log_line().contains("worker-ok.drv"));
    let fail_line = seen.events.iter().any(|e| matches!(e, Event::Result { result_type: 101, fields, .. } if fields == &[Field::String("failing on purpose".into())]));
    assert!(fail_line, "{:#?}", seen.events);
    // our requests are byte for byte what the independent recorder sent and the daemon accepted
    let sent = c2s.0.lock().unwrap().clone();
    let want = golden("worker-2.34-trusted-c2s.bin");
    let first_diff = sent.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!((first_diff, sent.len()), (None, want.len()));
}

#[test]
fn the_untrusted_session_of_nix_2_34_says_so_and_reports_the_daemons_words_with_a_hint() {
    let s2c = golden("worker-2.34-untrusted-s2c.bin");
    let hello_nar = golden("hello-file.nar");
    let ia = info(sp("11111111111111111111111111111111-ia"), &hello_nar, vec![sp(HELLO)], false);
    let mut c = WorkerConn::handshake(&s2c[..], io::sink(), |_| {}).unwrap();
    assert_eq!((c.version, c.trust, c.daemon_nix_version.as_deref()), (WorkerVersion(1, 38), Some(Trust::NotTrusted), Some("2.34.8")));
    let e = c.add_to_store_nar(&ia, &mut &hello_nar[..], false, true, |_| {}).unwrap_err();
    let WorkerError::Remote { message, level, .. } = &e else { panic!("{e:?}") };
    assert_eq!(plain(message), "cannot add path '/tmp/bh-worker-golden/store/11111111111111111111111111111111-ia' because it lacks a signature by a trusted key");
    assert_eq!(*level, Some(0));
    assert!(e.untrusted_hint().unwrap().contains("trusted-users"));
    let (p, d) = drv("worker-ok");
    let e = c.build_derivation(&p, &d, &[], BuildMode::Normal, |_| {}).unwrap_err();
    assert!(e.to_string().contains("you are not privileged to build input-addressed derivations"), "{e}");
    assert!(e.untrusted_hint().unwrap().contains("trusted-users"));
    let i = c.query_path_info(&sp(HELLO), |_| {}).unwrap().unwrap();
    assert_eq!((i.nar_size, i.nar_hash.as_str()), (120, HELLO_NAR_HASH));
    // then the daemon hangs up
    let mut rest = Vec::new();
    c.reader().read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn truncated_or_mutated_replies_of_nix_2_34_are_errors_not_panics() {
    let s2c = golden("worker-2.34-trusted-s2c.bin");
    // like 2.8, 2.34 sends the last error twice (before it hangs up); the client reads the first
    let tag = STDERR_ERROR.to_le_bytes();
    let second = s2c.windows(8).rposition(|w| w == tag).unwrap();
    for cut in (0..second).step_by(7) {
        assert!(replay(&s2c[..cut], Shared::default()).is_err(), "cut at {cut} accepted");
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..1500 {
        let mut m = s2c.clone();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let at = (state as usize) % m.len();
        m[at] = match i % 3 {
            0 => m[at] ^ (1 << (state >> 61)),
            1 => 0xff,
            _ => 0,
        };
        let _ = replay(&m, Shared::default());
    }
    let u = golden("worker-2.34-untrusted-s2c.bin");
    for cut in 0..u.len() {
        let Ok(mut c) = WorkerConn::handshake(&u[..cut], io::sink(), |_| {}) else { continue };
        let _ = c.query_path_info("/x", |_| {});
    }
}
