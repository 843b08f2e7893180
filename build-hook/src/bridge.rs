//! The `__ssh-ng-bridge` process: the hook starts it in front of
//! `ssh HOST nix-daemon --stdio` for an `ssh-ng://` builder, and it serves
//! the serve protocol on its stdin/stdout with that daemon behind it
//! ([`remote_lib::bridge`]). Its exit status is the verdict the hook reads:
//! 0 when the hook ended the session, 255 when ssh lost the builder, 1 when
//! the builder's daemon refused (its words, and a hint, on stderr), 3 when
//! it refused because it does not trust us (another builder may not).

use crate::out;
use remote_lib::bridge;
use remote_lib::hook_protocol::BuildOptions;
use remote_lib::worker::ClientOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the bridge for the command after `--`; returns the exit status.
pub fn run(args: &[String]) -> i32 {
    let mut err = out::Stderr;
    let Some(("--", cmd)) = args.split_first().map(|(a, rest)| (a.as_str(), rest)) else {
        let _ = writeln!(err, "build-hook __ssh-ng-bridge: usage: build-hook __ssh-ng-bridge -- SSH-COMMAND...");
        return 2;
    };
    let Some((program, rest)) = cmd.split_first() else { return 2 };
    let mut c = Command::new(program);
    c.args(rest).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: only an async-signal-safe call between fork and exec.
    unsafe {
        c.pre_exec(|| {
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            let _ = writeln!(err, "build-hook: cannot start '{program}': {e}");
            return 255;
        }
    };
    let (Some(to_daemon), Some(from_daemon)) = (child.stdin.take(), child.stdout.take()) else { return 255 };
    // The hook's own build options arrive with each BuildDerivation.
    let options = ClientOptions::for_build(&BuildOptions::default(), 3, false);
    let mut trust = None;
    let res = bridge::serve(std::io::stdin(), std::io::stdout(), from_daemon, to_daemon, options, &mut err, &mut trust);
    match res {
        Ok(()) => match wait_for(&mut child, Duration::from_secs(30)) {
            Some(s) if s.success() => 0,
            _ => 255,
        },
        Err(e) => {
            let closed = e.daemon_closed();
            let status = if closed { wait_for(&mut child, Duration::from_secs(10)) } else { None };
            let _ = child.kill();
            let _ = child.wait();
            let hint = match &e {
                bridge::BridgeError::Daemon(w) => w.untrusted_hint(),
                _ => None,
            };
            let _ = writeln!(err, "error: {e}");
            if let Some(h) = hint {
                let _ = writeln!(err, "hint: {h}");
            }
            if e.refused_for_trust(trust) {
                // Another builder, one that trusts us, may take the job.
                return remote_lib::session::UNTRUSTED_EXIT;
            }
            match status {
                // ssh ended the session: its status says whether the link went (255) or the daemon did.
                Some(s) if s.code() == Some(255) || s.signal().is_some() => 255,
                _ if closed && status.is_none() => 255,
                _ => 1,
            }
        }
    }
}

/// Waits at most `limit` for `child` to exit.
fn wait_for(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}
