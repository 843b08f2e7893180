//! What a builder says about a path, checked before it reaches the store,
//! memory or a command line: the path, its deriver and references parse as
//! store paths of the local store directory, the NAR hash and size are
//! well-formed and bounded, content addresses and signatures have their
//! documented shape, and a fixed-output result matches the hash its `.drv`
//! declares.

use crate::derivation::Output;
use crate::hash::{decode_hex, nix32_encode, Sha256Hash};
use crate::serve::PathInfo;
use crate::store_path::StorePath;
use sha2::Digest;
use std::io::{self, Read, Write};
use std::path::Path;

/// The largest NAR we accept from a builder (16 TiB): larger announcements
/// are lies or corruption.
pub const MAX_NAR_SIZE: u64 = 1 << 44;

/// Why a builder's statement about a path was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{path}': {why}")]
pub struct PathInfoError {
    pub path: String,
    pub why: String,
}

fn bad(path: &str, why: impl Into<String>) -> PathInfoError {
    PathInfoError { path: path.escape_debug().to_string(), why: why.into() }
}

/// Checks one `QueryPathInfos` entry from a builder and returns it in the
/// form registration takes (`sha256:<nix32>` hash). References are only
/// checked for shape here: whether each is an output of the build or valid
/// locally is the caller's question (it needs the local store).
pub fn check(store_dir: &str, info: &PathInfo) -> Result<PathInfo, PathInfoError> {
    let p = &info.path;
    // Messages quote what the builder sent escaped: it may hold newlines.
    let not_a_path = |what: &str, v: &str| bad(p, format!("{what} '{}' is not a store path in '{store_dir}'", v.escape_debug()));
    StorePath::parse(store_dir, p).map_err(|_| not_a_path("the path", p))?;
    if !info.deriver.is_empty() {
        let d = StorePath::parse(store_dir, &info.deriver).map_err(|_| not_a_path("deriver:", &info.deriver))?;
        if !d.name().ends_with(".drv") {
            return Err(bad(p, format!("deriver '{}' is not a derivation", info.deriver.escape_debug())));
        }
    }
    let mut refs = std::collections::BTreeSet::new();
    for r in &info.references {
        StorePath::parse(store_dir, r).map_err(|_| not_a_path("reference:", r))?;
        if !refs.insert(r.as_str()) {
            return Err(bad(p, format!("reference '{r}' is listed twice")));
        }
    }
    let hash = Sha256Hash::parse(&info.nar_hash).map_err(|_| bad(p, format!("NAR hash '{}' is not a SHA-256 hash", info.nar_hash.escape_debug())))?;
    if info.nar_size == 0 || info.nar_size > MAX_NAR_SIZE {
        return Err(bad(p, format!("NAR size {} is impossible", info.nar_size)));
    }
    if !info.ca.is_empty() && !ca_shape_ok(&info.ca) {
        return Err(bad(p, format!("content address '{}' is malformed", info.ca.escape_debug())));
    }
    for s in &info.sigs {
        if !sig_shape_ok(s) {
            return Err(bad(p, format!("signature '{}' is malformed", s.escape_debug())));
        }
    }
    Ok(PathInfo { nar_hash: hash.to_nix32_prefixed(), ..info.clone() })
}

/// `fixed:[r:]<algo>:<nix32>` or `text:sha256:<nix32>`.
fn ca_shape_ok(ca: &str) -> bool {
    let rest = match (ca.strip_prefix("fixed:"), ca.strip_prefix("text:")) {
        (Some(r), _) => r.strip_prefix("r:").unwrap_or(r),
        (_, Some(r)) => r,
        _ => return false,
    };
    let Some((algo, hash)) = rest.split_once(':') else { return false };
    Algo::parse(algo).is_some_and(|a| hash.len() == nix32_len(a.size()) && crate::hash::nix32_decode(hash, a.size()).is_some())
}

/// `<key name>:<base64>`, as Nix writes signatures.
fn sig_shape_ok(s: &str) -> bool {
    let Some((name, b64)) = s.split_once(':') else { return false };
    !name.is_empty()
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_+".contains(&c))
        && !b64.is_empty()
        && b64.bytes().all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
}

fn nix32_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

/// A hash algorithm of fixed-output derivations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl Algo {
    fn parse(s: &str) -> Option<Algo> {
        Some(match s {
            "md5" => Algo::Md5,
            "sha1" => Algo::Sha1,
            "sha256" => Algo::Sha256,
            "sha512" => Algo::Sha512,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha1",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }
    fn size(self) -> usize {
        match self {
            Algo::Md5 => 16,
            Algo::Sha1 => 20,
            Algo::Sha256 => 32,
            Algo::Sha512 => 64,
        }
    }
    fn hasher(self) -> Hasher {
        match self {
            Algo::Md5 => Hasher::Md5(md5::Md5::new()),
            Algo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Hasher::Md5(h) => h.update(buf),
            Hasher::Sha1(h) => h.update(buf),
            Hasher::Sha256(h) => h.update(buf),
            Hasher::Sha512(h) => h.update(buf),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a fixed-output derivation declares about one output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedHash {
    /// `r:` (hash of the NAR) rather than of a single flat file.
    pub recursive: bool,
    pub algo: Algo,
    pub digest: Vec<u8>,
}

impl FixedHash {
    /// The declared hash of a `.drv` output; `None` when the output is not
    /// fixed-output (no hash algorithm, or a floating content address).
    pub fn of_output(o: &Output) -> Result<Option<FixedHash>, PathInfoError> {
        if o.hash_algo.is_empty() || o.hash.is_empty() {
            return Ok(None);
        }
        let (recursive, algo) = match o.hash_algo.strip_prefix("r:") {
            Some(a) => (true, a),
            None => (false, o.hash_algo.as_str()),
        };
        let algo = Algo::parse(algo).ok_or_else(|| bad(&o.path, format!("hash algorithm '{}' is not supported", o.hash_algo)))?;
        let digest = decode_hex(&o.hash).filter(|d| d.len() == algo.size()).ok_or_else(|| bad(&o.path, format!("declared hash '{}' is not {} in base16", o.hash, algo.name())))?;
        Ok(Some(FixedHash { recursive, algo, digest }))
    }

    /// The content address Nix registers for such a path:
    /// `fixed:[r:]<algo>:<nix32>`.
    pub fn ca(&self) -> String {
        format!("fixed:{}{}:{}", if self.recursive { "r:" } else { "" }, self.algo.name(), nix32_encode(&self.digest))
    }

    /// Checks an unpacked output (`path` on disk, whose NAR hashed to
    /// `nar_hash`) against the declared hash.
    pub fn verify(&self, store_path: &str, path: &Path, nar_hash: &Sha256Hash) -> Result<(), PathInfoError> {
        let got = if self.recursive && self.algo == Algo::Sha256 {
            nar_hash.0.to_vec()
        } else if self.recursive {
            let mut h = self.algo.hasher();
            crate::nar::dump(path, &mut h).map_err(|e| bad(store_path, format!("cannot read the output back to hash it: {e}")))?;
            h.finish()
        } else {
            let md = std::fs::symlink_metadata(path).map_err(|e| bad(store_path, format!("cannot read the output: {e}")))?;
            if !md.is_file() {
                return Err(bad(store_path, "a flat fixed-output path must be a single regular file"));
            }
            let mut h = self.algo.hasher();
            let mut f = std::fs::File::open(path).map_err(|e| bad(store_path, format!("cannot read the output: {e}")))?;
            io::copy(&mut f, &mut h).map_err(|e| bad(store_path, format!("cannot read the output: {e}")))?;
            h.finish()
        };
        if got != self.digest {
            return Err(bad(
                store_path,
                format!(
                    "fixed-output hash mismatch: the derivation declares {}:{}, the builder's output has {}:{}",
                    self.algo.name(),
                    nix32_encode(&self.digest),
                    self.algo.name(),
                    nix32_encode(&got)
                ),
            ));
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes: a NAR is read through its announced size, so
/// a builder that sends more cannot make us write more.
pub struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R> Bounded<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Bounded { inner, left: limit }
    }
    /// True when every allowed byte was read.
    pub fn exhausted(&self) -> bool {
        self.left == 0
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD: &str = "/nix/store";
    const P: &str = "/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top";
    const D: &str = "/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-dep.drv";
    const H: &str = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    fn info() -> PathInfo {
        PathInfo {
            path: P.into(),
            deriver: D.into(),
            references: vec![P.into()],
            nar_size: 120,
            nar_hash: H.into(),
            ca: String::new(),
            sigs: vec!["cache.example.org-1:c2lnbmF0dXJl".into()],
        }
    }

    #[test]
    fn a_well_formed_info_passes() {
        assert_eq!(check(SD, &info()).unwrap().nar_hash, H);
    }

    #[test]
    fn a_deriver_with_a_newline_cannot_forge_a_registration() {
        let forged = format!("{D}\n/nix/store/00000000000000000000000000000000-forged\n{H}\n120\n\n0");
        let e = check(SD, &PathInfo { deriver: forged, ..info() }).unwrap_err();
        assert!(e.why.starts_with("deriver:"), "{e}");
        assert!(!e.to_string().contains('\n'), "the message quotes control characters: {e}");
    }

    #[test]
    fn every_field_is_checked() {
        let cases: Vec<(PathInfo, &str)> = vec![
            (PathInfo { path: "/etc/passwd".into(), ..info() }, "not a store path"),
            (PathInfo { references: vec!["/etc/passwd".into()], ..info() }, "reference"),
            (PathInfo { references: vec![P.into(), P.into()], ..info() }, "twice"),
            (PathInfo { deriver: P.into(), ..info() }, "not a derivation"),
            (PathInfo { nar_hash: "md5:abc".into(), ..info() }, "not a SHA-256"),
            (PathInfo { nar_size: 0, ..info() }, "impossible"),
            (PathInfo { nar_size: u64::MAX, ..info() }, "impossible"),
            (PathInfo { ca: "fixed:r:sha256:xyz".into(), ..info() }, "content address"),
            (PathInfo { sigs: vec!["no colon".into()], ..info() }, "signature"),
            (PathInfo { sigs: vec!["k:a b".into()], ..info() }, "signature"),
        ];
        for (i, want) in cases {
            let e = check(SD, &i).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn content_addresses_of_every_shape() {
        assert!(ca_shape_ok("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"));
        assert!(ca_shape_ok("fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"));
        assert!(ca_shape_ok("text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"));
        assert!(!ca_shape_ok("text:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"));
        assert!(!ca_shape_ok("fixed:sha256:"));
    }

    fn out(algo: &str, hash: &str) -> Output {
        Output { name: "out".into(), path: P.into(), hash_algo: algo.into(), hash: hash.into() }
    }

    #[test]
    fn fixed_outputs_are_checked_flat_and_recursive() {
        let dir = std::env::temp_dir().join(format!("path-info-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"hello\n").unwrap();
        // sha256("hello\n")
        let flat = FixedHash::of_output(&out("sha256", "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")).unwrap().unwrap();
        assert_eq!(flat.ca(), format!("fixed:sha256:{}", nix32_encode(&flat.digest)));
        let nar_hash = Sha256Hash([0; 32]);
        flat.verify(P, &f, &nar_hash).unwrap();
        std::fs::write(&f, b"forged\n").unwrap();
        assert!(flat.verify(P, &f, &nar_hash).unwrap_err().why.contains("fixed-output hash mismatch"));
        assert!(flat.verify(P, &dir, &nar_hash).unwrap_err().why.contains("regular file"));
        // recursive sha256 compares the NAR hash; others re-hash the NAR
        let rec = FixedHash::of_output(&out("r:sha256", &"ab".repeat(32))).unwrap().unwrap();
        rec.verify(P, &f, &Sha256Hash([0xab; 32])).unwrap();
        assert!(rec.verify(P, &f, &nar_hash).is_err());
        let mut nar = Vec::new();
        crate::nar::dump(&f, &mut nar).unwrap();
        let sha1 = sha1::Sha1::digest(&nar);
        let rec1 = FixedHash::of_output(&out("r:sha1", &sha1.iter().map(|b| format!("{b:02x}")).collect::<String>())).unwrap().unwrap();
        rec1.verify(P, &f, &nar_hash).unwrap();
        assert_eq!(FixedHash::of_output(&out("", "")).unwrap(), None);
        assert!(FixedHash::of_output(&out("r:blake3", "00")).is_err());
        assert!(FixedHash::of_output(&out("sha256", "zz")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bounded_reads_stop_at_the_limit() {
        let data = vec![7u8; 1000];
        let mut b = Bounded::new(&data[..], 120);
        let mut out = Vec::new();
        b.read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), 120);
        assert!(b.exhausted());
    }
}
