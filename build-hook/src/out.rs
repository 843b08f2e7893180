//! The single writer that owns stderr, Nix's protocol channel: replies and
//! `@nix` JSON records go out whole, one at a time, and nothing else in the
//! process prints there.

use remote_lib::hook_protocol::Reply;
use remote_lib::nixlog::{self, Level};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

static LOCK: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static VERBOSITY: AtomicU64 = AtomicU64::new(3);

pub fn set_verbosity(v: u32) {
    VERBOSITY.store(v as u64, Ordering::Relaxed);
}

fn write(s: &str) {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(s.as_bytes());
    let _ = e.flush();
}

/// Sends a reply to `try`.
pub fn reply(r: &Reply) {
    write(&r.text());
}

/// Logs a message at `level` (dropped above the user's verbosity).
pub fn msg(level: Level, text: &str) {
    if (level as u64) <= VERBOSITY.load(Ordering::Relaxed) {
        write(&nixlog::msg(level, text));
    }
}

/// An activity shown while it lasts.
pub struct Activity(u64);

impl Activity {
    pub fn start(level: Level, text: &str) -> Activity {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) + (std::process::id() as u64) * 1_000_000;
        write(&nixlog::start(id, level, nixlog::ACT_UNKNOWN, text));
        Activity(id)
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        write(&nixlog::stop(self.0));
    }
}

/// The job's events, as Nix log records (and temporaries remembered for the
/// signal handler).
pub struct NixEvents;

impl remote_lib::job::Events for NixEvents {
    fn log(&self, level: Level, text: &str) {
        msg(level, text);
    }
    fn start(&self, level: Level, text: &str) -> u64 {
        let a = Activity::start(level, text);
        let id = a.0;
        std::mem::forget(a);
        id
    }
    fn stop(&self, id: u64) {
        drop(Activity(id));
    }
    fn temp(&self, path: &std::path::Path) {
        crate::signals::track_temp(path);
    }
}
