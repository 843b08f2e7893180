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

/// A writer onto stderr that takes the same lock, for the ssh-ng bridge
/// (whose stderr is the hook's view of the builder's).
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::io::stderr().lock().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().lock().flush()
    }
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

#[cfg(test)]
mod tests {
    use remote_lib::hook_protocol::Reply;
    use remote_lib::nixlog::{self, Level};

    /// Decodes the JSON string starting at `s[0] == '"'` (what Nix's JSON
    /// parser would read back), returning it and the rest.
    fn json_decode(s: &str) -> (String, &str) {
        let mut out = String::new();
        let mut it = s.char_indices();
        assert_eq!(it.next(), Some((0, '"')));
        while let Some((i, c)) = it.next() {
            match c {
                '"' => return (out, &s[i + 1..]),
                '\\' => match it.next().map(|x| x.1) {
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('u') => {
                        let hex: String = (0..4).map(|_| it.next().expect("4 hex digits").1).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).expect("hex")).expect("a char"));
                    }
                    other => panic!("bad escape {other:?} in {s}"),
                },
                c => {
                    assert!(c as u32 >= 0x20, "raw control character {:#x} in {s:?}", c as u32);
                    out.push(c);
                }
            }
        }
        panic!("unterminated string: {s}")
    }

    #[test]
    fn every_control_character_survives_a_msg_record() {
        let text: String = (0u32..0x80).filter_map(char::from_u32).chain("é→😀 \u{7f}\u{2028}".chars()).collect();
        let rec = nixlog::msg(Level::Warn, &text);
        assert!(rec.ends_with("}\n") && rec.matches('\n').count() == 1, "one line: {rec:?}");
        let body = rec.strip_prefix("@nix {\"action\":\"msg\",\"level\":1,\"msg\":").expect("prefix");
        let (decoded, rest) = json_decode(body);
        assert_eq!(decoded, text);
        assert_eq!(rest, "}\n");
    }

    #[test]
    fn levels_are_nixs_numbers() {
        let levels = [Level::Error, Level::Warn, Level::Notice, Level::Info, Level::Talkative, Level::Chatty, Level::Debug];
        for (n, l) in levels.into_iter().enumerate() {
            assert!(nixlog::msg(l, "x").contains(&format!("\"level\":{n},")), "{l:?}");
            assert!(nixlog::start(9, l, nixlog::ACT_UNKNOWN, "x").contains(&format!("\"level\":{n},")), "{l:?}");
        }
    }

    #[test]
    fn activity_records_carry_every_key_nix_requires() {
        let s = nixlog::start(42, Level::Info, 103, "copying \"x\"\nto b1");
        assert_eq!(s, "@nix {\"action\":\"start\",\"id\":42,\"level\":3,\"type\":103,\"text\":\"copying \\\"x\\\"\\nto b1\",\"fields\":[]}\n");
        assert_eq!(nixlog::stop(42), "@nix {\"action\":\"stop\",\"id\":42}\n");
    }

    #[test]
    fn replies_are_the_exact_lines_nix_reads() {
        assert_eq!(Reply::Accept { machine: "ssh://b1".into() }.text(), "# accept\nssh://b1\n");
        assert_eq!(Reply::Decline.text(), "# decline\n");
        assert_eq!(Reply::DeclinePermanently.text(), "# decline-permanently\n");
        assert_eq!(Reply::Postpone.text(), "# postpone\n");
    }
}
