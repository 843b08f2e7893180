//! The build-hook protocol between Nix and the hook (Nix's `src/libstore/build/hook-instance.cc` and `derivation-goal.cc`, `tryBuildHook`): the settings
//! handshake, `try` requests, replies and the post-accept input/output sets,
//! plus argv handling. Reading is done here; printing replies is the binary's
//! job (one writer owns stderr), so replies are values with a `line()`.

use crate::wire::{self, WireError};
use std::collections::BTreeMap;
use std::io::Read;

const MAX_SETTING: usize = 16 * 1024 * 1024;
const MAX_PATH: usize = 4096;

/// What went wrong on the hook's stdin.
#[derive(Debug, thiserror::Error)]
pub enum HookProtocolError {
    #[error("while reading the settings Nix sent")]
    Settings(#[source] WireError),
    #[error("while reading a request from Nix")]
    Request(#[source] WireError),
    #[error("while reading the inputs and wanted outputs Nix sent after '# accept'")]
    AfterAccept(#[source] WireError),
    #[error("bad verbosity argument '{0}': expected a number as the last argument (Nix passes e.g. '3')")]
    Verbosity(String),
}

/// The settings Nix passed, by name, plus typed accessors for the ones we use.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub raw: BTreeMap<String, String>,
}

impl Settings {
    /// Reads `(1, name, value)*` records ending with `0`.
    pub fn read<R: Read>(r: &mut R) -> Result<Self, HookProtocolError> {
        let mut raw = BTreeMap::new();
        loop {
            match wire::read_u64(r, "settings record marker").map_err(HookProtocolError::Settings)? {
                0 => return Ok(Settings { raw }),
                _ => {
                    let k = wire::read_string(r, MAX_SETTING, "setting name").map_err(HookProtocolError::Settings)?;
                    let v = wire::read_string(r, MAX_SETTING, "setting value").map_err(HookProtocolError::Settings)?;
                    raw.insert(k, v);
                }
            }
        }
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.raw.get(k).map(String::as_str)
    }

    /// Fills the settings that decide postpone versus decline when Nix did
    /// not send them (Lix 2.92+ sends only overridden settings): from
    /// `conf` (nix.conf as Nix reads it), else Nix's own defaults for
    /// `local_system` ([`nix_default`]); `has_kvm` is asked only when the
    /// default features are needed.
    pub fn fill_absent(&mut self, conf: &mut dyn FnMut(&str) -> Option<String>, local_system: &str, has_kvm: &dyn Fn() -> bool) {
        for k in ["system", "max-jobs", "system-features", "extra-platforms"] {
            if self.raw.contains_key(k) {
                continue;
            }
            let v = conf(k).unwrap_or_else(|| nix_default(k, local_system, k == "system-features" && has_kvm()));
            self.raw.insert(k.to_string(), v);
        }
    }
    fn num(&self, k: &str) -> u64 {
        self.get(k).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
    fn list(&self, k: &str) -> Vec<String> {
        self.get(k).map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
    }
    fn flag(&self, k: &str, default: bool) -> bool {
        self.get(k).map(|v| v == "true").unwrap_or(default)
    }
    pub fn system(&self) -> String {
        self.get("system").unwrap_or(crate::LOCAL_SYSTEM).to_string()
    }
    pub fn extra_platforms(&self) -> Vec<String> {
        self.list("extra-platforms")
    }
    pub fn system_features(&self) -> Vec<String> {
        self.list("system-features")
    }
    /// `max-jobs`; `auto` counts as willing.
    pub fn max_jobs(&self) -> u64 {
        match self.get("max-jobs") {
            Some("auto") => 1,
            _ => self.num("max-jobs"),
        }
    }
    pub fn store(&self) -> Option<&str> {
        self.get("store").filter(|s| !s.is_empty() && *s != "auto")
    }
    pub fn builders_use_substitutes(&self) -> bool {
        self.flag("builders-use-substitutes", false)
    }
    pub fn build_options(&self) -> BuildOptions {
        BuildOptions {
            max_silent_time: self.num("max-silent-time"),
            build_timeout: self.num("timeout"),
            max_log_size: self.num("max-build-log-size"),
            keep_failed: self.flag("keep-failed", false),
        }
    }
}

/// Nix's default for a setting the hook reads (Nix's `globals.cc`):
/// `max-jobs` 1; `system-features` the ones every Nix offers (`kvm` when
/// `/dev/kvm` is usable); `extra-platforms` `i686-linux` on x86_64 Linux and
/// `x86_64-darwin` on Apple silicon (Rosetta); `system` this machine's.
pub fn nix_default(k: &str, local_system: &str, has_kvm: bool) -> String {
    match k {
        "max-jobs" => "1".into(),
        "system-features" => {
            let mut f = vec!["nixos-test", "benchmark", "big-parallel"];
            if has_kvm {
                f.push("kvm");
            }
            f.join(" ")
        }
        "extra-platforms" => match local_system {
            "x86_64-linux" => "i686-linux".into(),
            "aarch64-darwin" => "x86_64-darwin".into(),
            _ => String::new(),
        },
        "system" => local_system.into(),
        _ => String::new(),
    }
}

/// The build options forwarded to the builder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    pub max_silent_time: u64,
    pub build_timeout: u64,
    pub max_log_size: u64,
    pub keep_failed: bool,
}

/// One `try`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TryRequest {
    pub am_willing: bool,
    pub needed_system: String,
    pub drv_path: String,
    pub required_features: Vec<String>,
}

/// What Nix sent where a request should be.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Try(TryRequest),
    /// EOF or another tag: the built-in hook exits 0.
    Done,
}

/// Reads the next request.
pub fn read_request<R: Read>(r: &mut R) -> Result<Request, HookProtocolError> {
    let tag = match wire::read_string(r, 64, "request tag") {
        Ok(t) => t,
        Err(WireError::Eof { .. }) => return Ok(Request::Done),
        Err(e) => return Err(HookProtocolError::Request(e)),
    };
    if tag != "try" {
        return Ok(Request::Done);
    }
    let e = HookProtocolError::Request;
    Ok(Request::Try(TryRequest {
        am_willing: wire::read_bool(r, "amWilling").map_err(e)?,
        needed_system: wire::read_string(r, 256, "neededSystem").map_err(e)?,
        drv_path: wire::read_string(r, MAX_PATH, "drvPath").map_err(e)?,
        required_features: wire::read_strings(r, 1024, "requiredFeatures").map_err(e)?,
    }))
}

/// What Nix sends after reading `# accept` and the machine name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The full input closure (sorted full store paths).
    pub inputs: Vec<String>,
    /// Output names (2.4+) or output paths (2.3).
    pub wanted_outputs: Vec<String>,
}

/// Reads the inputs and wanted outputs.
pub fn read_accepted<R: Read>(r: &mut R) -> Result<Accepted, HookProtocolError> {
    let e = HookProtocolError::AfterAccept;
    Ok(Accepted { inputs: wire::read_strings(r, MAX_PATH, "inputs").map_err(e)?, wanted_outputs: wire::read_strings(r, MAX_PATH, "wanted outputs").map_err(e)? })
}

/// A reply to `try`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Accept { machine: String },
    Decline,
    DeclinePermanently,
    Postpone,
}

impl Reply {
    /// The exact text to print (one or two lines, each ending in `\n`).
    pub fn text(&self) -> String {
        match self {
            Reply::Accept { machine } => format!("# accept\n{machine}\n"),
            Reply::Decline => "# decline\n".into(),
            Reply::DeclinePermanently => "# decline-permanently\n".into(),
            Reply::Postpone => "# postpone\n".into(),
        }
    }
}

/// Takes the verbosity from argv: the last argument, whatever comes before
/// (argv forms differ between 2.3–2.9, 2.10–2.11 and 2.12+).
pub fn verbosity_from_args(args: &[String]) -> Result<u32, HookProtocolError> {
    match args.iter().skip(1).last() {
        None => Ok(3),
        Some(v) => v.parse().map_err(|_| HookProtocolError::Verbosity(v.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn decodes_the_stdin_stream_captured_from_nix_2_8() {
        // Recorded by tests/golden/record.sh: settings, one try, the accepted sets.
        let bytes = golden("hook-stdin.bin");
        let r = &mut &bytes[..];
        let s = Settings::read(r).unwrap();
        assert!(s.raw.len() > 50, "only {} settings", s.raw.len());
        assert_eq!(s.get("builders-use-substitutes"), Some("false"));
        assert!(s.raw.keys().zip(s.raw.keys().skip(1)).all(|(a, b)| a < b));
        let Request::Try(t) = read_request(r).unwrap() else { panic!("no try") };
        assert_eq!(t.needed_system, s.system());
        assert!(t.drv_path.ends_with("-top.drv"), "{}", t.drv_path);
        assert!(!t.am_willing);
        let a = read_accepted(r).unwrap();
        assert_eq!(a.inputs.len(), 1);
        assert!(a.inputs[0].ends_with("-dep"));
        assert_eq!(a.wanted_outputs, vec!["out"]);
        assert!(r.is_empty(), "{} bytes left", r.len());
        assert_eq!(read_request(r).unwrap(), Request::Done);
    }

    #[test]
    fn unknown_tag_ends_the_session() {
        let mut b = Vec::new();
        wire::write_bytes(&mut b, b"bye").unwrap();
        assert_eq!(read_request(&mut &b[..]).unwrap(), Request::Done);
    }

    #[test]
    fn verbosity_is_the_last_argument_in_every_argv_form() {
        let v = |a: &[&str]| verbosity_from_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(v(&["build-remote", "3"]).unwrap(), 3);
        assert_eq!(v(&["__build-remote", "nix __build-remote", "6"]).unwrap(), 6);
        assert_eq!(v(&["nix", "__build-remote", "4"]).unwrap(), 4);
        assert_eq!(v(&["build-hook"]).unwrap(), 3);
        assert!(v(&["build-hook", "loud"]).is_err());
    }

    #[test]
    fn replies_are_exact() {
        assert_eq!(Reply::Accept { machine: "ssh://b1".into() }.text(), "# accept\nssh://b1\n");
        assert_eq!(Reply::DeclinePermanently.text(), "# decline-permanently\n");
    }
}
