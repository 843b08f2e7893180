//! `build-hook`: a drop-in replacement for Nix's built-in remote-build hook.
//! Set `build-hook = /path/to/build-hook` in nix.conf. This binary only
//! composes `remote-lib`: it reads the protocol, decides, and runs the job.

mod check;
mod config;
mod dispatch;
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
        Some("check") => std::process::exit(match check(&args[2..]) {
            Ok(code) => code,
            Err(e) => {
                println!("build-hook check: {e:#}");
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
    Exit status 0 when everything is usable.";

/// `build-hook check`.
fn check(args: &[String]) -> anyhow::Result<i32> {
    let mut settings = Settings::default();
    let mut connect = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connect" => connect = true,
            "--builders" => {
                let v = it.next().ok_or_else(|| anyhow::anyhow!("--builders needs a value, e.g. --builders @/etc/nix/machines"))?;
                settings.raw.insert("builders".into(), v.clone());
            }
            other => anyhow::bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    let cfg = config::Config::from_env().map_err(anyhow::Error::msg)?;
    let d = dispatch::Dispatcher::new(cfg, settings);
    let (lines, ok) = check::check(&d, connect);
    for l in lines {
        println!("{l}");
    }
    Ok(if ok { 0 } else { 1 })
}

fn run(args: &[String]) -> anyhow::Result<i32> {
    let verbosity = hook_protocol::verbosity_from_args(args)?;
    out::set_verbosity(verbosity);
    let cfg = config::Config::from_env().map_err(anyhow::Error::msg)?;
    let mut stdin = BufReader::new(std::io::stdin().lock());
    let settings = Settings::read(&mut stdin)?;
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
