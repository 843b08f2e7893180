//! Store-path validation (Nix's `src/libstore/path.cc`): every path that reaches a command line, a
//! file name or the serve protocol goes through [`StorePath::parse`] first.

use crate::hash::nix32_decode;
use std::fmt;

/// Why a string is not a store path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("'{path}' is not in the store directory '{store_dir}'")]
    NotInStore { path: String, store_dir: String },
    #[error("'{path}' has a bad hash part: expected 32 nix32 characters")]
    BadHash { path: String },
    #[error("'{path}' has a bad name: {why}")]
    BadName { path: String, why: &'static str },
}

/// A validated store path: `<store_dir>/<32-char hash>-<name>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct StorePath {
    full: String,
    base_start: usize,
}

impl StorePath {
    /// Parses and validates a full path against `store_dir` (normally `/nix/store`).
    pub fn parse(store_dir: &str, s: &str) -> Result<Self, StorePathError> {
        let not_in_store = || StorePathError::NotInStore { path: s.to_string(), store_dir: store_dir.to_string() };
        let rest = s.strip_prefix(store_dir).ok_or_else(not_in_store)?;
        let base = rest.strip_prefix('/').ok_or_else(not_in_store)?;
        let bad_hash = || StorePathError::BadHash { path: s.to_string() };
        if base.len() < 34 || !base.is_char_boundary(32) {
            return Err(if base.len() < 33 { bad_hash() } else { StorePathError::BadName { path: s.to_string(), why: "it is empty" } });
        }
        let (hash, tail) = base.split_at(32);
        if nix32_decode(hash, 20).is_none() {
            return Err(bad_hash());
        }
        let name = tail.strip_prefix('-').ok_or_else(|| StorePathError::BadName { path: s.to_string(), why: "the 33rd character must be '-'" })?;
        check_name(name).map_err(|why| StorePathError::BadName { path: s.to_string(), why })?;
        Ok(StorePath { full: s.to_string(), base_start: s.len() - base.len() })
    }

    /// The full path.
    pub fn as_str(&self) -> &str {
        &self.full
    }
    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.full[self.base_start..]
    }
    /// The name after the hash.
    pub fn name(&self) -> &str {
        &self.base_name()[33..]
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 211 {
        return Err("it is longer than 211 characters");
    }
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return Err("'.' and '..' names are not allowed");
    }
    if !name.bytes().all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)) {
        return Err("only A-Z a-z 0-9 + - . _ ? = are allowed");
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

/// Nix's `makeStorePath`: `<store>/<nix32 of the SHA-256 of
/// "<type>:sha256:<hex>:<store>:<name>", folded to 20 bytes>-<name>`.
pub fn make_store_path(store_dir: &str, ty: &str, hash: &[u8; 32], name: &str) -> String {
    use sha2::Digest;
    let text = format!("{ty}:sha256:{}:{store_dir}:{name}", crate::hash::Sha256Hash(*hash).to_hex());
    let full = sha2::Sha256::digest(text.as_bytes());
    let mut folded = [0u8; 20];
    for (i, b) in full.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    format!("{store_dir}/{}-{name}", crate::hash::nix32_encode(&folded))
}

#[cfg(test)]
mod tests {
    use super::*;
    const SD: &str = "/nix/store";

    #[test]
    fn accepts_real_paths() {
        let p = StorePath::parse(SD, "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top.drv").unwrap();
        assert_eq!(p.name(), "top.drv");
        assert_eq!(p.base_name(), "42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top.drv");
    }

    #[test]
    fn rejects_what_could_reach_a_command_line() {
        for bad in [
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top;rm -rf",
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-$(id)",
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-a/../../etc",
            "/nix/store/../etc/passwd",
            "/etc/passwd",
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvse-top",
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-",
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-..",
            "/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0_top",
            "/nix/storeX/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top",
            "-oProxyCommand=x",
        ] {
            assert!(StorePath::parse(SD, bad).is_err(), "{bad} was accepted");
        }
    }
}
