//! `build-hook check`: what the hook makes of the machines list, each
//! machine's slots, health, transfer settings and cipher choice now, and
//! (with `--connect`) whether it can be reached.

use crate::dispatch::Dispatcher;
use remote_lib::health;
use remote_lib::machines::Severity;

/// The lines to print, and whether everything is usable.
pub fn check(d: &Dispatcher, connect: bool) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    lines.push(format!("machines from {}: {} usable", d.machines_source, d.machines.len()));
    for diag in &d.diagnostics {
        ok &= diag.severity != Severity::Error;
        lines.push(diag.to_string());
    }
    lines.push(format!("load directory: {}", d.load.path.display()));
    let now = health::now();
    for m in &d.machines {
        lines.push(format!(
            "{}  ({})\n  systems {}; max jobs {}; speed {}; features [{}]; mandatory [{}]; host key {}",
            m.uri,
            m.origin,
            m.systems.join(","),
            m.max_jobs,
            m.speed_factor,
            m.supported_features.join(","),
            m.mandatory_features.join(","),
            if m.host_key.is_some() { "pinned" } else { "from known_hosts" }
        ));
        match d.load.probe(&m.uri, m.max_jobs) {
            Ok((_, busy)) => lines.push(format!("  slots: {busy} of {} busy now", m.max_jobs)),
            Err(e) => lines.push(format!("  slots: cannot probe: {}", remote_lib::session::chain(&e))),
        }
        let h = d.health.get(&m.uri);
        let state = if h.backing_off(now) {
            format!("SKIPPED for {} more s after {} failed connection(s): {}", h.retry_after - now, h.failures, h.reason)
        } else if h.last_success > 0 {
            let since = if h.failures > 0 { format!("; {} failure(s) since: {}", h.failures, h.reason) } else { String::new() };
            format!("last connected {} s ago{since}", now.saturating_sub(h.last_success))
        } else if h.failures > 0 {
            format!("{} failed connection(s), back-off over: {}", h.failures, h.reason)
        } else {
            "never connected by build-hook".into()
        };
        let zstd = match (h.zstd, h.compress) {
            (Some(false), _) => "no zstd on the builder: copies uncompressed".to_string(),
            (Some(true), Some(0)) => "zstd available; copies currently uncompressed (fast link)".to_string(),
            (Some(true), Some(l)) => format!("zstd available; copies at level {l}"),
            (Some(true), None) => format!("zstd available; level not learned yet (the next copy uses {})", health::DEFAULT_LEVEL),
            (None, _) => "not asked yet whether the builder has zstd".to_string(),
        };
        let cipher = d.cipher_choice(m).1;
        lines.push(format!("  health: {state}\n  transfers: {zstd}\n  cipher for a new connection: {cipher}"));
        match d.drains.drained(&m.uri, now) {
            Some(0) => lines.push("  drained: takes no new builds until 'build-hook undrain'".into()),
            Some(until) => lines.push(format!("  drained: takes no new builds for {} s more", until - now)),
            None => {}
        }
        if connect {
            let t = std::time::Instant::now();
            match d.open_session(m) {
                Ok(mut s) if m.ssh.daemon => match s.serve.bridge_trust() {
                    Ok(info) => {
                        s.close();
                        let trust = match info.trusted {
                            Some(true) => "trusts this user".to_string(),
                            Some(false) => "does not trust this user: it takes only signed or content-addressed paths, and input-addressed derivations are built by path (add the user to 'trusted-users' there)".to_string(),
                            None => "does not say whether it trusts this user (protocol before 1.35)".to_string(),
                        };
                        let nix = if info.nix_version.is_empty() { String::new() } else { format!(" (Nix {})", info.nix_version) };
                        lines.push(format!("  connect: ok in {} ms, nix-daemon protocol {}{nix}; the daemon {trust}", t.elapsed().as_millis(), info.protocol));
                    }
                    Err(e) => {
                        ok = false;
                        s.kill();
                        lines.push(format!("  connect: FAILED: asking the builder's nix-daemon: {e}"));
                    }
                },
                Ok(s) => {
                    let (major, minor) = s.version();
                    s.close();
                    lines.push(format!("  connect: ok in {} ms, nix-store --serve protocol {major}.{minor}", t.elapsed().as_millis()));
                }
                Err(why) => {
                    ok = false;
                    lines.push(format!("  connect: FAILED: {}", why.to_string().replace('\n', "\n    ")));
                }
            }
        }
    }
    if d.machines.is_empty() {
        ok = false;
        lines.push("no usable machine: Nix would be told '# decline-permanently' and build locally".into());
    }
    (lines, ok)
}
