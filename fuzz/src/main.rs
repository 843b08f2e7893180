//! `cargo run --profile fuzz -p bh-fuzz -- TARGET|all [--seconds N] [--runs N] [--seed S]`: mutates the
//! seeds of each target for N seconds (default 10) or N runs; a panic or a
//! slow input is saved under `fuzz/regressions/<target>/` and ends the run
//! with exit status 1. `bh-fuzz list` names the targets.
#![allow(clippy::print_stderr, clippy::unwrap_used)]

use bh_fuzz::{all_seeds, dir, mutate, run_one, targets, Finding, Rng};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut which = None;
    let (mut secs, mut runs, mut seed) = (10u64, None::<u64>, 0x5eed_u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| usage(&format!("{a} needs a number")));
        match a.as_str() {
            "--seconds" => secs = num(),
            "--runs" => runs = Some(num()),
            "--seed" => seed = num(),
            w if !w.starts_with("--") && which.is_none() => which = Some(w.to_string()),
            other => usage(&format!("unknown argument '{other}'")),
        }
    }
    let which = which.unwrap_or_else(|| usage("name a target, or all"));
    let all = targets();
    if which == "list" {
        for t in &all {
            println!("{}", t.name);
        }
        return;
    }
    let chosen: Vec<_> = all.iter().filter(|t| which == "all" || t.name == which).collect();
    if chosen.is_empty() {
        usage(&format!("no target '{which}'"));
    }
    // Panics are findings, reported below; the default hook would print each.
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = 0;
    for t in chosen {
        let seeds = all_seeds(t);
        let mut rng = Rng::new(seed ^ t.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
        let until = Instant::now() + Duration::from_secs(secs);
        let mut n = 0u64;
        // Every seed as it is first, then mutations.
        let mut queue: Vec<Vec<u8>> = seeds.clone();
        loop {
            let input = match queue.pop() {
                Some(i) => i,
                None => {
                    let a = &seeds[rng.below(seeds.len())];
                    let b = &seeds[rng.below(seeds.len())];
                    mutate(a, b, &mut rng)
                }
            };
            n += 1;
            if let Some(f) = run_one(t, &input) {
                found += 1;
                let d = dir("regressions", t.name);
                std::fs::create_dir_all(&d).unwrap();
                let name = format!("{:016x}", input.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3)));
                std::fs::write(d.join(&name), &input).unwrap();
                let what = match f {
                    Finding::Panic(m) => format!("panicked: {m}"),
                    Finding::Slow(d) => format!("took {:.1} s", d.as_secs_f64()),
                };
                println!("{}: FOUND after {n} inputs: {what}; input saved as fuzz/regressions/{}/{name}", t.name, t.name);
                break;
            }
            if runs.is_some_and(|r| n >= r) || (runs.is_none() && Instant::now() >= until) {
                break;
            }
        }
        println!("{:<16} {n:>9} inputs, {} seeds", t.name, seeds.len());
    }
    if found > 0 {
        println!("fuzz: {found} finding(s); each is replayed by 'cargo test -p bh-fuzz' once fixed");
        std::process::exit(1);
    }
    println!("fuzz: no finding");
}

fn usage(why: &str) -> ! {
    eprintln!("bh-fuzz: {why}\nusage: bh-fuzz TARGET|all|list [--seconds N] [--runs N] [--seed S]");
    std::process::exit(2);
}
