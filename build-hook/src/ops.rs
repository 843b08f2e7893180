//! Operators' commands — `status`, `history`, `drain`/`undrain`, `explain` —
//! and the records they read: the history the dispatcher appends after
//! every attempt, and a marker per busy slot saying what it builds.

use crate::dispatch::Dispatcher;
use remote_lib::derivation::Derivation;
use remote_lib::history::{self, Record};
use remote_lib::hook_protocol::TryRequest;
use remote_lib::job::JobError;
use remote_lib::select::{self, Candidate};
use remote_lib::session::SessionError;
use remote_lib::slots::LoadDir;
use remote_lib::store_path::StorePath;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a busy slot is building, kept in `<load dir>/build-hook/busy/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Busy {
    pub machine: String,
    pub slot: u64,
    pub drv: String,
    pub since: f64,
    pub pid: u32,
}

/// Removes its busy marker when dropped.
pub struct BusyMarker(Option<PathBuf>);
impl Drop for BusyMarker {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What a busy marker stands for: a slot being built on, or a place in the
/// machine's queue (a ticket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Slot,
    Ticket,
}

/// The marker of slot (or queue ticket) `n` of `uri`, named like the lock
/// file it describes.
fn busy_file(load: &LoadDir, uri: &str, n: u64, place: Place) -> PathBuf {
    let q = if place == Place::Ticket { "queue-" } else { "" };
    load.path.join("build-hook/busy").join(format!("{}-{q}{n}", remote_lib::transport::file_name_for(uri)))
}

/// Records that slot `slot` of `uri` builds `drv` (`Place::Slot`), or that
/// `drv` waits in its queue with ticket `slot` (`Place::Ticket`): advice for
/// `status`; a failure to write it is ignored, and a marker whose lock is
/// free is stale.
pub fn mark_busy(load: &LoadDir, uri: &str, slot: u64, place: Place, drv: &str) -> BusyMarker {
    let p = busy_file(load, uri, slot, place);
    let b = Busy { machine: uri.into(), slot, drv: drv.into(), since: history::now(), pid: std::process::id() };
    let ok = p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && serde_json::to_string(&b).is_ok_and(|j| std::fs::write(&p, j).is_ok());
    BusyMarker(ok.then_some(p))
}

/// One attempt of a job on one machine.
pub struct Attempt<'a> {
    pub uri: &'a str,
    pub slot: u64,
    /// Unix time it started.
    pub start: f64,
    /// Seconds the `try` waited for the slot.
    pub waited: f64,
}

/// An attempt's result word and reason, for the history.
pub fn outcome(err: Option<&JobError>) -> (&'static str, String) {
    let (word, why) = match err {
        None => ("built", String::new()),
        Some(JobError::BuildFailed { msg, .. }) => ("failed", msg.clone()),
        Some(JobError::Builder(e @ SessionError::Lost { .. })) => ("lost", e.to_string()),
        Some(JobError::Builder(e @ SessionError::Refused { .. })) => ("refused", e.to_string()),
        Some(e) => ("local", e.to_string()),
    };
    // Stored and shown by `history`/`status`: no terminal colours.
    (word, remote_lib::nixlog::strip_ansi(&why))
}

/// The record of one attempt, for the history.
pub fn record(req: &TryRequest, a: &Attempt, s: remote_lib::job::Stats, result: &str, reason: String) -> Record {
    Record {
        start: a.start,
        end: history::now(),
        slot: a.slot,
        drv: req.drv_path.clone(),
        name: history::drv_name(&req.drv_path),
        system: req.needed_system.clone(),
        machine: a.uri.to_string(),
        slot_wait: a.waited,
        upload_bytes: s.upload_bytes,
        upload_secs: s.upload_secs,
        build_secs: s.build_secs,
        download_bytes: s.download_bytes,
        download_secs: s.download_secs,
        result: result.into(),
        reason,
    }
}

/// Runs the operator's command for a result (`BUILD_HOOK_ON_SUCCESS` for a
/// build that succeeded, `BUILD_HOOK_ON_FAILURE` for any other outcome)
/// with the record as JSON on its stdin, detached: in a process group of its
/// own, its output to /dev/null, ended by `timeout` after the configured
/// seconds, never waited for — Nix does not wait for it either.
pub fn run_result_hook(cfg: &crate::config::Config, r: &Record) {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let cmd = if r.result == "built" { &cfg.on_success } else { &cfg.on_failure };
    let (Some(cmd), Ok(json)) = (cmd, serde_json::to_string(r)) else { return };
    let child = Command::new("timeout")
        .args(["-s", "KILL", &cfg.result_hook_timeout.to_string(), "/bin/sh", "-c", cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    if let Ok(mut c) = child {
        if let Some(mut stdin) = c.stdin.take() {
            use std::io::Write;
            // The record is a few hundred bytes: it fits the pipe, so this does not block.
            let _ = stdin.write_all(json.as_bytes());
        }
    }
}

/// One machine's state now, as `status` shows it.
#[derive(Serialize)]
pub struct MachineStatus {
    machine: String,
    slots: u64,
    busy: u64,
    building: Vec<Busy>,
    /// Builds accepted for this machine that wait for one of its slots.
    queued: Vec<Busy>,
    health: String,
    drained: Option<u64>,
    /// Serve sessions opened ahead for the next builds (`held`).
    held_sessions: usize,
}

/// `build-hook status [--json] [--last N]`.
pub fn status(d: &Dispatcher, json: bool, last: usize) -> String {
    let now = remote_lib::health::now();
    let mut ms = Vec::new();
    for m in &d.machines {
        let busy = d.load.probe(&m.uri, m.max_jobs).map(|(_, b)| b).unwrap_or(0);
        // A marker counts only while its slot (or ticket) is really held.
        let markers = |place: Place| -> Vec<Busy> {
            (0..m.max_jobs)
                .filter(|&i| match place {
                    Place::Ticket => d.load.is_held(&remote_lib::slots::ticket_name(&m.uri, i)),
                    Place::Slot => d.load.slot_held(&m.uri, i),
                })
                .filter_map(|i| std::fs::read(busy_file(&d.load, &m.uri, i, place)).ok().and_then(|t| serde_json::from_slice::<Busy>(&t).ok()))
                .collect()
        };
        let (building, queued) = (markers(Place::Slot), markers(Place::Ticket));
        let h = d.health.get(&m.uri);
        let health = if h.backing_off(now) {
            format!("backing off {} s more after {} failure(s): {}", h.retry_after - now, h.failures, h.reason)
        } else if h.failures > 0 {
            format!("{} recent failure(s): {}", h.failures, h.reason)
        } else if h.last_success > 0 {
            format!("ok, connected {} s ago", now.saturating_sub(h.last_success))
        } else {
            "not used yet".into()
        };
        ms.push(MachineStatus {
            machine: m.uri.clone(),
            slots: m.max_jobs,
            busy,
            building,
            queued,
            health,
            drained: d.drains.drained(&m.uri, now),
            held_sessions: remote_lib::held::held_now(m, &d.ssh),
        });
    }
    let (records, _) = d.history.read();
    let recent: Vec<&Record> = records.iter().rev().take(last).collect();
    if json {
        return serde_json::json!({ "machines": ms, "recent": recent }).to_string();
    }
    let mut out = String::new();
    let t = history::now();
    for m in &ms {
        let drained = match m.drained {
            Some(0) => "  DRAINED".to_string(),
            Some(u) => format!("  DRAINED for {} s", u.saturating_sub(now)),
            None => String::new(),
        };
        let held = match m.held_sessions {
            0 => String::new(),
            1 => "  (1 session opened ahead)".to_string(),
            n => format!("  ({n} sessions opened ahead)"),
        };
        out.push_str(&format!("{}  {}/{} busy{drained}  {}{held}\n", m.machine, m.busy, m.slots, m.health));
        for b in &m.building {
            out.push_str(&format!("  slot {}: {} for {:.0} s\n", b.slot, history::drv_name(&b.drv), t - b.since));
        }
        for b in &m.queued {
            out.push_str(&format!("  queued: {} for {:.0} s\n", history::drv_name(&b.drv), t - b.since));
        }
    }
    out.push_str(&format!("last {} builds:\n", recent.len()));
    for r in recent.iter().rev() {
        out.push_str(&format!("  {}\n", history_line(r)));
    }
    out
}

/// `status --watch`: redrawn every second, in place on a terminal (plain
/// successive snapshots otherwise), until interrupted.
pub fn watch(d: &Dispatcher, json: bool, last: usize) -> ! {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    loop {
        let text = status(d, json, last);
        let mut o = std::io::stdout().lock();
        // Home, clear to the end of the screen, then the snapshot.
        let _ = if tty { write!(o, "\x1b[H\x1b[J{text}") } else { writeln!(o, "{text}") };
        let _ = o.flush();
        drop(o);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn history_line(r: &Record) -> String {
    let total = r.upload_secs + r.build_secs + r.download_secs;
    let why = if r.reason.is_empty() { String::new() } else { format!("  ({})", r.reason.lines().next().unwrap_or("")) };
    format!(
        "{:<8} {:<30} {:<28} wait {:5.2}s  up {:>9} B {:5.2}s  build {:7.2}s  down {:>9} B {:5.2}s  total {:7.2}s{why}",
        r.result, r.name, r.machine, r.slot_wait, r.upload_bytes, r.upload_secs, r.build_secs, r.download_bytes, r.download_secs, total
    )
}

/// `build-hook history [--json] [--last N] [--since T]`.
pub fn history_cmd(d: &Dispatcher, json: bool, last: usize, since: f64) -> String {
    let (records, skipped) = d.history.read();
    let records: Vec<Record> = records.into_iter().filter(|r| r.start >= since).collect();
    let shown = &records[records.len().saturating_sub(last)..];
    if json {
        return shown.iter().filter_map(|r| serde_json::to_string(r).ok()).map(|l| l + "\n").collect();
    }
    let mut out: String = shown.iter().map(|r| history_line(r) + "\n").collect();
    if skipped > 0 {
        out.push_str(&format!("({skipped} unreadable line(s) skipped)\n"));
    }
    out
}

/// `build-hook history --simulate`: the recorded builds since `since`
/// replayed on the machines list under Nix's rule and the learned one.
pub fn simulate_cmd(d: &Dispatcher, since: f64) -> String {
    use remote_lib::simulate::{simulate, Arrivals, Outcome, Rule, SimMachine};
    let (records, skipped) = d.history.read();
    // Learned from the whole history (its newest records, as the hook
    // learns), replayed from `since`.
    let learned = remote_lib::learn::Learned::from_records(&records);
    let records: Vec<Record> = records.into_iter().filter(|r| r.start >= since).collect();
    let machines: Vec<SimMachine> = d.machines.iter().map(|m| SimMachine { uri: m.uri.clone(), systems: m.systems.clone(), slots: m.max_jobs, speed: m.speed_factor }).collect();
    let speeds = learned.speeds(&machines.iter().map(|m| (m.uri.as_str(), m.speed)).collect::<Vec<_>>());
    let run = |rule, arrivals| simulate(&records, &machines, &learned, rule, arrivals);
    let nix = run(Rule::Nix, Arrivals::Recorded);
    let mut out = format!(
        "replayed {} recorded build(s) on {} machine(s) with {} slot(s) from {}",
        nix.builds,
        machines.len(),
        machines.iter().map(|m| m.slots).sum::<u64>(),
        d.machines_source
    );
    if nix.skipped > 0 {
        out.push_str(&format!("; {} skipped: no machine in the list builds their system", nix.skipped));
    }
    if skipped > 0 {
        out.push_str(&format!("; {skipped} unreadable line(s) skipped"));
    }
    out.push('\n');
    if nix.builds == 0 {
        out.push_str("nothing to replay: the history has no successful build (build-hook history lists what it has)\n");
        return out;
    }
    let per = |o: &Outcome| machines.iter().zip(&o.per_machine).map(|(m, n)| format!("{} {n}", m.uri)).collect::<Vec<_>>().join(", ");
    let pct = |new: f64, old: f64| if old > 0.0 { format!("{:+.1} %", (new - old) / old * 100.0) } else { "-".into() };
    for (arrivals, what) in [(Arrivals::Recorded, "arriving as recorded"), (Arrivals::AtOnce, "all at once (a bulk build of the same derivations)")] {
        let (nix, lrn) = (run(Rule::Nix, arrivals), run(Rule::Learned, arrivals));
        out.push_str(&format!("{what}:\n"));
        out.push_str(&format!("  Nix's rule:   makespan {:>9.1} s  mean turnaround {:>8.1} s  builds: {}\n", nix.makespan, nix.mean_turnaround, per(&nix)));
        out.push_str(&format!(
            "  learned rule: makespan {:>9.1} s  mean turnaround {:>8.1} s  builds: {}  (makespan {}, turnaround {})\n",
            lrn.makespan,
            lrn.mean_turnaround,
            per(&lrn),
            pct(lrn.makespan, nix.makespan),
            pct(lrn.mean_turnaround, nix.mean_turnaround)
        ));
    }
    out.push_str("speeds of the learned rule:\n");
    for (m, s) in machines.iter().zip(&speeds) {
        out.push_str(&format!("  {}: {s}\n", m.uri));
    }
    out
}

/// An SVG timeline of `records`: one row per machine slot, one bar per
/// build attempt, coloured by phase — waiting for the slot, upload, build,
/// download (connecting and registering are the grey between them) — with a
/// red outline for an attempt that did not succeed.
pub fn timeline_svg(records: &[Record]) -> String {
    const W: f64 = 1000.0;
    const ROW: f64 = 22.0;
    const LEFT: f64 = 260.0;
    let mut rows: Vec<(String, u64)> = records.iter().map(|r| (r.machine.clone(), r.slot)).collect();
    rows.sort();
    rows.dedup();
    let t0 = records.iter().map(|r| r.start - r.slot_wait).fold(f64::INFINITY, f64::min);
    let t1 = records.iter().map(|r| r.end.max(r.start)).fold(f64::NEG_INFINITY, f64::max);
    let span = if t1 > t0 { t1 - t0 } else { 1.0 };
    let x = |t: f64| LEFT + (t - t0) / span * W;
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let height = 40.0 + ROW * rows.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"4\" y=\"14\">build-hook timeline: {} builds over {span:.1} s — wait (grey), upload (blue), build (green), download (orange)</text>\n",
        LEFT + W + 20.0,
        records.len()
    );
    for (i, (m, slot)) in rows.iter().enumerate() {
        out.push_str(&format!("<text x=\"4\" y=\"{}\">{} #{slot}</text>\n", 34.0 + ROW * i as f64 + 12.0, esc(m)));
    }
    for r in records {
        let Some(row) = rows.iter().position(|k| k.0 == r.machine && k.1 == r.slot) else { continue };
        let y = 34.0 + ROW * row as f64;
        let end = r.end.max(r.start);
        let title = esc(&format!(
            "{} on {} #{}: {} — wait {:.2}s, up {:.2}s, build {:.2}s, down {:.2}s{}",
            r.name,
            r.machine,
            r.slot,
            r.result,
            r.slot_wait,
            r.upload_secs,
            r.build_secs,
            r.download_secs,
            if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) }
        ));
        let stroke = if r.result == "built" { "none" } else { "red" };
        out.push_str(&format!("<g class=\"build\"><title>{title}</title>\n"));
        let mut seg = |class: &str, from: f64, secs: f64, colour: &str| {
            if secs > 0.0 {
                out.push_str(&format!(
                    "<rect class=\"{class}\" x=\"{:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/>\n",
                    x(from),
                    (x(from + secs) - x(from)).max(0.5),
                    ROW - 4.0
                ));
            }
        };
        seg("wait", r.start - r.slot_wait, r.slot_wait, "#ddd");
        seg("attempt", r.start, end - r.start, "#aaa");
        seg("upload", r.start, r.upload_secs, "#4a90d9");
        seg("build", end - r.download_secs - r.build_secs, r.build_secs, "#5cb85c");
        seg("download", end - r.download_secs, r.download_secs, "#f0ad4e");
        out.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"none\" stroke=\"{stroke}\"/>\n</g>\n",
            x(r.start),
            (x(end) - x(r.start)).max(0.5),
            ROW - 4.0
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// The machine a command names: its exact URI, or a text only one URI contains.
pub fn find_machine<'a>(d: &'a Dispatcher, name: &str) -> Result<&'a str, String> {
    if let Some(m) = d.machines.iter().find(|m| m.uri == name) {
        return Ok(&m.uri);
    }
    let hits: Vec<&str> = d.machines.iter().filter(|m| m.uri.contains(name)).map(|m| m.uri.as_str()).collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no machine in {} matches '{name}'; 'build-hook status' lists them", d.machines_source)),
        many => Err(format!("'{name}' matches {} machines ({}); give the whole URI", many.len(), many.join(", "))),
    }
}

/// `--until` values: `+90s`, `+30m`, `+2h`, `+1d` from now, or a Unix time.
pub fn parse_until(s: &str, now: u64) -> Result<u64, String> {
    let bad = || format!("'{s}' is not a time: give +30m, +2h, +1d (from now) or a Unix time");
    if let Some(rel) = s.strip_prefix('+') {
        let (num, unit) = rel.split_at(rel.find(|c: char| !c.is_ascii_digit()).unwrap_or(rel.len()));
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad()),
        };
        return Ok(now + n * mult);
    }
    s.parse().map_err(|_| bad())
}

/// `build-hook explain DRV`: every machine and why it would take the
/// derivation or not, and which one the hook would pick now.
pub fn explain(d: &Dispatcher, drv_path: &str) -> Result<String, String> {
    let sp = StorePath::parse(&d.local.store_dir, drv_path).map_err(|e| format!("{e}; give the .drv path, e.g. from nix-instantiate"))?;
    let drv: Derivation = d.local.read_drv(&sp).map_err(|e| remote_lib::session::chain(&e))?;
    let mut features: Vec<String> =
        drv.env.iter().find(|(k, _)| k == "requiredSystemFeatures").map(|(_, v)| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
    if drv.outputs.iter().any(|o| !o.path_known()) {
        features.push("ca-derivations".into());
    }
    let req = TryRequest { am_willing: false, needed_system: drv.platform.clone(), drv_path: drv_path.into(), required_features: features };
    let now = remote_lib::health::now();
    let mut out = format!("{drv_path}\n  system {}; required features [{}]\n", req.needed_system, req.required_features.join(","));
    let (learned, speeds) = d.learn();
    let key = (req.needed_system.clone(), history::drv_name(drv_path));
    let long = learned.is_long(&key);
    out.push_str(&match learned.expected(&key) {
        Some(e) => format!(
            "  expected build time {:.0} s on a machine of average speed (median of {} build(s) of {}): {}\n",
            e.secs,
            e.builds,
            key.1,
            if long {
                format!("long (≥ {:.0} s), so the fastest free machine is preferred", remote_lib::learn::LONG_BUILD_SECS)
            } else {
                format!("not long (< {:.0} s)", remote_lib::learn::LONG_BUILD_SECS)
            }
        ),
        None => format!("  expected build time unknown: no successful build of {} in the history\n", key.1),
    });
    let mut cands = Vec::new();
    for (i, m) in d.machines.iter().enumerate() {
        let h = d.health.get(&m.uri);
        let verdict = if let Err(why) = select::eligible(m, &req) {
            format!("no: {why}")
        } else if h.backing_off(now) {
            format!("no: backing off {} s more after {} failure(s): {}", h.retry_after - now, h.failures, h.reason)
        } else if let Some(until) = d.drains.drained(&m.uri, now) {
            if until > 0 {
                format!("no: drained for {} s more", until - now)
            } else {
                "no: drained".into()
            }
        } else {
            match d.load.probe(&m.uri, m.max_jobs) {
                Ok((Some(_), busy)) => {
                    let speed = &speeds[i];
                    cands.push(Candidate { index: i, load: busy, speed: speed.effective });
                    let here = learned.expected_on(&key, &m.uri).map(|s| format!(", expected {s:.0} s here")).unwrap_or_default();
                    format!("yes: {busy}/{} slots busy, {speed}, load/speed {:.2}{here}", m.max_jobs, busy as f64 / speed.effective)
                }
                Ok((None, busy)) => format!("not now: all {busy} slot(s) busy (it would wait, then postpone)"),
                Err(e) => format!("no: cannot probe its slots: {}", remote_lib::session::chain(&e)),
            }
        };
        out.push_str(&format!("  {}: {verdict}\n", m.uri));
    }
    let rule = if long {
        "a long build: the fastest, then lowest load/speed, then lower load, then list order"
    } else {
        "lowest load/speed, then higher speed, then lower load, then list order"
    };
    match select::best_for(&cands, long) {
        Some(b) => out.push_str(&format!("would pick now: {} ({rule})\n", d.machines[b.index].uri)),
        None => out.push_str("would pick now: none\n"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(machine: &str, slot: u64, start: f64, result: &str) -> Record {
        Record {
            machine: machine.into(),
            slot,
            start,
            end: start + 3.0,
            slot_wait: 0.5,
            upload_secs: 0.5,
            build_secs: 2.0,
            download_secs: 0.25,
            result: result.into(),
            name: format!("d{start}"),
            ..Default::default()
        }
    }

    #[test]
    fn the_timeline_has_one_bar_per_build_and_a_row_per_slot() {
        let rs = [rec("ssh://b1", 0, 10.0, "built"), rec("ssh://b1", 1, 10.5, "built"), rec("ssh://b2", 0, 11.0, "lost"), rec("ssh://b1", 0, 13.5, "built")];
        let svg = timeline_svg(&rs);
        assert_eq!(svg.matches("<g class=\"build\">").count(), 4);
        assert_eq!(svg.matches("class=\"build\" x=").count(), 4);
        assert_eq!(svg.matches(" #0</text>").count() + svg.matches(" #1</text>").count(), 3, "rows: b1#0, b1#1, b2#0");
        assert_eq!(svg.matches("stroke=\"red\"").count(), 1);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(timeline_svg(&[]).ends_with("</svg>\n"), "an empty history still makes a picture");
    }

    #[test]
    fn until_takes_relative_and_absolute_times() {
        assert_eq!(parse_until("+90", 100), Ok(190));
        assert_eq!(parse_until("+30m", 100), Ok(1900));
        assert_eq!(parse_until("+2h", 0), Ok(7200));
        assert_eq!(parse_until("+1d", 0), Ok(86400));
        assert_eq!(parse_until("1800000000", 0), Ok(1_800_000_000));
        assert!(parse_until("+2w", 0).is_err());
        assert!(parse_until("soon", 0).is_err());
    }
}
