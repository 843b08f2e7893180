//! The build history: one JSON line per remote build attempt in
//! `<load dir>/build-hook/history.jsonl`, shared by every hook process.
//! Appends take the file's lock and write one whole line, so lines from
//! concurrent hooks never interleave; past [`ROTATE_BYTES`] the file is
//! renamed to `history.1.jsonl` (the previous one dropped). Reading skips
//! lines that do not parse.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Size past which the history is rotated.
pub const ROTATE_BYTES: u64 = 4 << 20;

/// One remote build attempt on one machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix time (s) when the attempt started on this machine.
    pub start: f64,
    pub drv: String,
    /// The derivation's name (the store path's name without `.drv`).
    pub name: String,
    pub system: String,
    pub machine: String,
    /// The slot it held on that machine.
    #[serde(default)]
    pub slot: u64,
    /// Unix time (s) when the attempt ended.
    #[serde(default)]
    pub end: f64,
    /// Seconds the `try` waited for a slot.
    pub slot_wait: f64,
    pub upload_bytes: u64,
    pub upload_secs: f64,
    pub build_secs: f64,
    pub download_bytes: u64,
    pub download_secs: f64,
    /// `built`, `failed` (the build failed there), `lost` (the builder was
    /// lost; the job moved on), `refused`, `local` (a failure here).
    pub result: String,
    /// Why, for anything but `built`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// How much of the history's end [`History::last_download`] reads.
pub const HINT_BYTES: u64 = 256 * 1024;

/// Where the history lives.
#[derive(Clone, Debug)]
pub struct History {
    dir: PathBuf,
}

/// Longest reason kept in a record.
const MAX_REASON: usize = 2048;

impl History {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        History { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }

    /// Appends one record (one line, one write, under the file's lock),
    /// rotating first if the file is large.
    pub fn append(&self, r: &Record) -> io::Result<()> {
        let mut r = r.clone();
        if r.reason.len() > MAX_REASON {
            let cut = (0..=MAX_REASON).rev().find(|i| r.reason.is_char_boundary(*i)).unwrap_or(0);
            r.reason.truncate(cut);
        }
        let mut line = serde_json::to_string(&r).map_err(io::Error::other)?;
        line.push('\n');
        fs::create_dir_all(&self.dir)?;
        let path = self.path();
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        f.lock()?;
        // Another hook may have rotated the file while we waited for the lock.
        let f = if f.metadata()?.len() >= ROTATE_BYTES || !same_file(&f, &path) {
            if same_file(&f, &path) {
                fs::rename(&path, self.dir.join("history.1.jsonl"))?;
            }
            let g = OpenOptions::new().create(true).append(true).open(&path)?;
            g.lock()?;
            g
        } else {
            f
        };
        (&f).write_all(line.as_bytes())
    }

    /// The most recent records, oldest first: at most `max_records`, read
    /// from at most the last `max_bytes` of the files (the current one, then
    /// the rotated one for what is left), so the cost is bounded however
    /// large the history is. A line cut by the byte limit is skipped.
    pub fn read_tail(&self, max_records: usize, max_bytes: u64) -> Vec<Record> {
        let chunks = self.tail_chunks(max_bytes);
        let mut out: Vec<Record> = chunks.iter().rev().flat_map(|c| c.split(|b| *b == b'\n')).filter_map(parse_line).collect();
        let extra = out.len().saturating_sub(max_records);
        out.drain(..extra);
        out
    }

    /// The last `max_bytes` of the history, newest file first, each chunk
    /// starting on a whole line.
    fn tail_chunks(&self, max_bytes: u64) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut budget = max_bytes;
        for p in [self.path(), self.dir.join("history.1.jsonl")] {
            if budget == 0 {
                break;
            }
            let Ok(mut f) = File::open(&p) else { continue };
            let Ok(len) = f.metadata().map(|m| m.len()) else { continue };
            // One byte before, to see whether the first line is whole.
            let from = len.saturating_sub(budget).saturating_sub(1);
            let mut buf = Vec::new();
            if f.seek(io::SeekFrom::Start(from)).is_err() || (&mut f).take(len - from).read_to_end(&mut buf).is_err() {
                continue;
            }
            budget = budget.saturating_sub(len - from);
            if from > 0 {
                // Drop the part of a line before the first newline (nothing but
                // that newline when the limit fell on a line's start).
                let cut = buf.iter().position(|b| *b == b'\n').map_or(buf.len(), |i| i + 1);
                buf.drain(..cut);
            }
            chunks.push(buf);
        }
        chunks
    }

    /// The NAR bytes downloaded by the most recent successful build of a
    /// derivation named `name`, from at most the last [`HINT_BYTES`] of the
    /// history (only lines naming it are parsed); `None` if there is none.
    pub fn last_download(&self, name: &str) -> Option<u64> {
        let needle = serde_json::to_string(name).ok()?;
        let needle = format!("\"name\":{needle}");
        let chunks = self.tail_chunks(HINT_BYTES);
        chunks
            .iter()
            .flat_map(|c| c.rsplit(|b| *b == b'\n'))
            .filter(|l| l.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .filter_map(parse_line)
            .find(|r| r.name == name && r.result == "built")
            .map(|r| r.download_bytes)
    }

    /// Every readable record, oldest first (the rotated file, then the
    /// current one), and how many lines were skipped as unreadable.
    pub fn read(&self) -> (Vec<Record>, usize) {
        let mut out = Vec::new();
        let mut skipped = 0;
        for p in [self.dir.join("history.1.jsonl"), self.path()] {
            let Ok(f) = File::open(&p) else { continue };
            for line in io::BufReader::new(f).split(b'\n').map_while(Result::ok) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match parse_line(&line) {
                    Some(r) => out.push(r),
                    None => skipped += 1,
                }
            }
        }
        (out, skipped)
    }
}

/// One history line, if it is a record.
pub fn parse_line(line: &[u8]) -> Option<Record> {
    serde_json::from_slice(line).ok()
}

fn same_file(f: &File, p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(p)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Now, as Unix time in seconds.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The derivation name of a `.drv` path (`/nix/store/<hash>-hello-1.0.drv` → `hello-1.0`).
pub fn drv_name(drv: &str) -> String {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let name = base.get(33..).unwrap_or(base);
    name.strip_suffix(".drv").unwrap_or(name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> Record {
        Record {
            start: i as f64,
            drv: format!("/nix/store/00000000000000000000000000000000-d{i}.drv"),
            name: format!("d{i}"),
            machine: "ssh://b1".into(),
            result: "built".into(),
            ..Default::default()
        }
    }

    #[test]
    fn appends_from_many_threads_never_interleave_and_corrupt_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        std::thread::scope(|s| {
            for t in 0..8 {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..100 {
                        let mut r = rec(t * 1000 + i);
                        r.reason = "x".repeat(3000);
                        h.append(&r).unwrap();
                    }
                });
            }
        });
        std::fs::OpenOptions::new().append(true).open(h.path()).unwrap().write_all(b"{not json\n").unwrap();
        let (records, skipped) = h.read();
        assert_eq!(records.len(), 800);
        assert_eq!(skipped, 1);
        assert!(records.iter().all(|r| r.reason.len() == MAX_REASON));
    }

    #[test]
    fn the_history_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        let mut r = rec(1);
        r.reason = "y".repeat(MAX_REASON);
        let per_line = serde_json::to_string(&r).unwrap().len() as u64 + 1;
        let n = ROTATE_BYTES / per_line + 10;
        for _ in 0..n {
            h.append(&r).unwrap();
        }
        assert!(dir.path().join("history.1.jsonl").exists());
        assert!(std::fs::metadata(h.path()).unwrap().len() < ROTATE_BYTES);
        assert_eq!(h.read().0.len() as u64, n);
    }

    #[test]
    fn the_last_download_of_a_name_is_its_newest_successful_build() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        assert_eq!(h.last_download("d1"), None, "no history yet");
        let with = |i: usize, bytes: u64, result: &str| Record { download_bytes: bytes, result: result.into(), ..rec(i) };
        for r in [with(1, 100, "built"), with(10, 7, "built"), with(1, 300, "built"), with(1, 0, "lost"), with(2, 5, "failed")] {
            h.append(&r).unwrap();
        }
        assert_eq!(h.last_download("d1"), Some(300), "the newest built record, not the lost one after it");
        assert_eq!(h.last_download("d10"), Some(7), "a name is matched whole");
        assert_eq!(h.last_download("d2"), None, "only a failed build");
        assert_eq!(h.last_download("d\"1"), None);
    }

    #[test]
    fn the_tail_is_the_newest_records_within_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        assert!(h.read_tail(10, 1 << 20).is_empty(), "no history yet");
        // Every line the same length: two-digit numbers.
        let per_line = serde_json::to_string(&rec(10)).unwrap().len() as u64 + 1;
        for i in 10..20 {
            h.append(&rec(i)).unwrap();
        }
        std::fs::rename(h.path(), dir.path().join("history.1.jsonl")).unwrap();
        for i in 20..30 {
            h.append(&rec(i)).unwrap();
        }
        let starts = |v: Vec<Record>| v.iter().map(|r| r.start as usize).collect::<Vec<_>>();
        assert_eq!(starts(h.read_tail(3, 1 << 20)), vec![27, 28, 29]);
        assert_eq!(starts(h.read_tail(12, 1 << 20)), (18..30).collect::<Vec<_>>(), "continues into the rotated file");
        // 4.5 lines' worth of bytes: four whole lines, the cut one skipped.
        assert_eq!(starts(h.read_tail(100, per_line * 9 / 2)), vec![26, 27, 28, 29]);
        assert_eq!(starts(h.read_tail(100, per_line * 12)), (18..30).collect::<Vec<_>>(), "exactly two lines of the rotated file");
    }

    #[test]
    fn names_come_from_the_drv_path() {
        assert_eq!(drv_name("/nix/store/00000000000000000000000000000000-hello-1.0.drv"), "hello-1.0");
    }
}
