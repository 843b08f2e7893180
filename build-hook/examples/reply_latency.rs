//! Reply-latency benchmark: drives the hook protocol directly, timing from
//! process start to the reply line, for our hook and Nix's built-in hook in the
//! same run, with fds 4/5 set up as Nix does.
//!
//! usage: reply_latency MACHINES_FILE DRV_PATH [RUNS]
//! (`bash bench/dispatch.sh` sets up builders and runs this.)
// A benchmark driver, not the hook: it may panic, print and read its environment.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

fn wstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.extend(std::iter::repeat_n(0u8, (8 - s.len() % 8) % 8));
}

fn payload(machines: &str, store_root: &str, system: &str, drv: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let builders = format!("@{machines}");
    let store = format!("local?root={store_root}");
    let mut settings = vec![
        ("builders", builders.as_str()),
        ("builders-use-substitutes", "false"),
        ("extra-platforms", ""),
        ("max-jobs", "0"),
        ("store", store.as_str()),
        ("system", "x86_64-linux"),
        ("system-features", ""),
    ];
    settings.sort();
    for (k, val) in settings {
        v.extend_from_slice(&1u64.to_le_bytes());
        wstr(&mut v, k);
        wstr(&mut v, val);
    }
    v.extend_from_slice(&0u64.to_le_bytes());
    wstr(&mut v, "try");
    v.extend_from_slice(&0u64.to_le_bytes());
    wstr(&mut v, system);
    wstr(&mut v, drv);
    v.extend_from_slice(&0u64.to_le_bytes());
    v
}

/// One run: (reply line, milliseconds from spawn to reply).
fn once(argv: &[&str], input: &[u8]) -> (String, f64) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a 2-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (r, w) = (fds[0], fds[1]);
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).current_dir("/").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    // SAFETY: only async-signal-safe dup2 calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::dup2(w, 4);
            libc::dup2(r, 5);
            libc::dup2(1, 2);
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn hook");
    unsafe {
        libc::close(r);
        libc::close(w);
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut reply = String::new();
    let mut said = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        if line.starts_with("# ") {
            reply = line.trim().to_string();
            break;
        }
        said.push_str(&line);
        line.clear();
    }
    if reply.is_empty() || reply == "# decline" {
        reply.push_str(&format!("\n(hook said: {said})"));
    }
    let dt = t0.elapsed().as_secs_f64() * 1000.0;
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    (reply, dt)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: reply_latency MACHINES_FILE DRV_PATH [RUNS]");
        std::process::exit(2);
    }
    let (machines, drv) = (&args[1], &args[2]);
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(30);
    let ours = std::env::var("HOOK").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/build-hook").into());
    let root = std::env::temp_dir().join(format!("bh-bench-store-{}", std::process::id()));
    let root = root.to_str().unwrap();
    let floor_hook = std::env::temp_dir().join("bh-bench-floor-hook");
    std::fs::write(&floor_hook, "#!/bin/sh\necho '# decline'\nexec cat >/dev/null\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&floor_hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let floor_in = payload(machines, root, "mips-linux", drv);
    let floor = median((0..runs).map(|_| once(&[floor_hook.to_str().unwrap(), "3"], &floor_in).1).collect());
    println!("spawn floor (a /bin/sh hook that replies at once): {floor:.2} ms");
    for (kind, system, want) in [("decline", "mips-linux", "# decline"), ("accept", "x86_64-linux", "# accept")] {
        let input = payload(machines, root, system, drv);
        let mut med = Vec::new();
        for hook in [ours.as_str(), "/usr/libexec/nix/build-remote"] {
            once(&[hook, "3"], &input); // warm-up; for ours also a first recorded success
            let times: Vec<f64> = (0..runs)
                .map(|_| {
                    let (reply, dt) = once(&[hook, "3"], &input);
                    if reply.lines().next() != Some(want) {
                        eprintln!("{hook} {kind}: expected '{want}', got '{reply}'");
                        std::process::exit(1);
                    }
                    dt
                })
                .collect();
            med.push(median(times));
        }
        println!("{kind:8} median: build-hook {:7.2} ms   nix build-remote {:8.2} ms   ratio {:6.1}x", med[0], med[1], med[1] / med[0]);
    }
}
