//! The worker-protocol client against a real `nix-daemon --stdio` serving a
//! throw-away store in a temporary directory (never the host's store or
//! daemon): handshake, uploads, path info, NAR download, builds. Skipped
//! when `nix-daemon` is not installed. A watchdog kills the daemon after a
//! minute, so nothing can hang.

// A test: unwrapping is how it fails, and it says when it skips.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use remote_lib::derivation::Derivation;
use remote_lib::hash::HashingReader;
use remote_lib::hook_protocol::BuildOptions;
use remote_lib::serve::{BuildStatus, PathInfo};
use remote_lib::worker::{BuildMode, ClientOptions, Event, Trust, WorkerConn, WorkerError, WorkerVersion};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

struct Store {
    dir: PathBuf,
}

impl Store {
    fn new() -> Store {
        let dir = std::env::temp_dir().join(format!("bh-worker-daemon-{}", std::process::id()));
        let _ = remote_lib::nar::remove_tree(&dir);
        for d in ["etc", "store", "state", "log"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let conf = "build-users-group =\nsandbox = false\nsubstituters =\nrequire-sigs = true\nexperimental-features = nix-command\n";
        std::fs::write(dir.join("etc/nix.conf"), conf).unwrap();
        Store { dir }
    }
    fn store_dir(&self) -> String {
        self.dir.join("store").to_str().unwrap().to_string()
    }
    /// A command for this store only.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("timeout");
        c.arg(LIMIT.as_secs().to_string()).arg(program);
        c.env("NIX_STORE_DIR", self.dir.join("store"))
            .env("NIX_STATE_DIR", self.dir.join("state"))
            .env("NIX_LOG_DIR", self.dir.join("log"))
            .env("NIX_CONF_DIR", self.dir.join("etc"))
            .env("NIX_USER_CONF_FILES", self.dir.join("etc/nix.conf"))
            .env("NIX_REMOTE", "local");
        c
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = remote_lib::nar::remove_tree(&self.dir);
    }
}

fn have_nix_daemon() -> bool {
    Command::new("nix-daemon").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

fn nar_info(path: String, nar: &[u8], references: Vec<String>) -> PathInfo {
    let mut hr = HashingReader::new(nar);
    io::copy(&mut hr, &mut io::sink()).unwrap();
    let (h, n, _) = hr.finish();
    PathInfo { path, deriver: String::new(), references, nar_size: n, nar_hash: h.to_nix32_prefixed(), ca: String::new(), sigs: vec![] }
}

fn tree(at: &Path, text: &str) -> Vec<u8> {
    std::fs::create_dir_all(at.join("sub")).unwrap();
    std::fs::write(at.join("sub/f"), text).unwrap();
    let mut nar = Vec::new();
    remote_lib::nar::dump(at, &mut nar).unwrap();
    nar
}

#[test]
fn a_session_with_a_real_nix_daemon() {
    if !have_nix_daemon() {
        eprintln!("skipped: no nix-daemon");
        return;
    }
    let store = Store::new();
    let sd = store.store_dir();
    let mut child = store.command("nix-daemon").arg("--stdio").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > LIMIT {
                    // the daemon this test started, by its id
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (r, w) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let mut log = Vec::new();
    let mut c = WorkerConn::handshake(r, w, |e| log.push(e)).unwrap();
    assert!(c.version >= WorkerVersion(1, 21), "{}", c.version);
    if c.version >= WorkerVersion(1, 35) {
        assert_eq!(c.trust, Some(Trust::Trusted), "--stdio is trusted");
    } else {
        assert_eq!(c.trust, None, "protocol {} does not say", c.version);
    }
    assert!(c.daemon_nix_version.as_deref().is_some_and(|v| v.starts_with('2')), "{:?}", c.daemon_nix_version);
    c.set_options(&ClientOptions::for_build(&BuildOptions { build_timeout: 60, ..Default::default() }, 3, false), |e| log.push(e)).unwrap();

    // upload one path, read its info and NAR back
    let nar = tree(&store.dir.join("t1"), "hello\n");
    let one = nar_info(format!("{sd}/0a6ym3rfcb3d0bza3ckh2j6hfa1ds11m-one"), &nar, vec![]);
    assert_eq!(c.query_valid_paths(std::slice::from_ref(&one.path), false, |_| {}).unwrap(), Vec::<String>::new());
    c.add_to_store_nar(&one, &mut &nar[..], false, true, |e| log.push(e)).unwrap();
    let info = c.query_path_info(&one.path, |_| {}).unwrap().expect("valid after the upload");
    assert_eq!((info.nar_hash.as_str(), info.nar_size), (one.nar_hash.as_str(), one.nar_size));
    remote_lib::path_info::check(&sd, &info).unwrap();
    let mut r = c.nar_from_path(&one.path, |_| {}).unwrap();
    let mut hr = HashingReader::new(&mut r);
    remote_lib::nar::skip(&mut hr).unwrap();
    let (h, n, _) = hr.finish();
    assert_eq!((h.to_nix32_prefixed(), n), (one.nar_hash.clone(), one.nar_size));

    // a wrong hash is the daemon's error, and the session goes on
    let wrong = PathInfo { path: format!("{sd}/1a6ym3rfcb3d0bza3ckh2j6hfa1ds11m-wrong"), nar_hash: format!("sha256:{}", "0".repeat(52)), ..one.clone() };
    let e = c.add_to_store_nar(&wrong, &mut &nar[..], false, true, |_| {}).unwrap_err();
    assert!(matches!(&e, WorkerError::Remote { message, .. } if message.contains("hash mismatch")), "{e}");

    // two paths in one stream, the second referring to the first
    let two_nar = tree(&store.dir.join("t2"), "two\n");
    let two = nar_info(format!("{sd}/2a6ym3rfcb3d0bza3ckh2j6hfa1ds11m-two"), &two_nar, vec![]);
    let three = nar_info(format!("{sd}/3a6ym3rfcb3d0bza3ckh2j6hfa1ds11m-three"), &nar, vec![two.path.clone()]);
    if c.version >= WorkerVersion(1, 32) {
        let nars = [two_nar.clone(), nar.clone()];
        c.add_multiple_to_store(&[two.clone(), three.clone()], &mut |i, w| w.write_all(&nars[i]), false, true, |_| {}).unwrap();
        let mut valid = c.query_valid_paths(&[three.path.clone(), two.path.clone()], false, |_| {}).unwrap();
        valid.sort();
        assert_eq!(valid, vec![two.path.clone(), three.path.clone()]);
        assert_eq!(c.query_path_info(&three.path, |_| {}).unwrap().unwrap().references, vec![two.path.clone()]);
    }

    // build a trivial derivation made by this store's nix-instantiate
    let expr = "derivation { name = \"worker-it\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo building; echo hello > $out\" ]; }";
    let out = store.command("nix-instantiate").args(["--expr", expr]).stderr(Stdio::null()).output().unwrap();
    assert!(out.status.success());
    let drv_path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut text = Vec::new();
    std::fs::File::open(&drv_path).unwrap().read_to_end(&mut text).unwrap();
    let drv = Derivation::parse(&drv_path, &text).unwrap();
    let mut events = Vec::new();
    let res = c.build_derivation(&drv_path, &drv, &[], BuildMode::Normal, |e| events.push(e)).unwrap();
    assert_eq!(res.result.status, BuildStatus::Built, "{res:?}");
    assert_eq!(std::fs::read(&drv.outputs[0].path).unwrap(), b"hello\n");
    let logged = events.iter().any(|e| matches!(e, Event::Result { result_type: 101, .. }) && e.nix_log_line().contains("building"));
    assert!(logged, "{events:#?}");

    drop(c);
    let status = child.wait().unwrap();
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    assert!(status.success(), "the daemon ended with {status}");
}
