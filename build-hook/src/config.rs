//! Everything the hook takes from its environment, read in this one module:
//! where the machines list and load directory are, `NIX_SSHOPTS`, and our own
//! `BUILD_HOOK_*` knobs (timeouts, connection sharing, back-off).

use remote_lib::health::Backoff;
use remote_lib::hook_protocol::Settings;
use remote_lib::local_store::{self, LocalStore};
use remote_lib::machines;
use remote_lib::session::Timeouts;
use std::path::PathBuf;
use std::time::Duration;

/// Seconds a remote build may go without a log line when neither Nix's
/// `max-silent-time` nor `BUILD_HOOK_BUILD_SILENT_TIMEOUT` says otherwise.
pub const DEFAULT_BUILD_SILENT: u64 = 3 * 3600;

/// Tunables, with their defaults.
#[derive(Clone, Debug)]
pub struct Config {
    pub ssh_program: String,
    pub nix_store: String,
    pub connect_timeout: u32,
    pub server_alive_interval: u32,
    pub server_alive_count_max: u32,
    /// Seconds an idle shared connection stays open; 0 disables sharing.
    pub control_persist: u32,
    /// A builder that connected within this many seconds is accepted before
    /// connecting.
    pub healthy_window: u64,
    pub backoff: Backoff,
    /// How long a `try` may wait for a busy machine's slot before answering
    /// `# postpone` (after which Nix sleeps its `build-poll-interval`).
    pub slot_wait_ms: u64,
    /// `BUILD_HOOK_QUEUE`: while every suitable slot is busy, accept up to
    /// one build per slot ahead and prepare it (see dispatch.rs).
    pub queue: bool,
    /// `BUILD_HOOK_HELD_SESSIONS`: after a job, hold up to this many
    /// sessions to its builder open for the next jobs (at most its max-jobs,
    /// 4, and what sshd's `MaxSessions` leaves; 0: none). See remote-lib's
    /// `held` and `Dispatcher::hold_sessions`.
    pub held_sessions: u32,
    /// zstd level for bulk copies: None = learn per builder, 0 = never.
    pub compress: Option<i32>,
    /// Put AES-GCM first in ssh's cipher order for new connections when both
    /// CPUs have AES instructions and the user chose no ciphers.
    pub prefer_aes_gcm: bool,
    /// Seconds any exchange with a builder other than the build itself may
    /// go without a byte moving.
    pub stall_timeout: u64,
    /// Seconds the remote build may go without a log line; `None`: from
    /// Nix's `max-silent-time` (see [`Config::timeouts`]).
    pub build_silent_timeout: Option<u64>,
    /// Commands run after a remote build succeeds / fails, with its history
    /// record as JSON on stdin (`BUILD_HOOK_ON_SUCCESS`, `BUILD_HOOK_ON_FAILURE`).
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    /// Seconds such a command may run.
    pub result_hook_timeout: u64,
    pub sshopts: String,
    pub current_load: Option<PathBuf>,
    pub remote_systems: Option<String>,
    pub conf_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// `NIX_STORE_DIR`: the logical store directory when the `store` setting
    /// does not name one.
    pub store_dir: Option<String>,
}

/// The one reader of the environment (see the workspace lints).
#[allow(clippy::disallowed_methods)]
fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn num<T: std::str::FromStr>(var: &dyn Fn(&str) -> Option<String>, k: &str, default: T) -> Result<T, String> {
    match var(k) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| format!("environment variable {k}='{v}' is not a whole number; unset it or give e.g. {k}=10")),
    }
}

/// A switch that is on unless set to 0.
fn on_by_default(var: &dyn Fn(&str) -> Option<String>, k: &str) -> Result<bool, String> {
    match var(k).as_deref() {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(v) => Err(format!("environment variable {k}='{v}' must be 1 (default) or 0")),
    }
}

impl Config {
    /// Reads the environment. A malformed knob is an error that names it.
    pub fn from_env() -> Result<Config, String> {
        Self::from_vars(&var)
    }

    /// Reads the knobs through `var` (the environment, or a test's map).
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
        let num64 = |k: &str, d: u64| num(var, k, d);
        let num32 = |k: &str, d: u32| num(var, k, d);
        Ok(Config {
            ssh_program: var("BUILD_HOOK_SSH").unwrap_or_else(|| "ssh".into()),
            nix_store: var("BUILD_HOOK_NIX_STORE").unwrap_or_else(|| "nix-store".into()),
            connect_timeout: num32("BUILD_HOOK_CONNECT_TIMEOUT", 10)?,
            server_alive_interval: num32("BUILD_HOOK_SERVER_ALIVE_INTERVAL", 15)?,
            server_alive_count_max: num32("BUILD_HOOK_SERVER_ALIVE_COUNT", 4)?,
            control_persist: num32("BUILD_HOOK_CONTROL_PERSIST", 120)?,
            healthy_window: num64("BUILD_HOOK_HEALTHY_WINDOW", 600)?,
            backoff: Backoff { base_secs: num64("BUILD_HOOK_BACKOFF_BASE", 5)?, cap_secs: num64("BUILD_HOOK_BACKOFF_CAP", 300)? },
            slot_wait_ms: num64("BUILD_HOOK_SLOT_WAIT_MS", 3000)?,
            queue: on_by_default(var, "BUILD_HOOK_QUEUE")?,
            held_sessions: num32("BUILD_HOOK_HELD_SESSIONS", 2)?,
            compress: match var("BUILD_HOOK_COMPRESS").as_deref() {
                None | Some("auto") => None,
                Some(v) => Some(
                    v.parse::<i32>()
                        .ok()
                        .filter(|l| (0..=19).contains(l))
                        .ok_or_else(|| format!("environment variable BUILD_HOOK_COMPRESS='{v}' must be 'auto' or a zstd level from 0 (off) to 19"))?,
                ),
            },
            prefer_aes_gcm: on_by_default(var, "BUILD_HOOK_PREFER_AES_GCM")?,
            stall_timeout: num64("BUILD_HOOK_STALL_TIMEOUT", 300)?,
            build_silent_timeout: match var("BUILD_HOOK_BUILD_SILENT_TIMEOUT") {
                None => None,
                Some(_) => Some(num64("BUILD_HOOK_BUILD_SILENT_TIMEOUT", 0)?),
            },
            on_success: var("BUILD_HOOK_ON_SUCCESS"),
            on_failure: var("BUILD_HOOK_ON_FAILURE"),
            result_hook_timeout: num64("BUILD_HOOK_RESULT_HOOK_TIMEOUT", 30)?,
            sshopts: var("NIX_SSHOPTS").unwrap_or_default(),
            current_load: var("NIX_CURRENT_LOAD").map(PathBuf::from),
            remote_systems: var("NIX_REMOTE_SYSTEMS"),
            conf_dir: var("NIX_CONF_DIR").map(PathBuf::from).unwrap_or_else(|| "/etc/nix".into()),
            state_dir: var("NIX_STATE_DIR").map(PathBuf::from),
            store_dir: var("NIX_STORE_DIR"),
        })
    }

    /// Every wait's limit. The build may be silent for
    /// `BUILD_HOOK_BUILD_SILENT_TIMEOUT` seconds (0: no limit); by default for
    /// Nix's `max-silent-time` plus the stall timeout when Nix sets one (the
    /// builder enforces it and reports a timeout first), else 3 hours.
    pub fn timeouts(&self, max_silent_time: u64) -> Timeouts {
        let stall = Duration::from_secs(self.stall_timeout.max(1));
        let build_silent = match self.build_silent_timeout {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None if max_silent_time > 0 => Some(Duration::from_secs(max_silent_time) + stall),
            None => Some(Duration::from_secs(DEFAULT_BUILD_SILENT)),
        };
        Timeouts { handshake: Duration::from_secs(self.connect_timeout as u64 * 2 + 5), stall, build_silent }
    }

    /// The local store the `store` setting names, with `NIX_STORE_DIR` and
    /// `NIX_STATE_DIR` as its defaults.
    pub fn local_store(&self, store: Option<&str>) -> LocalStore {
        let defaults = local_store::Defaults { store_dir: self.store_dir.clone(), state_dir: self.state_dir.clone() };
        LocalStore::new(store, &self.nix_store, &defaults)
    }

    /// The load directory: `NIX_CURRENT_LOAD`, else the local store's state
    /// directory's `current-load`, as Nix's own hook has it.
    pub fn load_dir(&self, store: &LocalStore) -> PathBuf {
        match &self.current_load {
            Some(p) => p.clone(),
            None => store.state_dir().join("current-load"),
        }
    }

    /// nix.conf (`NIX_CONF_DIR/nix.conf`), read as Nix reads it; `None`
    /// when there is none.
    pub fn read_nix_conf(&self) -> Option<remote_lib::nixconf::NixConf> {
        let conf = self.conf_dir.join("nix.conf");
        let text = std::fs::read_to_string(&conf).ok()?;
        let source = conf.display().to_string();
        Some(remote_lib::nixconf::parse(&text, &source, &mut |p: &str| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }))
    }

    /// A function giving settings from nix.conf, which it reads once, on
    /// the first question.
    pub fn nix_conf_settings(&self) -> impl FnMut(&str) -> Option<String> + '_ {
        let mut conf: Option<Option<remote_lib::nixconf::NixConf>> = None;
        move |name| conf.get_or_insert_with(|| self.read_nix_conf()).as_ref().and_then(|c| c.get(name)).map(str::to_string)
    }

    /// The machines text and the name to report it under.
    pub fn builders(&self, settings: &Settings) -> (String, String) {
        if let Some(b) = settings.get("builders") {
            if let Some(rs) = &self.remote_systems {
                // Nix ≤2.23 turned NIX_REMOTE_SYSTEMS=a:b into "@a @b", one missing file.
                let parts: Vec<String> = rs.split(':').filter(|p| !p.is_empty()).map(|p| format!("@{p}")).collect();
                if b == parts.join(" ") || b == parts.join("\n") {
                    return (machines::remote_systems_to_builders(rs), "NIX_REMOTE_SYSTEMS".into());
                }
            }
            return (b.to_string(), "the 'builders' setting".into());
        }
        // Lix 2.92+ sends only overridden settings: fall back as Nix would.
        if let Some(rs) = &self.remote_systems {
            return (machines::remote_systems_to_builders(rs), "NIX_REMOTE_SYSTEMS".into());
        }
        // As Nix reads it: the last value wins, includes, extra-builders.
        if let Some(b) = self.nix_conf_settings()("builders") {
            return (b, self.conf_dir.join("nix.conf").display().to_string());
        }
        (format!("@{}", self.conf_dir.join("machines").display()), "the default machines file".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, String> {
        let map: std::collections::HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(&move |k: &str| map.get(k).cloned())
    }

    fn settings(kv: &[(&str, &str)]) -> Settings {
        let mut s = Settings::default();
        for (k, v) in kv {
            s.raw.insert(k.to_string(), v.to_string());
        }
        s
    }

    #[test]
    fn defaults_and_malformed_knobs_name_the_variable() {
        let c = cfg(&[]).unwrap();
        assert_eq!((c.connect_timeout, c.stall_timeout, c.slot_wait_ms, c.compress, c.prefer_aes_gcm), (10, 300, 3000, None, true));
        assert!(c.queue && !cfg(&[("BUILD_HOOK_QUEUE", "0")]).unwrap().queue);
        assert_eq!((c.held_sessions, cfg(&[("BUILD_HOOK_HELD_SESSIONS", "0")]).unwrap().held_sessions), (2, 0));
        for (k, v) in [
            ("BUILD_HOOK_HELD_SESSIONS", "many"),
            ("BUILD_HOOK_STALL_TIMEOUT", "soon"),
            ("BUILD_HOOK_COMPRESS", "99"),
            ("BUILD_HOOK_PREFER_AES_GCM", "yes"),
            ("BUILD_HOOK_CONNECT_TIMEOUT", "-1"),
            ("BUILD_HOOK_QUEUE", "on"),
        ] {
            let e = cfg(&[(k, v)]).unwrap_err();
            assert!(e.contains(k) && e.contains(v), "{e}");
        }
        assert_eq!(cfg(&[("BUILD_HOOK_COMPRESS", "auto")]).unwrap().compress, None);
        assert_eq!(cfg(&[("BUILD_HOOK_COMPRESS", "0")]).unwrap().compress, Some(0));
    }

    #[test]
    fn timeouts_follow_nix_s_max_silent_time_unless_set() {
        let c = cfg(&[("BUILD_HOOK_STALL_TIMEOUT", "60")]).unwrap();
        assert_eq!(c.timeouts(0).build_silent, Some(Duration::from_secs(DEFAULT_BUILD_SILENT)));
        assert_eq!(c.timeouts(100).build_silent, Some(Duration::from_secs(160)));
        assert_eq!(c.timeouts(0).stall, Duration::from_secs(60));
        assert_eq!(c.timeouts(0).handshake, Duration::from_secs(25));
        let c = cfg(&[("BUILD_HOOK_BUILD_SILENT_TIMEOUT", "7")]).unwrap();
        assert_eq!(c.timeouts(100).build_silent, Some(Duration::from_secs(7)));
        assert_eq!(cfg(&[("BUILD_HOOK_BUILD_SILENT_TIMEOUT", "0")]).unwrap().timeouts(100).build_silent, None);
    }

    #[test]
    fn the_machines_list_comes_from_builders_then_remote_systems_then_nix_conf_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().display().to_string();
        // builders setting wins
        let c = cfg(&[("NIX_CONF_DIR", &conf), ("NIX_REMOTE_SYSTEMS", "/r1:/r2")]).unwrap();
        assert_eq!(c.builders(&settings(&[("builders", "ssh://b1")])), ("ssh://b1".into(), "the 'builders' setting".into()));
        // Nix ≤2.23's rendering of NIX_REMOTE_SYSTEMS is read as the list of files it meant
        assert_eq!(c.builders(&settings(&[("builders", "@/r1 @/r2")])).0, "@/r1\n@/r2");
        // no builders setting (Lix 2.92+): NIX_REMOTE_SYSTEMS, then nix.conf
        assert_eq!(c.builders(&settings(&[])).1, "NIX_REMOTE_SYSTEMS");
        let c = cfg(&[("NIX_CONF_DIR", &conf)]).unwrap();
        assert_eq!(c.builders(&settings(&[])).0, format!("@{conf}/machines"), "the default machines file");
        std::fs::write(dir.path().join("nix.conf"), "builders = @/first\nbuilders = @/last\n!include extra.conf\n").unwrap();
        std::fs::write(dir.path().join("extra.conf"), "extra-builders = ssh://b9\n").unwrap();
        let (text, source) = c.builders(&settings(&[]));
        assert_eq!((text.as_str(), source), ("@/last ssh://b9", format!("{conf}/nix.conf")), "last value wins, includes and extra- are read");
    }

    #[test]
    fn settings_nix_did_not_send_come_from_nix_conf_then_nix_s_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("nix.conf"),
            "max-jobs = 0
system-features = kvm
extra-system-features = big
",
        )
        .unwrap();
        let c = cfg(&[("NIX_CONF_DIR", &conf)]).unwrap();
        // As Lix 2.92+ sends them: only what was overridden on the command line.
        let mut s = settings(&[("extra-platforms", "aarch64-linux")]);
        s.fill_absent(&mut c.nix_conf_settings(), "x86_64-linux", &|| false);
        assert_eq!(s.max_jobs(), 0, "from nix.conf");
        assert_eq!(s.system_features(), ["kvm", "big"], "from nix.conf, extra- appended");
        assert_eq!(s.extra_platforms(), ["aarch64-linux"], "sent by Nix: kept");
        assert_eq!(s.system(), "x86_64-linux");
        let bare = cfg(&[("NIX_CONF_DIR", "/nonexistent")]).unwrap();
        let mut s = settings(&[]);
        s.fill_absent(&mut bare.nix_conf_settings(), "x86_64-linux", &|| true);
        assert_eq!((s.max_jobs(), s.extra_platforms()), (1, vec!["i686-linux".to_string()]), "Nix's defaults");
        assert_eq!(s.system_features(), ["nixos-test", "benchmark", "big-parallel", "kvm"]);
    }

    #[test]
    fn the_load_directory_is_the_local_store_s_state_directory() {
        let c = cfg(&[("NIX_STATE_DIR", "/s")]).unwrap();
        assert_eq!(c.load_dir(&c.local_store(None)), PathBuf::from("/s/current-load"));
        assert_eq!(c.load_dir(&c.local_store(Some("daemon"))), PathBuf::from("/s/current-load"));
        assert_eq!(c.load_dir(&c.local_store(Some("local?root=/r"))), PathBuf::from("/r/nix/var/nix/current-load"));
        let c = cfg(&[("NIX_STATE_DIR", "/s"), ("NIX_CURRENT_LOAD", "/cl")]).unwrap();
        assert_eq!(c.load_dir(&c.local_store(Some("local?root=/r"))), PathBuf::from("/cl"));
        let c = cfg(&[("NIX_STORE_DIR", "/t/store")]).unwrap();
        assert_eq!(c.local_store(None).store_dir, "/t/store");
    }
}
