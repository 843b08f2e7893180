//! Guessing, before a copy, how much zstd would shrink it: a few KiB from
//! the start of the first files of each path are compressed, and each path's
//! ratio is weighted by its NAR size. Source tarballs, images and other
//! already-compressed data then go uncompressed over the open session
//! instead of through a compressing session that would gain nothing.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

/// Bytes sampled from one path at most.
pub const PER_PATH: usize = 64 * 1024;
/// Bytes sampled from one file at most.
const PER_FILE: usize = 16 * 1024;
/// Directory entries looked at per path at most (bounds the walk).
const MAX_ENTRIES: usize = 256;

/// Up to [`PER_PATH`] bytes from `path`: a regular file's start, or the
/// starts of the first regular files of a directory tree (entries in name
/// order, as in a NAR). Symlinks and unreadable entries are skipped.
pub fn sample_path(path: &Path) -> Vec<u8> {
    let mut out = Vec::with_capacity(PER_PATH);
    let mut entries = 0;
    walk(path, &mut out, &mut entries);
    out
}

fn walk(path: &Path, out: &mut Vec<u8>, entries: &mut usize) {
    if out.len() >= PER_PATH || *entries >= MAX_ENTRIES {
        return;
    }
    *entries += 1;
    let Ok(md) = fs::symlink_metadata(path) else { return };
    if md.is_file() {
        let want = PER_FILE.min(PER_PATH - out.len());
        if let Ok(f) = File::open(path) {
            let _ = f.take(want as u64).read_to_end(out);
        }
    } else if md.is_dir() {
        let Ok(rd) = fs::read_dir(path) else { return };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        names.sort();
        for n in names {
            walk(&path.join(n), out, entries);
        }
    }
}

/// How many times smaller zstd at `level` makes `sample` (1.0 for an empty
/// sample: nothing known, nothing promised).
pub fn ratio(sample: &[u8], level: i32) -> f64 {
    if sample.is_empty() {
        return 1.0;
    }
    match zstd::bulk::compress(sample, level) {
        Ok(c) if !c.is_empty() => sample.len() as f64 / c.len() as f64,
        _ => 1.0,
    }
}

/// The expected ratio of a whole copy: `(nar_size, ratio)` per path,
/// weighted by size (total bytes over total expected compressed bytes).
pub fn weighted_ratio(parts: &[(u64, f64)]) -> f64 {
    let total: f64 = parts.iter().map(|(n, _)| *n as f64).sum();
    let packed: f64 = parts.iter().map(|(n, r)| *n as f64 / r.max(1.0)).sum();
    if packed <= 0.0 {
        1.0
    } else {
        total / packed
    }
}

/// Below this expected ratio a copy is not worth compressing: zstd would
/// save under 5 % of the bytes and cost a session start and CPU at both ends.
pub const WORTH_COMPRESSING: f64 = 1.05;

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sample-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// Deterministic bytes that no compressor can shrink (xorshift).
    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_compresses_noise_does_not() {
        let text: Vec<u8> = (0..4000).flat_map(|i| format!("static int value_{i} = {i};\n").into_bytes()).collect();
        assert!(ratio(&text, 1) > 3.0, "{}", ratio(&text, 1));
        let r = ratio(&noise(PER_PATH, 7), 1);
        assert!(r < 1.01, "{r}");
        assert_eq!(ratio(&[], 1), 1.0);
    }

    #[test]
    fn directories_are_sampled_in_nar_order_and_bounded() {
        let d = tmp("dir");
        fs::create_dir_all(d.join("b")).unwrap();
        fs::write(d.join("a"), vec![b'a'; 100]).unwrap();
        fs::write(d.join("b/c"), vec![b'c'; 100_000]).unwrap();
        fs::write(d.join("d"), vec![b'd'; 100_000]).unwrap();
        std::os::unix::fs::symlink("a", d.join("e")).unwrap();
        let s = sample_path(&d);
        assert_eq!(s.len(), 100 + PER_FILE + PER_FILE);
        assert!(s[..100].iter().all(|&c| c == b'a') && s[100..100 + PER_FILE].iter().all(|&c| c == b'c'));
        // A single file: its start, at most PER_FILE.
        assert_eq!(sample_path(&d.join("d")).len(), PER_FILE);
        assert!(sample_path(&d.join("missing")).is_empty());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn big_incompressible_paths_outweigh_small_text() {
        // 95 MB of random data and 5 MB of text at 7x: the copy shrinks by about 4 %.
        let r = weighted_ratio(&[(95_000_000, 1.0), (5_000_000, 7.0)]);
        assert!(r < WORTH_COMPRESSING, "{r}");
        // Half and half: well worth it.
        assert!(weighted_ratio(&[(50_000_000, 1.0), (50_000_000, 7.0)]) > 1.5);
        assert_eq!(weighted_ratio(&[]), 1.0);
    }
}
