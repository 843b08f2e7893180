//! A mutation fuzzer for every parser of build-hook, on stable Rust: each
//! target feeds arbitrary bytes to one parser (the machines list with its
//! includes, nix.conf, the hook protocol, `nix-store --serve` and daemon
//! replies, NARs, `.drv` files, health records, history lines, store paths,
//! a builder's path infos). Inputs are seeds mutated by bit flips,
//! interesting integers, insertions, deletions, repeats and splices; each
//! runs under `catch_unwind`, and a panic or an input that runs for more than
//! [`SLOW`] is a finding. Findings are kept under `fuzz/regressions/<target>/`
//! and replayed by `cargo test` (tests/regressions.rs).
#![allow(clippy::unwrap_used)]

use remote_lib::{cpu, derivation, health, history, hook_protocol, machines, nar, nixconf, path_info, serve, store_path, worker};
use std::io;
use std::time::Duration;

/// An input that takes longer than this is a finding (a hang, or work that
/// grows too fast with the input).
pub const SLOW: Duration = Duration::from_secs(2);

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Built-in seeds (besides the files in `fuzz/corpus/<name>/`).
    pub seeds: fn() -> Vec<Vec<u8>>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn machines_target(b: &[u8]) {
    // The input is the machines text; "@/a" and "@/b" read parts of it, so
    // includes (and cycles) are reached too.
    let t = text(b);
    let (a, rest) = t.split_at(t.char_indices().nth(t.chars().count() / 2).map(|x| x.0).unwrap_or(t.len()));
    let mut loader = |p: &str| -> io::Result<Option<String>> {
        Ok(match p {
            "/a" => Some(a.to_string()),
            "/b" => Some(rest.to_string()),
            "/err" => return Err(io::Error::other("unreadable")),
            _ => None,
        })
    };
    let parsed = machines::parse(&t, "fuzz", "x86_64-linux", &mut loader);
    for d in &parsed.diagnostics {
        let _ = d.to_string();
    }
    for m in &parsed.machines {
        let _ = remote_lib::transport::serve_words(m);
        let _ = remote_lib::transport::bulk_script(m, remote_lib::transport::Bulk::Download { level: 3 });
        let _ = remote_lib::slots::file_name(&m.uri, "-0");
    }
}

fn nixconf_target(b: &[u8]) {
    let t = text(b);
    let mut loader = |p: &str| -> io::Result<Option<String>> { Ok((p.ends_with(".conf")).then(|| t.clone())) };
    let c = nixconf::parse(&t, "/etc/nix/nix.conf", &mut loader);
    for d in &c.diagnostics {
        let _ = d.to_string();
    }
}

fn hook_settings_target(b: &[u8]) {
    if let Ok(s) = hook_protocol::Settings::read(&mut &b[..]) {
        let _ = (s.system(), s.extra_platforms(), s.system_features(), s.max_jobs(), s.store(), s.build_options());
    }
}

fn hook_request_target(b: &[u8]) {
    let mut r = b;
    while let Ok(hook_protocol::Request::Try(_)) = hook_protocol::read_request(&mut r) {
        let _ = hook_protocol::read_accepted(&mut r);
    }
}

fn drv() -> derivation::Derivation {
    derivation::Derivation::parse(
        "/nix/store/00000000000000000000000000000000-x.drv",
        br#"Derive([("out","/nix/store/00000000000000000000000000000000-x","","")],[],[],"x86_64-linux","/bin/sh",[],[])"#,
    )
    .unwrap()
}

fn serve_target(b: &[u8]) {
    let Ok(mut c) = serve::ServeConn::handshake(b, io::sink()) else { return };
    let asked = vec!["/nix/store/6wbb50jfsk0zbj684jhd2jf10mwkccng-hello".to_string(), "/nix/store/00000000000000000000000000000000-x".to_string()];
    let _ = c.query_valid_paths(&asked, false, false);
    if let Ok(infos) = c.query_path_infos(&asked) {
        for i in &infos {
            let _ = path_info::check("/nix/store", i);
        }
    }
    let _ = c.build_derivation("/nix/store/00000000000000000000000000000000-x.drv", &drv(), &[], &hook_protocol::BuildOptions::default());
    let _ = nar::skip(&mut io::Read::take(c.reader(), 1 << 20));
}

fn worker_target(b: &[u8]) {
    let Ok(mut c) = worker::WorkerConn::handshake(b, io::sink(), |_| {}) else { return };
    let p = "/nix/store/6wbb50jfsk0zbj684jhd2jf10mwkccng-hello";
    let _ = c.query_valid_paths(&[p.to_string()], false, |e| drop(e.nix_log_line()));
    if let Ok(Some(i)) = c.query_path_info(p, |_| {}) {
        let _ = path_info::check("/nix/store", &i);
    }
    let _ = c.build_derivation("/nix/store/00000000000000000000000000000000-x.drv", &drv(), &[], worker::BuildMode::Normal, |_| {});
    if let Ok(mut r) = c.nar_from_path(p, |_| {}) {
        let _ = nar::skip(&mut io::Read::take(&mut r, 1 << 20));
    }
}

fn nar_target(b: &[u8]) {
    let _ = nar::skip(&mut &b[..]);
    // Restore into a fresh directory (the input bounds what can be written).
    let dir = std::env::temp_dir().join(format!("bh-fuzz-nar-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = nar::remove_tree(&dir);
    let _ = nar::restore(&mut &b[..], &dir);
    let _ = nar::remove_tree(&dir);
}

fn drv_target(b: &[u8]) {
    if let Ok(d) = derivation::Derivation::parse("/nix/store/00000000000000000000000000000000-x.drv", b) {
        let mut out = Vec::new();
        let _ = d.write_basic(&mut out, &d.input_srcs);
        for o in &d.outputs {
            let _ = path_info::FixedHash::of_output(o);
        }
        // The ATerm printer and the hash modulo, inputs refused or read as itself.
        let _ = d.kind();
        let _ = d.hash_modulo(&mut |p: &str| Err(p.to_string()));
        let mut depth = 0;
        let _ = d.hash_modulo(&mut |_: &str| {
            depth += 1;
            if depth > 50 {
                Err("deep".into())
            } else {
                Ok(d.clone())
            }
        });
        // What the bridge reads back.
        let _ = derivation::Derivation::read_basic(&mut &out[..]);
    }
}

fn basic_drv_target(b: &[u8]) {
    let _ = derivation::Derivation::read_basic(&mut &b[..]);
    let _ = nar::single_file(b);
}

/// The ssh-ng bridge with the fuzzed bytes as the hook's serve requests
/// (after a valid hello), and a recorded Nix 2.34 daemon session as the
/// daemon's replies.
fn bridge_target(b: &[u8]) {
    let mut client = Vec::new();
    client.extend_from_slice(&serve::SERVE_MAGIC_1.to_le_bytes());
    client.extend_from_slice(&serve::CLIENT_VERSION.to_wire().to_le_bytes());
    client.extend_from_slice(b);
    let daemon = golden("worker-2.34-trusted-s2c.bin");
    let opts = worker::ClientOptions::for_build(&hook_protocol::BuildOptions::default(), 3, false);
    let mut trust = None;
    let _ = remote_lib::bridge::serve(&client[..], io::sink(), &daemon[..], io::sink(), opts, &mut io::sink(), &mut trust);
}

fn health_target(b: &[u8]) {
    let h = health::Health::parse(&text(b));
    let back = health::Health::parse(&h.render());
    let _ = back.backing_off(u64::MAX / 2);
    let _ = h.backing_off(0);
    let mut h2 = h.clone();
    h2.learn(health::Transfer { level: 3, nar: 10_000_000, wire: 1, secs: 0.001, idle_cores: None });
    h2.failed(u64::MAX, "x", health::Backoff { base_secs: u64::MAX, cap_secs: u64::MAX }, 0.99);
}

fn cpu_stat_target(b: &[u8]) {
    if let Some(t) = cpu::parse_stat(&text(b)) {
        assert!(t.idle <= t.total && t.cpus > 0, "{t:?}");
        let later = cpu::CpuTimes { idle: t.idle.saturating_add(7), total: t.total.saturating_add(64), cpus: t.cpus };
        if let Some(c) = cpu::idle_cores(&t, &later) {
            assert!((0.0..=f64::from(t.cpus)).contains(&c), "{c}");
        }
    }
}

fn history_target(b: &[u8]) {
    for line in b.split(|c| *c == b'\n') {
        if let Some(r) = history::parse_line(line) {
            let _ = history::drv_name(&r.drv);
        }
    }
}

fn store_path_target(b: &[u8]) {
    let t = text(b);
    if let Ok(p) = store_path::StorePath::parse("/nix/store", &t) {
        let _ = (p.name(), p.base_name());
    }
}

fn path_info_target(b: &[u8]) {
    // Lines: path, deriver, nar hash, ca, then references and signatures.
    let t = text(b);
    let l: Vec<&str> = t.split('\n').collect();
    let g = |i: usize| l.get(i).copied().unwrap_or("").to_string();
    let info = serve::PathInfo {
        path: g(0),
        deriver: g(1),
        nar_hash: g(2),
        ca: g(3),
        nar_size: b.len() as u64,
        references: l.iter().skip(4).filter(|x| x.starts_with('/')).map(|x| x.to_string()).collect(),
        sigs: l.iter().skip(4).filter(|x| !x.starts_with('/')).map(|x| x.to_string()).collect(),
    };
    let _ = path_info::check("/nix/store", &info);
}

fn seeds_of(list: &[&[u8]]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.to_vec()).collect()
}

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../remote-lib/tests/golden").join(name)).unwrap_or_default()
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "machines",
            run: machines_target,
            seeds: || {
                seeds_of(&[
                    b"ssh://root@b1 x86_64-linux,aarch64-linux /k 4 2 kvm,big big c3NoLWVkMjU1MTkgQUFBQQ==\n@/a\n# comment\nb2;b3 - - 0",
                    b"ssh://b1?remote-program=%2Fnix%20store&remote-store=local%3Froot%3D%2Fs - - 1 1\n@/b\n@/a\n@/err\n@rel",
                    include_bytes!("../../machines.conf.example"),
                ])
            },
        },
        Target {
            name: "nixconf",
            run: nixconf_target,
            seeds: || seeds_of(&[b"builders = @/etc/nix/machines\nextra-builders = b2\ninclude more.conf\n!include /x.conf\nmax-jobs=4 # c\n"]),
        },
        Target { name: "hook-settings", run: hook_settings_target, seeds: || vec![golden("hook-stdin.bin")] },
        Target { name: "hook-request", run: hook_request_target, seeds: || vec![golden("hook-stdin.bin").get(8..).map(|s| s.to_vec()).unwrap_or_default()] },
        Target { name: "serve-replies", run: serve_target, seeds: || vec![golden("serve-s2c.bin")] },
        Target { name: "worker-replies", run: worker_target, seeds: || vec![golden("worker-2.8-trusted-s2c.bin"), golden("worker-2.8-untrusted-s2c.bin")] },
        Target { name: "nar", run: nar_target, seeds: || vec![golden("hello-file.nar"), golden("dir.nar")] },
        Target {
            name: "drv",
            run: drv_target,
            seeds: || {
                seeds_of(&[
                    br#"Derive([("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top","","")],[("/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-dep.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo \"x\"\n"],[("PATH","/bin"),("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top")])"#,
                    br#"Derive([("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-f","r:sha256","5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")],[],["/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-src"],"x86_64-linux","/bin/sh",[],[])"#,
                ])
            },
        },
        Target {
            name: "basic-drv",
            run: basic_drv_target,
            seeds: || {
                let d = derivation::Derivation::parse(
                    "/nix/store/00000000000000000000000000000000-x.drv",
                    br#"Derive([("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top","","")],[],["/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-src"],"x86_64-linux","/bin/sh",["-c","x"],[("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top")])"#,
                )
                .map(|d| {
                    let mut v = Vec::new();
                    let _ = d.write_basic(&mut v, &d.input_srcs);
                    v
                })
                .unwrap_or_default();
                vec![d, golden("hello-file.nar")]
            },
        },
        Target {
            name: "bridge",
            run: bridge_target,
            seeds: || {
                // QueryValidPaths, QueryPathInfos, the trust question
                let mut v = Vec::new();
                for w in [1u64, 0, 0, 1] {
                    v.extend_from_slice(&w.to_le_bytes());
                }
                let p = b"/nix/store/46ax0m47x1x216zrhzjcsc59k7ygscmn-hello";
                v.extend_from_slice(&(p.len() as u64).to_le_bytes());
                v.extend_from_slice(p);
                v.extend_from_slice(&[0; 6]);
                for w in [2u64, 0, 100] {
                    v.extend_from_slice(&w.to_le_bytes());
                }
                vec![v]
            },
        },
        Target {
            name: "health",
            run: health_target,
            seeds: || seeds_of(&[b"build-hook-health v1\nlast_success=10\nfailures=2\nretry_after=99\nreason=x y\nzstd=yes\naes=no\nraw_mbps=12.5\ncompress=6\n"]),
        },
        Target {
            name: "history",
            run: history_target,
            seeds: || {
                seeds_of(&[br#"{"start":1.5,"drv":"/nix/store/00000000000000000000000000000000-p9.drv","name":"p9","system":"x86_64-linux","machine":"ssh://b1","slot":0,"end":2.5,"slot_wait":0.1,"upload_bytes":0,"upload_secs":0.0,"build_secs":1.0,"download_bytes":120,"download_secs":0.01,"result":"built"}"#])
            },
        },
        Target {
            name: "cpu-stat",
            run: cpu_stat_target,
            seeds: || seeds_of(&[b"cpu  4705 150 1120 16250 520 0 25 3 0 0\ncpu0 2355 75 560 8125 260 0 12 1 0 0\ncpu1 2350 75 560 8125 260 0 13 2 0 0\nintr 1234\n"]),
        },
        Target {
            name: "store-path",
            run: store_path_target,
            seeds: || seeds_of(&[b"/nix/store/6wbb50jfsk0zbj684jhd2jf10mwkccng-hello", b"/nix/store/00000000000000000000000000000000-x.drv"]),
        },
        Target {
            name: "path-info",
            run: path_info_target,
            seeds: || {
                seeds_of(&[b"/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top\n/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-dep.drv\nsha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nfixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top\nkey-1:c2ln\n"])
            },
        },
    ]
}

/// A small, fast, seedable generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Integers that tend to break length and count fields.
const INTERESTING: [u64; 14] = [0, 1, 2, 7, 8, 9, 255, 256, 4096, 65536, 1 << 31, 1 << 32, u64::MAX, u64::MAX - 7];

/// Largest input the mutator makes.
pub const MAX_INPUT: usize = 256 * 1024;

/// One to four mutations of `input`, sometimes spliced with `other`.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0u8, 0xff, b'(', b')', b'"', b'\n', b'%', b'@', b'/', b'=', b';', b'#'][rng.below(12)];
            }
            2 => {
                // an interesting u64 at an 8-aligned offset (length and count fields)
                let at = rng.below(len / 8 + 1) * 8;
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                for (k, b) in x.iter().enumerate() {
                    match v.get_mut(at + k) {
                        Some(slot) => *slot = *b,
                        None => v.push(*b),
                    }
                }
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                v.drain(a..b);
            }
            5 if len > 0 => {
                // repeat a chunk
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = v[a..b].to_vec();
                for _ in 0..1 + rng.below(8) {
                    v.splice(b..b, chunk.iter().copied());
                }
            }
            6 if !other.is_empty() => {
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                v.truncate(rng.below(len));
            }
            _ => v.push(rng.next_u64() as u8),
        }
    }
    v.truncate(MAX_INPUT);
    v
}

/// What one run found.
pub enum Finding {
    Panic(String),
    Slow(Duration),
}

/// Runs `target` on `input`: `Some` when it panicked or was too slow.
pub fn run_one(target: &Target, input: &[u8]) -> Option<Finding> {
    let t = std::time::Instant::now();
    let res = std::panic::catch_unwind(|| (target.run)(input));
    let took = t.elapsed();
    match res {
        Err(p) => Some(Finding::Panic(p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".into()))),
        Ok(()) if took > SLOW => Some(Finding::Slow(took)),
        Ok(()) => None,
    }
}

/// Where the files of a target live (`corpus` or `regressions`).
pub fn dir(kind: &str, target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(kind).join(target)
}

/// The seeds of a target: built-in ones, its corpus and its regressions.
pub fn all_seeds(t: &Target) -> Vec<Vec<u8>> {
    let mut v = (t.seeds)();
    for kind in ["corpus", "regressions"] {
        if let Ok(rd) = std::fs::read_dir(dir(kind, t.name)) {
            let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            v.extend(files.iter().filter_map(|p| std::fs::read(p).ok()));
        }
    }
    if v.is_empty() {
        v.push(Vec::new());
    }
    v
}
