//! `build-hook`: a drop-in replacement for Nix's built-in remote-build hook.
//! Set `build-hook = /path/to/build-hook` in nix.conf. This binary only
//! composes `remote-lib`: it reads the protocol, decides, and runs the job.

mod bridge;
mod check;
mod config;
mod dispatch;
mod ops;
mod out;
mod signals;

use remote_lib::hook_protocol::{self, Reply, Request, Settings};
use remote_lib::nixlog::Level;
use std::io::BufReader;

fn main() {
    signals::install();
    signals::cloexec_inherited_fds();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--version") => {
            println!("build-hook {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Some(cmd @ ("check" | "status" | "history" | "drain" | "undrain" | "explain")) => std::process::exit(match command(cmd, &args[2..]) {
            Ok(code) => code,
            Err(e) => {
                println!("build-hook {cmd}: {e:#}");
                2
            }
        }),
        // Started by the hook itself in front of ssh to an ssh-ng:// builder.
        Some("__ssh-ng-bridge") => std::process::exit(bridge::run(&args[2..])),
        // Started by the hook after a job, detached: holds a session for the next.
        Some("__hold") => std::process::exit(match remote_lib::held::hold_main(&args[2..]) {
            Ok(()) => 0,
            Err(e) => {
                // Its stderr is /dev/null when the hook starts it; this is
                // for someone running it by hand.
                let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("build-hook __hold: {e}\n"));
                2
            }
        }),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return;
        }
        _ => {}
    }
    std::process::exit(match run(&args) {
        Ok(code) => code,
        Err(e) => {
            out::msg(Level::Error, &format!("build-hook: {e:#}"));
            1
        }
    });
}

const USAGE: &str = "build-hook: a drop-in replacement for Nix's remote-build hook.

As a hook (set in nix.conf):   build-hook = /path/to/build-hook
Ask what it makes of your setup:
  build-hook check [--builders SPEC] [--connect]
    SPEC is a 'builders' value (e.g. @/etc/nix/machines); default: what the
    hook would use (NIX_REMOTE_SYSTEMS, nix.conf, /etc/nix/machines).
    Prints every problem in the machines list, each machine's busy slots and
    health (back-off, last failure), and with --connect tries each one.
    Exit status 0 when everything is usable.
Operate your builders (every command also takes --builders SPEC):
  build-hook status [--json] [--last N] [--watch]
                                          busy slots and what they build, health,
                                          drains, the last N builds (--watch:
                                          redrawn every second)
  build-hook history [--json] [--last N] [--since -1h|TIME] [--svg FILE]
                                          the recorded builds, one per line, or
                                          a timeline picture (one row per slot)
  build-hook history --simulate [--since -1h|TIME]
                                          the recorded builds replayed on the
                                          machines under Nix's rule and under
                                          learned speeds: the makespan of each
  build-hook drain MACHINE|--all [--until +2h|UNIXTIME]
                                          no new builds there (running ones finish)
  build-hook undrain MACHINE|--all
  build-hook explain DRV                  why each machine would or would not
                                          take DRV, with the speed that ranks it
                                          (configured or learned), and which one
                                          would be picked";

/// The operators' commands: `check`, `status`, `history`, `drain`,
/// `undrain`, `explain`.
fn command(cmd: &str, args: &[String]) -> anyhow::Result<i32> {
    let mut settings = Settings::default();
    let (mut connect, mut json, mut all) = (false, false, false);
    let mut last = 20;
    let mut until = None;
    let (mut svg, mut watch, mut since, mut simulate) = (None, false, 0.0, false);
    let mut words = Vec::new();
    let mut it = args.iter();
    let now = remote_lib::health::now();
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().cloned().ok_or_else(|| anyhow::anyhow!("{a} needs a value, e.g. {a} {what}"));
        match a.as_str() {
            "--connect" if cmd == "check" => connect = true,
            "--json" if cmd == "status" || cmd == "history" => json = true,
            "--all" if cmd == "drain" || cmd == "undrain" => all = true,
            "--last" => last = value("20")?.parse().map_err(|_| anyhow::anyhow!("--last takes a number of builds"))?,
            "--until" if cmd == "drain" => until = Some(ops::parse_until(&value("+2h")?, now).map_err(anyhow::Error::msg)?),
            "--svg" if cmd == "history" => svg = Some(value("timeline.svg")?),
            "--simulate" if cmd == "history" => simulate = true,
            "--since" if cmd == "history" => {
                // a time like drain's --until, or -N[smhd] for "that long ago"
                let v = value("-1h")?;
                since = match v.strip_prefix('-') {
                    Some(ago) => now.saturating_sub(ops::parse_until(&format!("+{ago}"), 0).map_err(anyhow::Error::msg)?) as f64,
                    None => ops::parse_until(&v, now).map_err(anyhow::Error::msg)? as f64,
                };
            }
            "--watch" if cmd == "status" => watch = true,
            "--builders" => {
                settings.raw.insert("builders".into(), value("@/etc/nix/machines")?);
            }
            w if !w.starts_with("--") => words.push(w.to_string()),
            other => anyhow::bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    let cfg = config::Config::from_env().map_err(anyhow::Error::msg)?;
    let d = dispatch::Dispatcher::new(cfg, settings);
    let one = |what: &str| -> anyhow::Result<String> {
        match words.as_slice() {
            [w] => Ok(w.clone()),
            _ => anyhow::bail!("give exactly one {what}\n{USAGE}"),
        }
    };
    match cmd {
        "check" => {
            let (lines, ok) = check::check(&d, connect);
            for l in lines {
                println!("{l}");
            }
            return Ok(if ok { 0 } else { 1 });
        }
        "status" if watch => ops::watch(&d, json, last),
        "status" => print!("{}", ops::status(&d, json, last)),
        "history" if simulate => print!("{}", ops::simulate_cmd(&d, since)),
        "history" => match svg {
            Some(file) => {
                let (records, _) = d.history.read();
                let records: Vec<_> = records.into_iter().filter(|r| r.start >= since).collect();
                std::fs::write(&file, ops::timeline_svg(&records)).map_err(|e| anyhow::anyhow!("cannot write '{file}': {e}"))?;
                println!("{} builds drawn in {file}", records.len());
            }
            None => print!("{}", ops::history_cmd(&d, json, last, since)),
        },
        "explain" => print!("{}", ops::explain(&d, &one("derivation (.drv path)")?).map_err(anyhow::Error::msg)?),
        "drain" | "undrain" => {
            let machine = if all { None } else { Some(ops::find_machine(&d, &one("machine (or --all)")?).map_err(anyhow::Error::msg)?.to_string()) };
            let what = machine.clone().unwrap_or_else(|| "every machine".into());
            if cmd == "drain" {
                d.drains.drain(machine.as_deref(), until)?;
                println!("{what} takes no new builds{}", until.map(|u| format!(" for {} s", u.saturating_sub(now))).unwrap_or_default());
            } else {
                d.drains.undrain(machine.as_deref())?;
                println!("{what} takes builds again");
            }
        }
        _ => unreachable!("matched above"),
    }
    Ok(0)
}

fn run(args: &[String]) -> anyhow::Result<i32> {
    let verbosity = hook_protocol::verbosity_from_args(args)?;
    out::set_verbosity(verbosity);
    let cfg = config::Config::from_env().map_err(anyhow::Error::msg)?;
    let mut stdin = BufReader::new(std::io::stdin().lock());
    let mut settings = Settings::read(&mut stdin)?;
    // /dev/kvm usable for reading and writing, as Nix checks it for its default features.
    let has_kvm = || std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    settings.fill_absent(&mut cfg.nix_conf_settings(), remote_lib::LOCAL_SYSTEM, &has_kvm);
    let mut hook = dispatch::Dispatcher::new(cfg, settings);
    hook.report_diagnostics();
    if hook.machines.is_empty() {
        out::reply(&Reply::DeclinePermanently);
        return Ok(0);
    }
    loop {
        let req = match hook_protocol::read_request(&mut stdin)? {
            Request::Done => return Ok(0),
            Request::Try(t) => t,
        };
        if let Some(accepted) = hook.handle_try(&req)? {
            let sets = hook_protocol::read_accepted(&mut stdin)?;
            return Ok(hook.run_job(&req, accepted, sets));
        }
    }
}
