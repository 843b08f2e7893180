//! The current-load directory (as in Nix's `src/build-remote/build-remote.cc`), shared with Nix's built-in hook:
//! `main-lock`, one `<E>-<slot>` file per machine slot and `<E>.upload-lock`,
//! where `E` is the store URI with `/` replaced by `_`. All are `flock(2)`
//! locks on files opened `O_RDWR|O_CREAT|O_CLOEXEC` with mode 0600, so both
//! hooks running side by side never exceed a machine's max jobs. A lock lives
//! as long as its open file: it dies with the process.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A problem with the load directory.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot open lock file '{path}'")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock '{path}'")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A held `flock`; released when dropped.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    pub path: PathBuf,
}

impl FileLock {
    /// Bumps the file's mtime, as the built-in hook does when it takes a slot.
    pub fn touch(&self) {
        let _ = self.file.set_modified(std::time::SystemTime::now());
    }
}

/// A held slot on a machine.
#[derive(Debug)]
pub struct Slot {
    pub index: u64,
    pub lock: FileLock,
}

/// The load directory.
#[derive(Clone, Debug)]
pub struct LoadDir {
    pub path: PathBuf,
}

/// `E`: the URI with every `/` replaced by `_`.
pub fn escape_uri(uri: &str) -> String {
    uri.replace('/', "_")
}

/// The file name for a machine's `uri` with `suffix`: `E` + suffix as Nix's
/// hook names it, or, when that is longer than a file name may be (255
/// bytes; Nix's own hook cannot use such a machine at all), `uri-` and a
/// hash of the URI + suffix.
pub fn file_name(uri: &str, suffix: &str) -> String {
    let name = format!("{}{suffix}", escape_uri(uri));
    if name.len() <= 255 {
        return name;
    }
    use sha2::Digest;
    format!("uri-{}{suffix}", crate::hash::nix32_encode(&sha2::Sha256::digest(uri.as_bytes())[..20]))
}

impl LoadDir {
    /// Opens (and creates, like Nix, ignoring errors) the directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let _ = fs::create_dir_all(&path);
        LoadDir { path }
    }

    fn open(&self, name: &str) -> Result<(File, PathBuf), SlotError> {
        let path = self.path.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| SlotError::Open { path: path.clone(), source })?;
        Ok((file, path))
    }

    /// Takes the lock, waiting for it.
    fn lock(file: &File, path: &Path) -> Result<(), SlotError> {
        loop {
            match file.lock() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map_err(|source| SlotError::Lock { path: path.to_path_buf(), source }),
            }
        }
    }

    /// Takes the lock if it is free: `false` when someone holds it.
    fn try_lock(file: &File, path: &Path) -> Result<bool, SlotError> {
        match file.try_lock() {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(source)) => Err(SlotError::Lock { path: path.to_path_buf(), source }),
        }
    }

    fn lock_blocking(&self, name: &str) -> Result<FileLock, SlotError> {
        let (file, path) = self.open(name)?;
        Self::lock(&file, &path)?;
        Ok(FileLock { file, path })
    }

    /// Takes `main-lock` (blocking), held while a machine is chosen.
    pub fn main_lock(&self) -> Result<FileLock, SlotError> {
        self.lock_blocking("main-lock")
    }

    /// Takes the machine's upload lock (blocking). `E.upload-lock`, or a
    /// hashed name when that is too long for the filesystem.
    pub fn upload_lock(&self, uri: &str) -> Result<FileLock, SlotError> {
        self.lock_blocking(&file_name(uri, ".upload-lock"))
    }

    /// Tries the machine's upload lock until `deadline`; `None` when it is
    /// still held then (the caller may upload without it).
    pub fn upload_lock_until(&self, uri: &str, deadline: std::time::Instant) -> Result<Option<FileLock>, SlotError> {
        let (file, path) = self.open(&file_name(uri, ".upload-lock"))?;
        loop {
            if Self::try_lock(&file, &path)? {
                return Ok(Some(FileLock { file, path }));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Probes the slots of a machine: the first free one is kept, the others
    /// released. Returns the slot (if any) and the number of busy slots.
    pub fn probe(&self, uri: &str, max_jobs: u64) -> Result<(Option<Slot>, u64), SlotError> {
        let mut kept = None;
        let mut busy = 0;
        for i in 0..max_jobs {
            let (file, path) = self.open(&file_name(uri, &format!("-{i}")))?;
            if Self::try_lock(&file, &path)? {
                if kept.is_none() {
                    kept = Some(Slot { index: i, lock: FileLock { file, path } });
                }
            } else {
                busy += 1;
            }
        }
        Ok((kept, busy))
    }

    /// Whether slot `slot` of `uri` is held by some process now.
    pub fn slot_held(&self, uri: &str, slot: u64) -> bool {
        match self.open(&file_name(uri, &format!("-{slot}"))) {
            Ok((f, _)) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }

    /// A private subdirectory of ours (health records, control sockets).
    pub fn private_dir(&self, name: &str) -> PathBuf {
        let p = self.path.join("build-hook").join(name);
        let _ = fs::create_dir_all(&p);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> LoadDir {
        let p = std::env::temp_dir().join(format!("slots-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        LoadDir::new(p)
    }

    #[test]
    fn names_match_the_built_in_hook() {
        assert_eq!(escape_uri("ssh://b1"), "ssh:__b1");
        assert_eq!(escape_uri("ssh://b1?remote-program=/usr/bin/nix-store&compress=true"), "ssh:__b1?remote-program=_usr_bin_nix-store&compress=true");
        let d = dir("names");
        let (s, busy) = d.probe("ssh://root@10.201.21.2", 2).unwrap();
        assert_eq!((s.as_ref().unwrap().index, busy), (0, 0));
        assert!(d.path.join("ssh:__root@10.201.21.2-0").exists());
        assert!(d.path.join("ssh:__root@10.201.21.2-1").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(d.path.join("ssh:__root@10.201.21.2-0")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn slots_fill_up_and_free_on_drop() {
        let d = dir("fill");
        let (a, _) = d.probe("ssh://b", 2).unwrap();
        let (b, busy) = d.probe("ssh://b", 2).unwrap();
        assert_eq!((a.as_ref().unwrap().index, b.as_ref().unwrap().index, busy), (0, 1, 1));
        let (c, busy) = d.probe("ssh://b", 2).unwrap();
        assert!(c.is_none());
        assert_eq!(busy, 2);
        drop(a);
        let (c, busy) = d.probe("ssh://b", 2).unwrap();
        assert_eq!((c.unwrap().index, busy), (0, 1));
        let (none, busy) = d.probe("ssh://zero", 0).unwrap();
        assert!(none.is_none() && busy == 0);
    }

    #[test]
    fn a_uri_too_long_for_a_file_name_still_gets_slots() {
        let d = dir("long");
        let uri = format!("ssh://b1?remote-program=/{}", "x".repeat(400));
        let (a, busy) = d.probe(&uri, 2).unwrap();
        assert_eq!((a.as_ref().map(|s| s.index), busy), (Some(0), 0));
        assert!(a.as_ref().unwrap().lock.path.file_name().unwrap().len() <= 255);
        let (b, busy) = d.probe(&uri, 2).unwrap();
        assert_eq!((b.as_ref().map(|s| s.index), busy), (Some(1), 1));
        assert!(d.slot_held(&uri, 0) && d.slot_held(&uri, 1));
        drop((a, b));
        assert!(!d.slot_held(&uri, 0));
        assert!(d.upload_lock_until(&uri, std::time::Instant::now()).unwrap().is_some());
        assert_eq!(file_name("ssh://b1", "-0"), "ssh:__b1-0", "short URIs keep Nix's names");
    }

    #[test]
    fn the_upload_lock_waits_until_its_deadline_at_most() {
        let d = dir("upl");
        let held = d.upload_lock("ssh://b").unwrap();
        let t = std::time::Instant::now();
        assert!(d.upload_lock_until("ssh://b", t + std::time::Duration::from_millis(200)).unwrap().is_none());
        assert!(t.elapsed() >= std::time::Duration::from_millis(200) && t.elapsed() < std::time::Duration::from_secs(2));
        drop(held);
        assert!(d.upload_lock_until("ssh://b", std::time::Instant::now()).unwrap().is_some());
    }

    #[test]
    fn a_held_slot_is_seen_by_another_process() {
        // flock(1) from util-linux stands in for Nix's built-in hook.
        let d = dir("proc");
        let slot = d.path.join("ssh:__b-0");
        fs::write(&slot, "").unwrap();
        // The child says when it holds the lock; probing before that could take it first.
        let ready = d.path.join("ready");
        let mut child =
            std::process::Command::new("flock").arg("-o").arg(&slot).arg("-c").arg(format!("touch '{}'; sleep 30", ready.display())).spawn().expect("flock(1) from util-linux");
        for _ in 0..1000 {
            if ready.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (s, busy) = d.probe("ssh://b", 1).unwrap();
        assert!(s.is_none() && busy == 1);
        child.kill().unwrap();
        child.wait().unwrap();
        let (s, _) = d.probe("ssh://b", 1).unwrap();
        assert!(s.is_some());
    }
}
