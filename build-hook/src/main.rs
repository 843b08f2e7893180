//! `build-hook`: a drop-in replacement for Nix's built-in remote-build hook.
//! Set `build-hook = /path/to/build-hook` in nix.conf. This binary only
//! composes `remote-lib`: it reads the protocol, decides, and runs the job.

mod config;
mod hook;
mod out;
mod signals;

use remote_lib::hook_protocol::{self, Reply, Request, Settings};
use remote_lib::nixlog::Level;
use std::io::BufReader;

fn main() {
    signals::install();
    signals::cloexec_inherited_fds();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--version") {
        println!("build-hook {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    std::process::exit(match run(&args) {
        Ok(code) => code,
        Err(e) => {
            out::msg(Level::Error, &format!("build-hook: {e:#}"));
            1
        }
    });
}

fn run(args: &[String]) -> anyhow::Result<i32> {
    let verbosity = hook_protocol::verbosity_from_args(args)?;
    out::set_verbosity(verbosity);
    let cfg = config::Config::from_env().map_err(anyhow::Error::msg)?;
    let mut stdin = BufReader::new(std::io::stdin().lock());
    let settings = Settings::read(&mut stdin)?;
    let mut hook = hook::Hook::new(cfg, settings);
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
