//! Throw-away Nix stores under a temporary root (`nix-store --store DIR`),
//! and sessions with them, for the middle test tier: real `nix-store`, no
//! root-only setup, no namespaces, no ssh.

#![allow(dead_code)]

use remote_lib::local_store::{LocalServe, LocalStore};
use remote_lib::serve::{PathInfo, ServeConn};
use remote_lib::store_path::StorePath;
use remote_lib::transport::{ProcIn, ProcOut, RemoteProcess, StderrTap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

pub const STORE_DIR: &str = "/nix/store";

/// Fails the test, saying what to do, when Nix is not installed: this tier
/// must never pass by skipping. Asked once per test process (Nix 2.8's
/// `nix-store --version` opens the system store's database), and the failure
/// says how the tool failed: one such check failed once in a fresh CI run, on
/// a machine where Nix had just been installed, and did not say why.
pub fn require_nix() {
    static FOUND: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let found = FOUND.get_or_init(|| {
        for tool in ["nix-store", "nix-instantiate", "nix-build", "zstd"] {
            let ran = Command::new(tool).arg("--version").output();
            if !ran.as_ref().is_ok_and(|o| o.status.success()) {
                return Err(format!("'{tool}' is not on PATH or does not run ({ran:?}): the local-store tests need Nix and zstd; run scripts/install-deps.sh"));
            }
        }
        Ok(())
    });
    if let Err(e) = found {
        panic!("{e}");
    }
}

/// A temporary directory removed with everything in it (store paths are
/// read-only, so it is made writable first).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        require_nix();
        let dir = tempfile::Builder::new().prefix(&format!("bh-tier-{name}-")).tempdir().expect("a temporary directory");
        Scratch { dir: Some(dir) }
    }
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("alive").path()
    }
    /// A store root inside the scratch directory (created on first use by
    /// `nix-store`).
    pub fn store(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            remote_lib::nar::make_writable(d.path());
            let _ = d.close();
        }
    }
}

/// Runs `nix-store --store ROOT ARGS` and returns its stdout; panics with
/// its stderr if it fails.
pub fn nix_store(root: &Path, args: &[&str]) -> String {
    let out = Command::new("nix-store").arg("--store").arg(root).args(args).output().expect("running nix-store");
    assert!(out.status.success(), "nix-store --store {} {args:?} failed: {}", root.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Creates an empty store at `root` (directory and database), as a local
/// store exists before the hook runs.
pub fn init_store(root: &Path) {
    nix_store(root, &["--init"]);
}

/// Adds `n` small distinct files to the store at `root` (one nix-store call).
pub fn add_files(root: &Path, scratch: &Path, prefix: &str, n: usize) -> Vec<String> {
    let src = scratch.join(format!("src-{prefix}"));
    std::fs::create_dir_all(&src).expect("mkdir");
    let mut files = Vec::with_capacity(n);
    for i in 0..n {
        let f = src.join(format!("{prefix}{i}"));
        std::fs::write(&f, format!("{prefix} number {i}\n")).expect("write");
        files.push(f.to_string_lossy().into_owned());
    }
    let mut args = vec!["--add"];
    args.extend(files.iter().map(String::as_str));
    let paths: Vec<String> = nix_store(root, &args).lines().map(str::to_string).collect();
    assert_eq!(paths.len(), n);
    paths
}

/// Evaluates `expr` (which must yield a store path string) in the store at
/// `root`, writing what it creates (`builtins.toFile`, `.drv` files).
pub fn eval_path(root: &Path, expr: &str) -> String {
    let out = Command::new("nix-instantiate").arg("--store").arg(root).args(["--read-write-mode", "--eval", "-E", expr]).output().expect("running nix-instantiate");
    assert!(out.status.success(), "nix-instantiate failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().trim_matches('"').to_string()
}

/// A closure with references made in the store at `root` without building:
/// `leaf`, `mid` (refers to leaf) and `top` (refers to mid and leaf), as
/// `builtins.toFile` text paths. `tag` makes the paths unique to a test.
/// Returns `[leaf, mid, top]`.
pub fn text_closure(root: &Path, tag: &str) -> [String; 3] {
    let leaf = eval_path(root, &format!("builtins.toFile \"leaf-{tag}\" \"a leaf\""));
    let mid = eval_path(root, &format!("builtins.toFile \"mid-{tag}\" \"mid refers to ${{builtins.toFile \"leaf-{tag}\" \"a leaf\"}}\""));
    let top = eval_path(
        root,
        &format!("let leaf = builtins.toFile \"leaf-{tag}\" \"a leaf\"; mid = builtins.toFile \"mid-{tag}\" \"mid refers to ${{leaf}}\"; in builtins.toFile \"top-{tag}\" \"top: ${{mid}} ${{leaf}}\""),
    );
    [leaf, mid, top]
}

/// A directory with a plain file, an executable, a subdirectory and a
/// symlink, added to the store at `root`.
pub fn add_tree(root: &Path, scratch: &Path, name: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch.join(name);
    std::fs::create_dir_all(d.join("bin")).expect("mkdir");
    std::fs::write(d.join("data"), format!("some data of {name}\n").repeat(100)).expect("write");
    std::fs::write(d.join("bin/run"), "#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(d.join("bin/run"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink("bin/run", d.join("link")).expect("symlink");
    nix_store(root, &["--add", &d.to_string_lossy()]).trim().to_string()
}

/// Which of `paths` are valid in the store at `root`.
pub fn valid_paths(root: &Path, paths: &[String]) -> Vec<String> {
    let mut args = vec!["--check-validity", "--print-invalid"];
    args.extend(paths.iter().map(String::as_str));
    let invalid: Vec<String> = nix_store(root, &args).lines().map(str::to_string).collect();
    paths.iter().filter(|p| !invalid.contains(p)).cloned().collect()
}

/// The references of `path` in the store at `root`, sorted.
pub fn references(root: &Path, path: &str) -> Vec<String> {
    let mut r: Vec<String> = nix_store(root, &["-q", "--references", path]).lines().map(str::to_string).collect();
    r.sort();
    r
}

/// `nix-store --verify-path` succeeds (the contents hash as registered).
pub fn verify_path(root: &Path, path: &str) {
    nix_store(root, &["--verify-path", path]);
}

/// Where `path` is on disk in the store at `root`.
pub fn on_disk(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Entries of the store directory at `root` whose names contain `needle`.
pub fn store_entries(root: &Path, needle: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(root.join("nix/store")) else { return vec![] };
    rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(needle)).collect()
}

/// The hook's view of the store at `root`.
pub fn local_store(root: &Path) -> LocalStore {
    LocalStore::from_setting(Some(&root.to_string_lossy()), "nix-store")
}

/// A read-only `nix-store --serve` of the store at `root`, through the
/// library (as the hook opens its local store).
pub fn local_serve(root: &Path) -> LocalServe {
    let s = local_store(root);
    let p = s.spawn_serve().expect("spawning nix-store --serve");
    s.serve_handshake(p, Duration::from_secs(30)).expect("local handshake")
}

/// The builder's `nix-store`: builds in a store under another root always
/// run chrooted on Linux (Nix forces it whatever `sandbox` says), so the
/// host's `/bin/sh` and its libraries are made visible there.
pub fn builder_program(s: &Scratch) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dirs: Vec<&str> = ["/bin", "/lib", "/lib64", "/usr"].into_iter().filter(|d| Path::new(d).exists()).collect();
    let script = s.path().join("builder-nix-store");
    std::fs::write(&script, format!("#!/bin/sh\nexec nix-store --option sandbox-paths '{}' --option build-users-group '' --option substituters '' \"$@\"\n", dirs.join(" ")))
        .expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

/// A "builder": `nix-store --serve --write` of the store at `root`, no ssh.
pub fn builder_serve(root: &Path) -> (RemoteProcess, ServeConn<ProcOut, ProcIn>) {
    let mut c = Command::new("nix-store");
    c.args(["--serve", "--write", "--store"]).arg(root);
    let mut p = RemoteProcess::spawn(c, StderrTap::default()).expect("spawning nix-store --serve --write");
    let (r, w) = (p.stdout.take().expect("stdout"), p.stdin.take().expect("stdin"));
    let conn = ServeConn::handshake(r, w).expect("builder handshake");
    (p, conn)
}

/// A bulk session with the store at `root`, as `bulk_script` makes it for
/// localhost: `sh -c SCRIPT` with `{serve}` replaced by the serve command.
pub fn bulk_process(root: &Path, script: &str) -> RemoteProcess {
    let serve = format!("nix-store --serve --write --store '{}'", root.display());
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(script.replace("{serve}", &serve));
    RemoteProcess::spawn(c, StderrTap::default()).expect("spawning a bulk session")
}

/// Store paths parsed for the library.
pub fn store_paths(paths: &[String]) -> Vec<StorePath> {
    paths.iter().map(|p| StorePath::parse(STORE_DIR, p).expect("a store path")).collect()
}

/// Sum of the NAR sizes.
pub fn nar_bytes(infos: &[PathInfo]) -> u64 {
    infos.iter().map(|i| i.nar_size).sum()
}

/// Runs `f` on a thread and fails the test if it does not return within
/// `limit` (a deadlock must fail, not hang the suite). On a timeout the
/// processes whose command line mentions `kill_marker` are killed first so
/// that the thread can end.
pub fn within<T: Send + 'static>(limit: Duration, kill_marker: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = t.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            for pid in pids_with(kill_marker) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            panic!("did not finish within {} s (deadlock?)", limit.as_secs());
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
    }
}

/// Processes (children of any process) whose command line contains `marker`.
pub fn pids_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) {
                out.push(pid);
            }
        }
    }
    out
}
