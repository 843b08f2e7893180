//! SIGTERM/SIGINT/SIGHUP end the job cleanly: a dedicated thread waits for
//! them, kills the children not yet reaped, removes half-unpacked outputs and
//! exits. Slot and upload locks die with the process.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remembers a temporary path to remove if we are killed.
pub fn track_temp(p: &Path) {
    TEMPS.lock().unwrap_or_else(|e| e.into_inner()).push(p.to_path_buf());
}

/// Blocks the signals in this (the main) thread, before any other thread
/// exists, and starts the thread that handles them.
pub fn install() {
    // SAFETY: plain libc signal-mask calls on a zeroed sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let set_copy = set;
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set_copy, &mut sig) == 0 {
                // Only children not yet reaped: their PIDs cannot have been reused.
                remote_lib::transport::with_live_children(|pids| {
                    for pid in pids {
                        // Each child leads its own process group: end the whole pipeline.
                        libc::kill(-(*pid as libc::pid_t), libc::SIGTERM);
                    }
                });
                for p in TEMPS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    // Only our own temporary names, never a final output path.
                    if p.file_name().map(|n| n.to_string_lossy().contains(".build-hook-")).unwrap_or(false) {
                        let _ = remote_lib::nar::remove_tree(p);
                    }
                }
                libc::_exit(128 + sig);
            }
        });
    }
}

/// Marks every inherited descriptor above stderr close-on-exec, so that ssh
/// (and a shared-connection master that outlives us) never holds Nix's pipes.
pub fn cloexec_inherited_fds() {
    for fd in 3..256 {
        // SAFETY: fcntl on a possibly-closed fd just fails with EBADF.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// The build log: fd 4 if Nix gave us one, else nowhere.
pub fn build_log() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only tests whether fd 4 is open.
    if unsafe { libc::fcntl(4, libc::F_GETFD) } >= 0 {
        // SAFETY: fd 4 is open and from here on owned by this File alone.
        unsafe { std::fs::File::from_raw_fd(4) }
    } else {
        std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null")
    }
}
