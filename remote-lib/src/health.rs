//! Shared builder health in the load directory: one small text file per
//! machine, replaced atomically (write + rename), read by every hook process.
//! A builder that failed is skipped for a back-off that grows with
//! consecutive failures (exponential, with jitter, capped) and is reset by a
//! success. A missing or corrupt record means "unknown", never an error.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What we remember about a machine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Unix time of the last successful connection (0: never).
    pub last_success: u64,
    /// Consecutive failures since then.
    pub failures: u32,
    /// Unix time before which the machine is skipped.
    pub retry_after: u64,
    /// Why it last failed.
    pub reason: String,
    /// Whether the builder has `zstd` (None: not probed yet).
    pub zstd: Option<bool>,
    /// Whether the builder's CPU has AES instructions (None: not probed yet).
    pub aes: Option<bool>,
    /// zstd level for bulk copies to and from this builder, learned from
    /// past transfers (0: raw; None: not learned yet).
    pub compress: Option<i32>,
    /// NAR MB/s of the last uncompressed bulk transfer (the link's raw rate).
    pub raw_mbps: Option<f64>,
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Back-off policy.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base_secs: u64,
    pub cap_secs: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base_secs: 5, cap_secs: 300 }
    }
}

/// The longest back-off any record may impose: records are written by any
/// local hook and read by all, so a `retry_after` further ahead than this
/// (plus the jitter) is not believed.
pub const MAX_BACKOFF_SECS: u64 = 86_400;

/// Longest failure reason kept in a record.
pub const MAX_REASON: usize = 1024;

impl Backoff {
    /// Back-off after `failures` consecutive failures, before jitter (never
    /// more than [`MAX_BACKOFF_SECS`]).
    pub fn delay(&self, failures: u32) -> u64 {
        let exp = failures.saturating_sub(1).min(20);
        self.base_secs.saturating_mul(1u64 << exp).min(self.cap_secs).min(MAX_BACKOFF_SECS)
    }
}

/// Current Unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Health {
    /// Parses a record; anything unreadable gives the default ("unknown").
    pub fn parse(text: &str) -> Health {
        let mut h = Health::default();
        let mut lines = text.lines();
        if lines.next() != Some("build-hook-health v1") {
            return Health::default();
        }
        for line in lines {
            let Some((k, v)) = line.split_once('=') else { return Health::default() };
            let ok = match k {
                "last_success" => v.parse().map(|x| h.last_success = x).is_ok(),
                "failures" => v.parse().map(|x| h.failures = x).is_ok(),
                "retry_after" => v.parse().map(|x| h.retry_after = x).is_ok(),
                "reason" => {
                    h.reason = truncate(v, MAX_REASON);
                    true
                }
                "compress" => {
                    h.compress = v.parse().ok().filter(|l| (0..=19).contains(l));
                    true
                }
                "raw_mbps" => {
                    h.raw_mbps = v.parse().ok().filter(|x: &f64| x.is_finite() && *x > 0.0);
                    true
                }
                "zstd" => {
                    h.zstd = yes_no(v);
                    true
                }
                "aes" => {
                    h.aes = yes_no(v);
                    true
                }
                _ => true,
            };
            if !ok {
                return Health::default();
            }
        }
        h
    }

    pub fn render(&self) -> String {
        let yn = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        let (z, a) = (yn(self.zstd), yn(self.aes));
        let c = self.compress.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into());
        let r = self.raw_mbps.map(|r| format!("{r:.1}")).unwrap_or_else(|| "unknown".into());
        format!(
            "build-hook-health v1\nlast_success={}\nfailures={}\nretry_after={}\nreason={}\nzstd={z}\naes={a}\nraw_mbps={r}\ncompress={c}\n",
            self.last_success,
            self.failures,
            self.retry_after,
            self.reason.replace('\n', " ")
        )
    }

    /// True while the machine is backing off. A `retry_after` further ahead
    /// than any back-off could be (see [`MAX_BACKOFF_SECS`]) is ignored.
    pub fn backing_off(&self, now: u64) -> bool {
        self.failures > 0 && now < self.retry_after && self.retry_after - now <= MAX_BACKOFF_SECS * 6 / 5
    }

    /// True if a connection succeeded within `window` seconds and nothing
    /// failed since: such a machine may be accepted before connecting.
    pub fn recently_good(&self, now: u64, window: u64) -> bool {
        self.failures == 0 && self.last_success > 0 && now.saturating_sub(self.last_success) <= window
    }

    /// Records a success.
    pub fn succeeded(&mut self, now: u64) {
        self.last_success = now;
        self.failures = 0;
        self.retry_after = 0;
        self.reason.clear();
    }

    /// Records a failure; `jitter` in [0,1) spreads retries of many hooks.
    pub fn failed(&mut self, now: u64, reason: &str, policy: Backoff, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        let d = policy.delay(self.failures) as f64;
        self.retry_after = now.saturating_add((d * (0.8 + 0.4 * jitter.clamp(0.0, 1.0))).round() as u64);
        self.reason = truncate(reason, MAX_REASON);
    }
}

fn truncate(s: &str, max: usize) -> String {
    let cut = (0..=max.min(s.len())).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    s[..cut].to_string()
}

/// Below this many MB/s of uncompressed data, compressing pays off on this
/// project's measurements (zstd -1 ran at ≈290 MB/s on text and ≈1.1 GB/s on
/// random data per core; ssh moved ≈530 MB/s raw).
pub const FAST_LINK_MBPS: f64 = 150.0;
/// Below this, a higher level pays off: zstd -6 still ran at ≈137 MB/s on text
/// and ≈238 MB/s on random data, and made text ≈17 % smaller than -3.
pub const SLOW_LINK_MBPS: f64 = 40.0;
/// The level for slow links.
pub const SLOW_LINK_LEVEL: i32 = 6;
/// Transfers smaller than this say little about the link.
pub const MIN_SAMPLE_BYTES: u64 = 8_000_000;

/// The level to use when nothing has been learned yet.
pub const DEFAULT_LEVEL: i32 = 1;

/// One bulk transfer, as measured.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// zstd level used (0: raw).
    pub level: i32,
    /// NAR bytes moved.
    pub nar: u64,
    /// Bytes on the wire.
    pub wire: u64,
    pub secs: f64,
    /// Idle CPUs here on average meanwhile, when known ([`crate::cpu`]).
    pub idle_cores: Option<f64>,
}

/// The zstd level for a link that carries `mbps` MB/s raw.
pub fn level_for_raw_rate(mbps: f64) -> i32 {
    if mbps >= FAST_LINK_MBPS {
        0
    } else if mbps < SLOW_LINK_MBPS {
        SLOW_LINK_LEVEL
    } else {
        DEFAULT_LEVEL
    }
}

/// Fewer idle CPUs than this, on average, while a raw copy or the link
/// probe ran: the copy kept this machine's cores busy (ssh at both ends, and
/// on the test bed the builder's `nix-store` on the same two cores), so
/// compressing would have competed with it for them. Measured on the test
/// bed's unshaped link: compressing the first copies at level 1 cost 0.05–
/// 0.1 s more than copying raw (`docs/benchmarks.md`).
pub const MIN_IDLE_CORES: f64 = 1.0;

/// The zstd level for a link that carried `mbps` MB/s raw while
/// `idle_cores` CPUs sat idle here on average ([`crate::cpu`]): as
/// [`level_for_raw_rate`], except that a link between the slow and the fast
/// mark gets no compression when no core was free to compress with. (Below
/// the slow mark even a busy core compresses faster than the link carries.)
pub fn level_for_link(mbps: f64, idle_cores: Option<f64>) -> i32 {
    match level_for_raw_rate(mbps) {
        DEFAULT_LEVEL if idle_cores.is_some_and(|c| c < MIN_IDLE_CORES) => 0,
        l => l,
    }
}

/// The zstd level for the first copy, from [`crate::session::probe_link`]'s
/// rate: as [`level_for_link`], but [`PROBED_SLOW_LEVEL`] where that
/// says the slow link's level. A few megabytes are too few to tell a slow
/// link from a busy moment on a fast one (on the test bed a 150 MB/s link
/// probed at 34–38 MB/s in some first-contact runs), and the costs are
/// lopsided: on the benchmark's mixed data zstd -3 is nearly as small as -6
/// (58.0 against 56.7 MB of 100) and nearly as fast as -1 (0.43 against
/// 0.39 s; -6 took 1.14 s), so it loses little on a slow link, while -6 on a
/// fast one doubled the copies. The first transfer of [`MIN_SAMPLE_BYTES`]
/// or more then decides.
pub fn level_for_probed_rate(mbps: f64, idle_cores: Option<f64>) -> i32 {
    match level_for_link(mbps, idle_cores) {
        SLOW_LINK_LEVEL => PROBED_SLOW_LEVEL,
        l => l,
    }
}

/// The level a link that only probed slow gets ([`level_for_probed_rate`]).
pub const PROBED_SLOW_LEVEL: i32 = 3;

/// A first upload's raw start, timed while sending, counts as a second
/// measurement of the link from this many bytes on.
pub const RAW_START_MEASURES: u64 = 4 << 20;

/// The level for the rest of a first upload that began raw beside the
/// probes: `probed` (the level the probes chose), except that when they
/// said slow ([`PROBED_SLOW_LEVEL`]) and the raw start (`raw`: MB/s and idle
/// CPUs, at least [`RAW_START_MEASURES`] bytes) was slow too, two
/// measurements agree and the slow link's own level is used. At 100 Mbit/s
/// on the mixed data, -3 sent 3 MB more than -6 per 100 MB (0.27 s).
pub fn level_after_raw_start(probed: i32, raw: Option<(f64, Option<f64>)>) -> i32 {
    match raw {
        Some((mbps, idle)) if probed == PROBED_SLOW_LEVEL && mbps < SLOW_LINK_MBPS => level_for_link(mbps, idle),
        _ => probed,
    }
}

/// As [`level_after_raw_start`] when only the builder's capabilities were
/// asked beside the raw start (`caps`: 0 without zstd there): the raw start
/// (`nar` bytes at `raw`) alone chooses, as any transfer does from
/// [`MIN_SAMPLE_BYTES`] on, and a smaller one as cautiously as the link
/// probe ([`level_for_probed_rate`]: a busy moment is not a slow link).
pub fn level_after_measuring_start(caps: i32, nar: u64, raw: Option<(f64, Option<f64>)>) -> i32 {
    match raw {
        Some((mbps, idle)) if caps > 0 && nar >= MIN_SAMPLE_BYTES => level_for_link(mbps, idle),
        Some((mbps, idle)) if caps > 0 => level_for_probed_rate(mbps, idle),
        _ => level_after_raw_start(caps, raw),
    }
}

impl Health {
    /// Learns from one bulk transfer which level to use next.
    ///
    /// A raw transfer measures the link: compress when it was slow. A
    /// compressed transfer is compared with the link's raw rate: slower than
    /// raw (the compressor was the limit) → raw; much faster than the raw rate
    /// times the compression ratio (the link got faster than recorded) → raw
    /// again to re-measure. With no raw rate known yet (the first copy to a
    /// new builder), the bytes on the wire per second are a lower bound of
    /// the link's rate: below the slow-link rate (far below what zstd emits
    /// here) the link was the limit, so that rate is taken as the link's and
    /// compression stays on at the slow-link level — the first build to a
    /// builder on a slow link does not spend a whole transfer measuring it
    /// raw; otherwise → raw once to measure it.
    pub fn learn(&mut self, t: Transfer) {
        if t.nar < MIN_SAMPLE_BYTES || t.secs <= 0.0 || t.wire == 0 {
            return;
        }
        let mbps = t.nar as f64 / 1e6 / t.secs;
        if t.level == 0 {
            self.raw_mbps = Some(mbps);
            self.compress = Some(level_for_link(mbps, t.idle_cores));
            return;
        }
        let ratio = t.nar as f64 / t.wire as f64;
        let wire_mbps = t.wire as f64 / 1e6 / t.secs;
        if self.raw_mbps.is_none() && wire_mbps < SLOW_LINK_MBPS {
            self.raw_mbps = Some(wire_mbps);
        }
        self.compress = Some(match self.raw_mbps {
            None => 0,
            Some(raw) if mbps < 0.9 * raw => 0,
            Some(raw) if mbps > 1.5 * raw * ratio => 0,
            Some(raw) => level_for_raw_rate(raw).max(1),
        });
    }
}

/// The per-machine records in `<load dir>/build-hook/health/`.
#[derive(Clone, Debug)]
pub struct HealthStore {
    dir: PathBuf,
}

impl HealthStore {
    pub fn new(dir: PathBuf) -> Self {
        HealthStore { dir }
    }

    fn file(&self, uri: &str) -> PathBuf {
        self.dir.join(crate::slots::file_name(uri, ""))
    }

    /// Reads a machine's record ("unknown" if missing or corrupt).
    pub fn get(&self, uri: &str) -> Health {
        fs::read_to_string(self.file(uri)).map(|t| Health::parse(&t)).unwrap_or_default()
    }

    /// Read-modify-write of a machine's record, under an exclusive `flock` on
    /// `<dir>/.lock` so that hook processes updating at the same instant do
    /// not lose each other's counts. Writes are atomic; a failed write or lock
    /// is ignored (health is advice, never a reason to fail a build).
    pub fn update(&self, uri: &str, f: impl FnOnce(&mut Health)) -> Health {
        let _lock = self.lock();
        let mut h = self.get(uri);
        f(&mut h);
        let _ = write_atomic(&self.file(uri), h.render().as_bytes());
        h
    }
}

impl HealthStore {
    /// Takes the directory's update lock (released when the file is closed);
    /// `None` if it cannot be had (read-only load directory, …).
    fn lock(&self) -> Option<fs::File> {
        let _ = fs::create_dir_all(&self.dir);
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(self.dir.join(".lock")).ok()?;
        loop {
            match f.lock() {
                Ok(()) => return Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Writes `data` to a temporary file beside `path` and renames it into
/// place, so readers see the old record or the new one, never a part.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.persist(path).map(drop).map_err(|e| e.error)
}

/// A cheap jitter source in [0,1) (no RNG dependency needed for spreading retries).
pub fn jitter() -> f64 {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) ^ std::process::id().wrapping_mul(2654435761);
    (n % 1_000_000) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_unknown() {
        let mut h = Health::default();
        h.failed(100, "connection refused\nby b1", Backoff::default(), 0.5);
        h.zstd = Some(true);
        h.aes = Some(false);
        let back = Health::parse(&h.render());
        assert_eq!(back.failures, 1);
        assert_eq!(back.reason, "connection refused by b1");
        assert_eq!((back.zstd, back.aes), (Some(true), Some(false)));
        // Records written before a field existed read it as unknown.
        assert_eq!(Health::parse("build-hook-health v1\nfailures=0\nzstd=yes\n").aes, None);
        for junk in ["", "garbage", "build-hook-health v1\nfailures=x", "build-hook-health v2\nfailures=1"] {
            assert_eq!(Health::parse(junk), Health::default(), "{junk:?}");
        }
    }

    #[test]
    fn records_are_not_believed_too_far() {
        let far = "build-hook-health v1\nlast_success=0\nfailures=3\nretry_after=99999999999\nreason=x\ncompress=99\n";
        let h = Health::parse(far);
        assert!(!h.backing_off(1_000), "a back-off of three thousand years is ignored");
        assert_eq!(h.compress, None, "a level zstd does not have is unknown");
        let mut h = Health::default();
        h.failed(1_000, &"é".repeat(5000), Backoff { base_secs: 5, cap_secs: u64::MAX }, 0.5);
        assert!(h.reason.len() <= MAX_REASON);
        for f in 1..40 {
            h.failed(1_000, "x", Backoff { base_secs: 5, cap_secs: u64::MAX }, 1.0);
            assert!(h.backing_off(1_001) && h.retry_after - 1_000 <= MAX_BACKOFF_SECS * 6 / 5, "failure {f}");
        }
        assert!(Health::parse(&h.render()).backing_off(1_001));
    }

    #[test]
    fn compression_level_is_learned_from_transfers() {
        let t = |level, nar: u64, wire: u64, secs| Transfer { level, nar, wire, secs, idle_cores: None };
        const MB100: u64 = 100_000_000;
        // First transfer compressed at the default level over a slow link
        // (58 MB on the wire at 12.6 MB/s): the link is known slow at once.
        let mut slow = Health::default();
        slow.learn(t(DEFAULT_LEVEL, MB100, 58_000_000, 4.6));
        assert_eq!((slow.compress, slow.raw_mbps.map(|r| r.round())), (Some(SLOW_LINK_LEVEL), Some(13.0)));
        // First transfer compressed at the default level, fast on the wire: measure raw next.
        let mut h = Health::default();
        h.learn(t(DEFAULT_LEVEL, MB100, 58_000_000, 0.55));
        assert_eq!(h.compress, Some(0));
        // Raw at 12 MB/s (100 Mbit/s): compress hard.
        h.learn(t(0, MB100, MB100, 8.3));
        assert_eq!((h.compress, h.raw_mbps.map(|r| r.round())), (Some(SLOW_LINK_LEVEL), Some(12.0)));
        // Compressed at 20 MB/s with ratio 1.75: as expected for this link, keep.
        h.learn(t(6, MB100, 57_000_000, 4.9));
        assert_eq!(h.compress, Some(6));
        // Incompressible data at the link's rate: keep (no flapping).
        h.learn(t(6, MB100, MB100, 8.4));
        assert_eq!(h.compress, Some(6));
        // The link became fast: 100 MB/s compressed is far above 12 × 1.75, re-measure raw.
        h.learn(t(6, MB100, 57_000_000, 1.0));
        assert_eq!(h.compress, Some(0));
        h.learn(t(0, MB100, MB100, 0.5));
        assert_eq!(h.compress, Some(0));
        // Raw at 90 MB/s: a light level.
        h.learn(t(0, MB100, MB100, 1.1));
        assert_eq!(h.compress, Some(DEFAULT_LEVEL));
        // Compression slower than raw: back to raw.
        h.learn(t(1, MB100, 60_000_000, 1.5));
        assert_eq!(h.compress, Some(0));
        // Small transfers teach nothing.
        let before = h.clone();
        h.learn(t(0, 1_000_000, 1_000_000, 10.0));
        assert_eq!(h, before);
        let back = Health::parse(&h.render());
        assert_eq!((back.compress, back.raw_mbps.map(|r| r.round())), (h.compress, Some(91.0)));
        assert_eq!(Health::parse(&Health::default().render()).compress, None);
    }

    #[test]
    fn a_middling_link_is_compressed_only_with_a_core_free_to_do_it() {
        // Between the slow and the fast mark: level 1 if a core sat idle.
        assert_eq!(level_for_link(90.0, Some(1.2)), DEFAULT_LEVEL);
        assert_eq!(level_for_link(90.0, None), DEFAULT_LEVEL, "unknown: as before");
        assert_eq!(level_for_link(90.0, Some(0.2)), 0, "every core was busy");
        assert_eq!(level_for_probed_rate(120.0, Some(0.3)), 0);
        // A slow link is compressed anyway; a fast one never.
        assert_eq!(level_for_link(12.0, Some(0.0)), SLOW_LINK_LEVEL);
        assert_eq!(level_for_probed_rate(12.0, Some(0.0)), PROBED_SLOW_LEVEL);
        assert_eq!(level_for_link(400.0, Some(8.0)), 0);
        // A raw copy teaches the same.
        let mut h = Health::default();
        h.learn(Transfer { level: 0, nar: 100_000_000, wire: 100_000_000, secs: 0.8, idle_cores: Some(0.1) });
        assert_eq!((h.raw_mbps, h.compress), (Some(125.0), Some(0)));
        h.learn(Transfer { level: 0, nar: 100_000_000, wire: 100_000_000, secs: 0.8, idle_cores: Some(1.5) });
        assert_eq!(h.compress, Some(DEFAULT_LEVEL));
    }

    #[test]
    fn a_probe_that_says_slow_gets_a_middle_level_until_a_transfer_decides() {
        assert_eq!(level_for_probed_rate(FAST_LINK_MBPS, None), 0);
        assert_eq!(level_for_probed_rate(90.0, None), DEFAULT_LEVEL);
        assert_eq!(level_for_probed_rate(35.0, None), PROBED_SLOW_LEVEL, "a slow-looking probe is not trusted with level {SLOW_LINK_LEVEL}");
        assert_eq!(level_for_raw_rate(35.0), SLOW_LINK_LEVEL, "a transfer of 8 MB or more still is");
        // Then the first transfer decides: over a fast link that probed slow
        // (35 MB/s) it re-measures raw; over a slow one it compresses hard.
        let p = PROBED_SLOW_LEVEL;
        let mut fast = Health { raw_mbps: Some(35.0), compress: Some(p), ..Health::default() };
        fast.learn(Transfer { level: p, nar: 100_000_000, wire: 58_000_000, secs: 0.75, idle_cores: None });
        assert_eq!(fast.compress, Some(0));
        let mut slow = Health { raw_mbps: Some(11.9), compress: Some(p), ..Health::default() };
        slow.learn(Transfer { level: p, nar: 100_000_000, wire: 58_000_000, secs: 4.9, idle_cores: None });
        assert_eq!(slow.compress, Some(SLOW_LINK_LEVEL));
    }

    #[test]
    fn backoff_grows_is_capped_and_resets() {
        let p = Backoff { base_secs: 5, cap_secs: 60 };
        assert_eq!([1, 2, 3, 4, 5, 10].map(|f| p.delay(f)), [5, 10, 20, 40, 60, 60]);
        let mut h = Health::default();
        h.failed(1000, "x", p, 0.0);
        assert_eq!(h.retry_after, 1004);
        assert!(h.backing_off(1003) && !h.backing_off(1004));
        h.failed(1000, "x", p, 0.999);
        assert!(h.retry_after <= 1012 && h.retry_after >= 1011);
        h.succeeded(2000);
        assert!(!h.backing_off(2000) && h.recently_good(2010, 60) && !h.recently_good(2100, 60));
    }

    /// Runs `work(store, thread index)` on 8 threads at once and joins them.
    fn from_8_threads(store: &HealthStore, work: fn(&HealthStore, u64)) {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let s = store.clone();
                std::thread::spawn(move || work(&s, i))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn concurrent_updates_lose_no_count() {
        let dir = std::env::temp_dir().join(format!("health-count-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = HealthStore::new(dir.clone());
        from_8_threads(&store, |s, _| {
            for _ in 0..100 {
                s.update("ssh://b1", |h| h.failed(1000, "down", Backoff::default(), 0.5));
            }
        });
        assert_eq!(store.get("ssh://b1").failures, 800);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn racing_writers_never_leave_a_corrupt_record() {
        let dir = std::env::temp_dir().join(format!("health-race-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = HealthStore::new(dir.clone());
        from_8_threads(&store, |s, i| {
            for n in 0..200 {
                s.update("ssh://b1", |h| if (i + n) % 2 == 0 { h.succeeded(n) } else { h.failed(n, "down", Backoff::default(), 0.1) });
                let text = fs::read_to_string(dir_file(s)).unwrap();
                assert!(text.starts_with("build-hook-health v1\n") && text.ends_with("compress=unknown\n"), "{text:?}");
            }
        });
        let names: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 2, "temporary files left behind: {names:?}");
        assert!(names.contains(&".lock".to_string()), "{names:?}");
        fn dir_file(s: &HealthStore) -> PathBuf {
            s.file("ssh://b1")
        }
    }

    #[test]
    fn a_slow_probe_and_a_slow_raw_start_agree_on_the_slow_level() {
        assert_eq!(level_after_raw_start(PROBED_SLOW_LEVEL, Some((11.9, Some(1.7)))), SLOW_LINK_LEVEL);
        assert_eq!(level_after_raw_start(PROBED_SLOW_LEVEL, Some((120.0, Some(1.7)))), PROBED_SLOW_LEVEL, "the raw start disagrees: the probe's cautious level");
        assert_eq!(level_after_raw_start(PROBED_SLOW_LEVEL, None), PROBED_SLOW_LEVEL, "no raw start to measure with");
        assert_eq!(level_after_raw_start(0, Some((11.9, None))), 0, "a probe that said fast is not overruled");
        assert_eq!(level_after_raw_start(DEFAULT_LEVEL, Some((11.9, None))), DEFAULT_LEVEL);
    }

    #[test]
    fn a_raw_start_that_measured_alone_chooses_cautiously_when_small() {
        let slow = Some((11.9, Some(1.7)));
        assert_eq!(level_after_measuring_start(DEFAULT_LEVEL, MIN_SAMPLE_BYTES, slow), SLOW_LINK_LEVEL);
        assert_eq!(level_after_measuring_start(DEFAULT_LEVEL, MIN_SAMPLE_BYTES - 1, slow), PROBED_SLOW_LEVEL);
        assert_eq!(level_after_measuring_start(DEFAULT_LEVEL, MIN_SAMPLE_BYTES, Some((FAST_LINK_MBPS, Some(1.7)))), 0);
        assert_eq!(level_after_measuring_start(0, MIN_SAMPLE_BYTES, slow), 0, "no zstd on the builder");
        assert_eq!(level_after_measuring_start(DEFAULT_LEVEL, 0, None), DEFAULT_LEVEL, "nothing measured");
    }
}
