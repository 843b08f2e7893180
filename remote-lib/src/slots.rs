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
use std::time::{Duration, Instant};

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

/// The signal that interrupts a thread blocked in `flock` (see
/// [`LoadDir::wait_any`]).
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

/// Installs (once) a handler for [`interrupt_signal`] that does nothing and
/// does not restart system calls, so the signal only makes `flock` return.
fn interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn nothing(_: libc::c_int) {}
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler that touches nothing, no SA_RESTART.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut());
        }
    });
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

/// The lock file of queue ticket `t` of a machine's `uri` (beside its slots).
pub fn ticket_name(uri: &str, t: u64) -> String {
    file_name(uri, &format!("-queue-{t}"))
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

    /// Waits for the machine's upload lock until `deadline` at most; `None`
    /// when it is still held then (the caller may upload without it).
    pub fn upload_lock_until(&self, uri: &str, deadline: Instant) -> Result<Option<FileLock>, SlotError> {
        Ok(self.wait_first(&[file_name(uri, ".upload-lock")], deadline)?.map(|(_, l)| l))
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

    /// Waits for the first of `slots` (`(uri, slot index)`) to be free and
    /// takes it, until `deadline` at most ([`Self::wait_first`]). Returns the
    /// position in `slots` and the slot, or `None` at the deadline.
    pub fn wait_any(&self, slots: &[(String, u64)], deadline: Instant) -> Result<Option<(usize, Slot)>, SlotError> {
        let names: Vec<String> = slots.iter().map(|(uri, i)| file_name(uri, &format!("-{i}"))).collect();
        Ok(self.wait_first(&names, deadline)?.map(|(k, lock)| (k, Slot { index: slots[k].1, lock })))
    }

    /// Takes the first of the lock files `names` to be free, blocking in
    /// `flock(2)` (the kernel wakes us the moment its holder releases it or
    /// exits) until `deadline` at most: its position and the lock, or `None`.
    ///
    /// One thread waits on each file; the first to get its lock wins. The
    /// others are interrupted with a signal whose handler does nothing (so
    /// their `flock` returns `EINTR`), and one that got a lock anyway after
    /// the winner releases it at once.
    pub fn wait_first(&self, names: &[String], deadline: Instant) -> Result<Option<(usize, FileLock)>, SlotError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::thread::JoinHandleExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        // Anything free now is taken without a thread.
        let mut files = Vec::with_capacity(names.len());
        for (k, name) in names.iter().enumerate() {
            let (file, path) = self.open(name)?;
            if Self::try_lock(&file, &path)? {
                return Ok(Some((k, FileLock { file, path })));
            }
            files.push((file, path));
        }
        if files.is_empty() || Instant::now() >= deadline {
            return Ok(None);
        }
        interrupt_handler();
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<(usize, Result<FileLock, SlotError>)>();
        let mut waiters = Vec::with_capacity(files.len());
        let mut spawn_failed = None;
        let first_path = files[0].1.clone();
        for (k, (file, path)) in files.into_iter().enumerate() {
            let (done, tx) = (done.clone(), tx.clone());
            let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || loop {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                // SAFETY: flock on a file descriptor this thread owns.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    // A lock taken after the winner is dropped (released) here or by the receiver.
                    if !done.load(Ordering::SeqCst) {
                        let _ = tx.send((k, Ok(FileLock { file, path })));
                    }
                    return;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    let _ = tx.send((k, Err(SlotError::Lock { path, source: e })));
                    return;
                }
            });
            match spawned {
                Ok(w) => waiters.push(w),
                Err(e) => {
                    spawn_failed = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let got = match spawn_failed {
            Some(source) => Err(SlotError::Lock { path: first_path, source }),
            None => match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((k, Ok(lock))) => Ok(Some((k, lock))),
                Ok((_, Err(e))) => Err(e),
                Err(_) => Ok(None),
            },
        };
        done.store(true, Ordering::SeqCst);
        // Interrupt every waiter until it has ended (a signal that lands just
        // before its flock call is lost, so it is sent again).
        for _ in 0..500 {
            let mut left = false;
            for w in waiters.iter().filter(|w| !w.is_finished()) {
                left = true;
                // SAFETY: the thread has not been joined, so its pthread_t is valid.
                unsafe { libc::pthread_kill(w.as_pthread_t(), interrupt_signal()) };
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Locks taken by the losers in the meantime are released as they drop.
        while rx.try_recv().is_ok() {}
        for w in waiters {
            if w.is_finished() {
                let _ = w.join();
            }
        }
        got
    }

    /// Whether slot `slot` of `uri` is held by some process now.
    pub fn slot_held(&self, uri: &str, slot: u64) -> bool {
        self.is_held(&file_name(uri, &format!("-{slot}")))
    }

    /// Whether the lock file `name` (as [`file_name`] makes it) is held by
    /// some process now. Only looks: a file that does not exist is not
    /// created (nobody holds it).
    pub fn is_held(&self, name: &str) -> bool {
        match File::open(self.path.join(name)) {
            Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
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
        // Another test's process, forked but not yet exec'd, may share the
        // lock's descriptor for a moment.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while d.slot_held(&uri, 0) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
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
        // Not before the deadline; the upper bound only catches a wait that
        // ignored it (a loaded CI machine may be slow to wake the waiter).
        let took = t.elapsed();
        assert!(took >= std::time::Duration::from_millis(200) && took < std::time::Duration::from_secs(10), "waited {took:?}");
        drop(held);
        assert!(d.upload_lock_until("ssh://b", std::time::Instant::now()).unwrap().is_some());
    }

    #[test]
    fn a_held_slot_is_seen_by_another_process() {
        // flock(1) from util-linux stands in for Nix's built-in hook.
        let d = dir("proc");
        let mut child = hold(&d, "ssh:__b-0");
        let (s, busy) = d.probe("ssh://b", 1).unwrap();
        assert!(s.is_none() && busy == 1);
        child.kill().unwrap();
        child.wait().unwrap();
        let (s, _) = d.probe("ssh://b", 1).unwrap();
        assert!(s.is_some());
    }

    /// Holds `file`'s flock in a child process (flock(1), as another hook
    /// would) until the child is killed; returns once it holds it.
    fn hold(d: &LoadDir, name: &str) -> std::process::Child {
        let file = d.path.join(name);
        fs::write(&file, "").unwrap();
        let ready = d.path.join(format!("{name}.ready"));
        let child = std::process::Command::new("flock").arg("-o").arg(&file).arg("-c").arg(format!("touch '{}'; sleep 60", ready.display())).spawn().expect("flock(1)");
        for _ in 0..1000 {
            if ready.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn a_waiter_wakes_when_a_held_slot_is_released_and_the_others_stay_free() {
        let d = dir("wait");
        let mut a = hold(&d, "ssh:__b-0");
        let mut b = hold(&d, "ssh:__c-0");
        let want = [("ssh://b".to_string(), 0), ("ssh://c".to_string(), 0)];
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            b.kill().unwrap();
            b.wait().unwrap();
        });
        let t = Instant::now();
        let got = d.wait_any(&want, t + Duration::from_secs(30)).unwrap();
        releaser.join().unwrap();
        let (k, slot) = got.expect("the slot released after 300 ms");
        assert_eq!((k, slot.index), (1, 0), "the slot that was released");
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(10), "woken by the release, long before the deadline");
        // The thread that waited on b's slot must not be left holding it.
        a.kill().unwrap();
        a.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (free, busy) = d.probe("ssh://b", 1).unwrap();
        assert!(free.is_some() && busy == 0, "the losing waiter released its lock");
        assert!(d.slot_held("ssh://c", 0), "the winner still holds its slot");
        drop(slot);
        assert!(!d.slot_held("ssh://c", 0));
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline() {
        let d = dir("deadline");
        let mut a = hold(&d, "ssh:__b-0");
        let t = Instant::now();
        assert!(d.wait_any(&[("ssh://b".to_string(), 0)], t + Duration::from_millis(300)).unwrap().is_none());
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(5));
        a.kill().unwrap();
        a.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!d.slot_held("ssh://b", 0), "no waiter thread took the slot after giving up");
        assert!(d.wait_any(&[("ssh://b".to_string(), 0)], Instant::now()).unwrap().is_some(), "a free slot is taken even at the deadline");
    }
}
