//! Which zstd level a copy with a builder uses: a pure decision from the
//! builder's health record (whether it has zstd, the level learned from
//! earlier transfers), the user's override, and for uploads a sample of the
//! data itself.

use crate::health::{Health, DEFAULT_LEVEL};
use crate::sample;

/// The level for bulk copies with a builder (0: raw over the interactive
/// session). `forced` is the user's `BUILD_HOOK_COMPRESS` (`None`: learn).
pub fn bulk_level(h: &Health, forced: Option<i32>) -> i32 {
    if forced == Some(0) || h.zstd != Some(true) {
        return 0;
    }
    forced.unwrap_or_else(|| h.compress.unwrap_or(DEFAULT_LEVEL))
}

/// The level for an upload: `bulk()`, unless the sampled zstd ratios of the
/// paths (`(NAR size, ratio of its sample at level 1)` per path, see
/// [`sample`]) say compression would save under 5 % — then raw, and
/// `bulk()` (which may probe the builder) is not asked. Returns the level
/// and the sampled ratio when sampling decided.
pub fn upload_level(parts: &[(u64, f64)], bulk: impl FnOnce() -> i32) -> (i32, Option<f64>) {
    let r = sample::weighted_ratio(parts);
    if r < sample::WORTH_COMPRESSING {
        (0, Some(r))
    } else {
        (bulk(), None)
    }
}

/// Outputs whose NARs add up to less than this travel raw on the
/// interactive session, however slow the link: a compressed session would
/// cost more to start (processes on both ends) than it could save.
pub const SMALL_DOWNLOAD: u64 = 256 * 1024;

/// The level for downloading outputs of `nar` bytes in all: raw (0) when
/// they are small, unless the user forced a level, else `bulk()` (only then
/// asked: it may probe the builder).
pub fn download_level(forced: Option<i32>, nar: u64, bulk: impl FnOnce() -> i32) -> i32 {
    if forced.is_none() && nar < SMALL_DOWNLOAD {
        0
    } else {
        bulk()
    }
}

/// Whether to open the compressed download session while the build runs,
/// so that it is ready when it ends: not when the level is 0, nor when the
/// last build of the same name downloaded little (`expected`, from the
/// history), unless the user forced a level.
pub fn spare_worth_opening(level: i32, forced: Option<i32>, expected: Option<u64>) -> bool {
    level > 0 && (forced.is_some() || expected.is_none_or(|n| n >= SMALL_DOWNLOAD))
}

/// At most this many paths of an upload are sampled ([`to_sample`]).
pub const MAX_SAMPLED: usize = 64;

/// Which paths of an upload (by NAR size) to sample: the [`MAX_SAMPLED`]
/// largest, which carry the size-weighted ratio. Sampling every path of a
/// closure of thousands of small ones would cost more (a file opened and read
/// for each) than their bytes could ever save.
pub fn to_sample(sizes: &[u64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..sizes.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    idx.truncate(MAX_SAMPLED);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(zstd: Option<bool>, compress: Option<i32>) -> Health {
        Health { zstd, compress, ..Health::default() }
    }

    #[test]
    fn the_level_follows_zstd_the_record_and_the_user() {
        assert_eq!(bulk_level(&h(None, Some(6)), None), 0, "zstd not known yet");
        assert_eq!(bulk_level(&h(Some(false), Some(6)), Some(3)), 0, "no zstd on the builder");
        assert_eq!(bulk_level(&h(Some(true), None), None), DEFAULT_LEVEL);
        assert_eq!(bulk_level(&h(Some(true), Some(6)), None), 6);
        assert_eq!(bulk_level(&h(Some(true), Some(6)), Some(3)), 3);
        assert_eq!(bulk_level(&h(Some(true), Some(6)), Some(0)), 0);
    }

    #[test]
    fn small_downloads_go_raw_and_open_no_session_ahead_unless_forced() {
        assert_eq!(download_level(None, SMALL_DOWNLOAD - 1, || unreachable!("not asked for a small download")), 0);
        assert_eq!(download_level(None, SMALL_DOWNLOAD, || 6), 6);
        assert_eq!(download_level(Some(3), 120, || 3), 3, "a forced level is kept");
        assert_eq!(download_level(None, 1 << 30, || 0), 0);
        assert!(spare_worth_opening(1, None, None), "nothing known: ready for a large download");
        assert!(!spare_worth_opening(1, None, Some(120)), "the last build of this name downloaded 120 bytes");
        assert!(spare_worth_opening(1, None, Some(SMALL_DOWNLOAD)));
        assert!(spare_worth_opening(3, Some(3), Some(120)), "forced");
        assert!(!spare_worth_opening(0, None, None), "raw: no bulk session");
    }

    #[test]
    fn only_the_largest_paths_are_sampled() {
        let sizes: Vec<u64> = (0..1000).map(|i| if i == 500 { 1 << 30 } else { i }).collect();
        let picked = to_sample(&sizes);
        assert_eq!(picked.len(), MAX_SAMPLED);
        assert_eq!(picked[0], 500, "the largest first");
        assert!(picked[1..].iter().all(|&i| i >= 1000 - MAX_SAMPLED), "then the next largest: {picked:?}");
        assert_eq!(to_sample(&[3, 1, 2]), vec![0, 2, 1]);
    }

    #[test]
    fn incompressible_uploads_go_raw_without_asking_the_builder() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = b"the quick brown fox jumps over the lazy dog\n".repeat(1500);
        let (noise, text) = (sample::ratio(&noise, 1), sample::ratio(&text, 1));
        assert_eq!(upload_level(&[(1000, noise)], || unreachable!("not asked for incompressible data")).0, 0);
        assert_eq!(upload_level(&[(1000, text)], || 6), (6, None));
        assert_eq!(upload_level(&[(1000, noise), (100_000, text)], || 6).0, 6, "weighted by size");
        assert_eq!(upload_level(&[(1000, text)], || 0).0, 0);
    }
}
