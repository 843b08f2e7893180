//! The machines list (Nix's `src/libstore/machines.cc`): the `builders` setting, `@file` includes, the Nix
//! 2.x eight-column format (with the base64 host key) and the Nix 1.x
//! `remote-systems.conf` forms it grew from.
//!
//! Parsing is pure: files are read through a caller-supplied loader. A bad
//! entry becomes a [`Diagnostic`] naming `file:line:column`, the column's name
//! and a hint, and is skipped; the other machines stay usable. Entries are
//! split the way Nix 2.29+ does it (per line; `#` comments end at the
//! newline; `;` separates entries; blank and indented lines are fine), which
//! accepts everything older Nix accepted apart from its crash on blank lines.

use base64::Engine;
use std::fmt;

/// One usable builder.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    /// The store URI as Nix would print it (`ssh://` added when missing).
    pub uri: String,
    pub ssh: SshTarget,
    pub systems: Vec<String>,
    pub ssh_key: Option<String>,
    pub max_jobs: u64,
    pub speed_factor: f64,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    /// Decoded public host key: one `known_hosts` key, `<type> <base64>`.
    pub host_key: Option<String>,
    /// Where the entry was written.
    pub origin: Location,
}

/// How to reach a machine: over ssh, or (`ssh://localhost`, and stores on
/// this host such as a path, `local`, `auto` or `daemon`) by running
/// `nix-store --serve` here, as Nix does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    /// `[user@]host`, as given to `ssh` (`localhost`: no ssh).
    pub host: String,
    pub port: Option<u16>,
    /// `remote-program` (default `nix-store`; `nix-daemon` for `ssh-ng://`).
    pub remote_program: String,
    /// `remote-store`, passed as `--store` on the builder.
    pub remote_store: Option<String>,
    /// The machine is a store on this host, named by the URI itself.
    pub local_store: bool,
    /// `ssh-ng://`: the builder runs `<remote-program> --stdio` (default
    /// `nix-daemon`) and speaks the daemon protocol.
    pub daemon: bool,
    /// `compress=true`: ssh compresses the connection (`Compression=yes`).
    pub compress: bool,
}

/// What a store URI says besides how to reach the machine: `ssh-key=` and
/// `base64-ssh-public-host-key=`, used when columns 3 and 8 leave them out
/// (the columns win, as in Nix).
#[derive(Default)]
struct UriKeys {
    ssh_key: Option<String>,
    host_key: Option<String>,
}

/// A place in a machines list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The entry was skipped.
    Error,
    /// The entry is used, perhaps not as written.
    Warning,
    /// Worth knowing when checking the list, not on every build (Nix says
    /// nothing): a machines file that does not exist.
    Note,
}

/// A problem found in a machines list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub at: Location,
    /// The column's name, e.g. "max jobs (column 4)".
    pub field: &'static str,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        };
        write!(f, "{}: {sev}: {}: {}\n  hint: {}", self.at, self.field, self.message, self.hint)
    }
}

/// The result of parsing: the machines that are usable and what was wrong.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    pub machines: Vec<Machine>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads an `@file`: `Ok(None)` when it does not exist (Nix ignores those).
pub type Loader<'a> = dyn FnMut(&str) -> std::io::Result<Option<String>> + 'a;

const FIELDS: [&str; 8] = [
    "store URI (column 1)",
    "system types (column 2)",
    "ssh identity file (column 3)",
    "max jobs (column 4)",
    "speed factor (column 5)",
    "supported features (column 6)",
    "mandatory features (column 7)",
    "public host key (column 8)",
];

const MAX_INCLUDE_DEPTH: usize = 16;
/// Files read through `@file` in one parse at most: a file that includes
/// another several times must not multiply the reads.
const MAX_INCLUDE_READS: usize = 64;

/// The includes of one parse: the files being read now (to find cycles) and
/// how many were read in all.
#[derive(Default)]
struct Includes {
    stack: Vec<String>,
    reads: usize,
}

/// Parses the `builders` setting (or a machines file's text) named `source`.
pub fn parse(text: &str, source: &str, local_system: &str, loader: &mut Loader) -> Parsed {
    let mut out = Parsed::default();
    parse_into(text, source, local_system, loader, &mut out, &mut Includes::default());
    out
}

fn parse_into(text: &str, source: &str, local_system: &str, loader: &mut Loader, out: &mut Parsed, inc: &mut Includes) {
    for (lineno, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let content = match line.find('#') {
            Some(i) => &line[..i],
            None => line,
        };
        let mut offset = 0;
        for entry in content.split(';') {
            let start = offset;
            offset += entry.len() + 1;
            let trimmed = entry.trim_start();
            let col = start + (entry.len() - trimmed.len()) + 1;
            let trimmed = trimmed.trim_end();
            if trimmed.is_empty() {
                continue;
            }
            let at = Location { file: source.to_string(), line: lineno + 1, column: col };
            if let Some(path) = trimmed.strip_prefix('@') {
                include(path.trim(), at, local_system, loader, out, inc);
            } else if let Some(m) = parse_entry(trimmed, &at, local_system, &mut out.diagnostics) {
                out.machines.push(m);
            }
        }
    }
}

fn include(path: &str, at: Location, local_system: &str, loader: &mut Loader, out: &mut Parsed, inc: &mut Includes) {
    let diag = |message: String, hint: String| Diagnostic { severity: Severity::Error, at: at.clone(), field: "@file include", message, hint };
    if !path.starts_with('/') {
        out.diagnostics.push(diag(
            format!("machines file path '{path}' is relative; Nix runs the hook in '/', so it would be read as '/{path}'"),
            "write the absolute path, e.g. '@/etc/nix/machines'".into(),
        ));
        return;
    }
    if inc.stack.iter().any(|p| p == path) {
        out.diagnostics.push(diag(format!("'@{path}' includes itself (through {})", inc.stack.join(" → ")), "remove the include that leads back to this file".into()));
        return;
    }
    if inc.stack.len() >= MAX_INCLUDE_DEPTH {
        out.diagnostics.push(diag(format!("'@{path}' is nested more than {MAX_INCLUDE_DEPTH} includes deep"), "flatten the chain of machines files".into()));
        return;
    }
    if inc.reads >= MAX_INCLUDE_READS {
        out.diagnostics
            .push(diag(format!("'@{path}' is one include too many: the machines list already read {MAX_INCLUDE_READS} files"), "include each machines file once".into()));
        return;
    }
    inc.reads += 1;
    match loader(path) {
        Ok(Some(text)) => {
            inc.stack.push(path.to_string());
            parse_into(&text, path, local_system, loader, out, inc);
            inc.stack.pop();
        }
        Ok(None) => out.diagnostics.push(Diagnostic {
            severity: Severity::Note,
            ..diag(format!("machines file '{path}' does not exist; it adds no machines"), "create it, or remove the reference (Nix ignores a missing file silently)".into())
        }),
        Err(e) => out.diagnostics.push(diag(
            format!("cannot read machines file '{path}': {e}"),
            "check the file's permissions: the hook runs as the user that runs the build (root under nix-daemon)".into(),
        )),
    }
}

/// Splits a line into fields separated by runs of blanks, with the 1-based
/// column of each.
fn fields(line: &str) -> Vec<(usize, &str)> {
    let mut v = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        let blank = c == ' ' || c == '\t' || c == '\r';
        match (blank, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                v.push((s, &line[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        v.push((s, &line[s..]));
    }
    v
}

fn is_set(f: Option<&(usize, &str)>) -> Option<(usize, String)> {
    f.filter(|(_, s)| !s.is_empty() && *s != "-").map(|(c, s)| (*c, s.to_string()))
}

fn comma_list(s: &str) -> Vec<String> {
    s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect()
}

fn parse_entry(entry: &str, at: &Location, local_system: &str, diags: &mut Vec<Diagnostic>) -> Option<Machine> {
    let fs = fields(entry);
    let loc = |i: usize| Location { column: at.column + fs.get(i).map(|f| f.0).unwrap_or(0), ..at.clone() };
    let mut err = |i: usize, message: String, hint: &str| {
        diags.push(Diagnostic { severity: Severity::Error, at: loc(i), field: FIELDS[i], message, hint: hint.to_string() });
        None::<Machine>
    };
    let Some((_, raw_uri)) = is_set(fs.first()) else {
        return err(0, "the store URI is missing or '-'".into(), "start the entry with the builder, e.g. 'ssh://user@host'");
    };
    let uri = normalise_uri(&raw_uri);
    let (ssh, keys) = match parse_store_uri(&uri) {
        Ok(t) => t,
        Err(UriProblem::Scheme(scheme, hint)) => {
            diags.push(Diagnostic {
                severity: Severity::Error,
                at: loc(0),
                field: FIELDS[0],
                message: format!("'{uri}' is a store of type '{scheme}', which build-hook cannot build on; this machine is skipped"),
                hint: hint.into(),
            });
            return None;
        }
        Err(UriProblem::Bad(why)) => return err(0, format!("'{uri}' is not a usable ssh URI: {why}"), "write it as ssh://[user@]host[:port]"),
    };
    let systems = is_set(fs.get(1)).map(|(_, s)| comma_list(&s)).unwrap_or_else(|| vec![local_system.to_string()]);
    let ssh_key = match is_set(fs.get(2)).or_else(|| keys.ssh_key.map(|k| (0, k))) {
        Some((_, k)) if !k.starts_with('/') => {
            return err(
                2,
                format!("ssh key path '{k}' is relative; the hook runs in '/', so it would be read as '/{k}'"),
                "write the absolute path of the private key, e.g. '/root/.ssh/id_ed25519'",
            )
        }
        Some((_, k)) => Some(k),
        None => None,
    };
    let max_jobs = match is_set(fs.get(3)) {
        Some((_, s)) => match s.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return err(3, format!("'{s}' is not a whole number"), "write how many builds may run at once on this machine, e.g. 4"),
        },
        None => 1,
    };
    let speed_factor = match is_set(fs.get(4)) {
        Some((_, s)) => match s.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => f,
            Ok(0.0) => 1.0,
            _ => return err(4, format!("'{s}' is not a number >= 0"), "write a positive number such as 1 or 2.5; faster machines get higher numbers"),
        },
        None => 1.0,
    };
    let supported_features = is_set(fs.get(5)).map(|(_, s)| comma_list(&s)).unwrap_or_default();
    let mandatory_features = is_set(fs.get(6)).map(|(_, s)| comma_list(&s)).unwrap_or_default();
    let host_key = match is_set(fs.get(7)).or_else(|| keys.host_key.map(|k| (0, k))) {
        Some((_, b64)) => match decode_host_key(&b64) {
            Some(k) => Some(k),
            None => {
                return err(
                    7,
                    format!("'{}' is not the base64 of a known_hosts key line ('<type> <key>')", shorten(&b64)),
                    "produce it with: base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub (run on the builder)",
                )
            }
        },
        None => None,
    };
    if fs.len() > 8 {
        diags.push(Diagnostic {
            severity: Severity::Warning,
            at: loc(8),
            field: "extra column",
            message: format!("{} columns found, only 8 are used; the rest is ignored", fs.len()),
            hint: "separate machines with a newline or ';'".into(),
        });
    }
    let mut ssh = ssh;
    if ssh.local_store {
        ssh.remote_store = Some(with_system_features(&uri, &supported_features, &mandatory_features));
    }
    Some(Machine { uri, ssh, systems, ssh_key, max_jobs, speed_factor, supported_features, mandatory_features, host_key, origin: at.clone() })
}

/// A store on this host builds what its `system-features` allow: as Nix
/// opens a builder's store, the machine's features become that setting,
/// unless the URI sets it.
fn with_system_features(uri: &str, supported: &[String], mandatory: &[String]) -> String {
    let (_, query) = uri.split_once('?').unwrap_or((uri, ""));
    if query.split('&').any(|kv| kv.split_once('=').map_or(kv, |(k, _)| k) == "system-features") {
        return uri.to_string();
    }
    let features: Vec<String> = supported.iter().chain(mandatory).map(|f| percent_escape_query(f)).collect();
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}system-features={}", features.join("%20"))
}

fn percent_escape_query(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

fn shorten(s: &str) -> String {
    if s.len() > 40 {
        format!("{}…", &s[..s.char_indices().nth(40).map(|x| x.0).unwrap_or(s.len())])
    } else {
        s.to_string()
    }
}

fn decode_host_key(b64: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split_whitespace();
    let (ty, key) = (parts.next()?, parts.next()?);
    let ok = |s: &str| s.bytes().all(|c| c.is_ascii_alphanumeric() || b"+/=-@.".contains(&c));
    if !ok(ty) || !ok(key) {
        return None;
    }
    Some(format!("{ty} {key}"))
}

/// Adds `ssh://` when the text is not clearly a store URI (Nix 2.4+ rule).
pub fn normalise_uri(s: &str) -> String {
    let keep = s.contains("://") || s.contains('/') || ["auto", "daemon", "local"].contains(&s) || ["auto?", "daemon?", "local?", "?"].iter().any(|p| s.starts_with(p));
    if keep {
        s.to_string()
    } else {
        format!("ssh://{s}")
    }
}

enum UriProblem {
    /// A store type we cannot build on, and what to do.
    Scheme(String, &'static str),
    Bad(String),
}

/// The store types on this host that can build (Nix's local and daemon
/// stores, whose files are on this machine's disk): `nix-store --serve
/// --store URI` run here reaches them.
pub fn is_local_store_uri(uri: &str) -> bool {
    let base = uri.split_once('?').map_or(uri, |(b, _)| b);
    base.starts_with('/') || ["", "local", "auto", "daemon"].contains(&base) || base.starts_with("unix://") || base.starts_with("local://")
}

fn parse_store_uri(uri: &str) -> Result<(SshTarget, UriKeys), UriProblem> {
    if is_local_store_uri(uri) {
        let t = SshTarget {
            host: "localhost".into(),
            port: None,
            remote_program: "nix-store".into(),
            remote_store: Some(uri.to_string()),
            local_store: true,
            daemon: false,
            compress: false,
        };
        return Ok((t, UriKeys::default()));
    }
    let (daemon, rest) = match (uri.strip_prefix("ssh://"), uri.strip_prefix("ssh-ng://")) {
        (Some(r), _) => (false, Some(r)),
        (None, Some(r)) => (true, Some(r)),
        _ => (false, None),
    };
    let Some(rest) = rest else {
        let scheme = uri.split_once("://").map_or(uri, |(s, _)| s);
        let hint = match scheme {
            "file" | "http" | "https" | "s3" => "a binary cache cannot build; list it in 'substituters' instead",
            _ => "use an ssh:// URI, a path or 'local'/'auto'/'daemon' for this builder",
        };
        return Err(UriProblem::Scheme(scheme.to_string(), hint));
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let program = if daemon { "nix-daemon" } else { "nix-store" };
    let mut t = SshTarget { host: String::new(), port: None, remote_program: program.into(), remote_store: None, local_store: false, daemon, compress: false };
    let mut keys = UriKeys::default();
    let (user_host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
            (h, Some(p.parse::<u16>().map_err(|_| UriProblem::Bad(format!("port '{p}' is out of range")))?))
        }
        _ => (authority, None),
    };
    // The host goes to ssh as one argv word; refuse anything ssh could read as an option.
    if user_host.is_empty() || user_host.starts_with('-') || !user_host.bytes().all(|c| c.is_ascii_alphanumeric() || b"@._-[]:%".contains(&c)) {
        return Err(UriProblem::Bad(format!("host '{user_host}' has characters that are not allowed in a host name")));
    }
    t.host = user_host.to_string();
    t.port = port;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        match k {
            "remote-program" => t.remote_program = v,
            "remote-store" => t.remote_store = Some(v),
            "ssh-key" => keys.ssh_key = Some(v),
            "base64-ssh-public-host-key" => keys.host_key = Some(v),
            "compress" => t.compress = v == "true",
            _ => {}
        }
    }
    Ok((t, keys))
}

fn percent_decode(s: &str) -> String {
    // On bytes: a '%' may be followed by a multi-byte character.
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits `NIX_REMOTE_SYSTEMS` (a `:`-separated list of files) into the
/// `builders` text it stands for, one `@file` per line. Nix ≤2.23 joined the
/// parts with a space, which made `a:b` one missing file; we do not.
pub fn remote_systems_to_builders(var: &str) -> String {
    var.split(':').filter(|p| !p.is_empty()).map(|p| format!("@{p}")).collect::<Vec<_>>().join("\n")
}

/// Parses one entry that must be clean (for other modules' tests).
#[cfg(test)]
pub(crate) fn test_machine(line: &str) -> Machine {
    let p = parse(line, "t", "x86_64-linux", &mut |_: &str| Ok(None));
    assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
    p.machines.into_iter().next().expect("one machine")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(text: &str, files: &[(&str, &str)]) -> Parsed {
        let files: HashMap<String, String> = files.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        parse(text, "builders", "x86_64-linux", &mut |p: &str| Ok(files.get(p).cloned()))
    }

    const KEY_B64: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUw3T3V4NTJQWkJjSTNZTDJxOTZpbjNLcEZNVGVvZ2VYYmNTVHVGTkFFc0cK";

    #[test]
    fn full_eight_column_entry() {
        let p = run(&format!("ssh://root@b1 x86_64-linux,i686-linux /root/.ssh/id 4 2.5 kvm,big-parallel kvm {KEY_B64}"), &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let m = &p.machines[0];
        assert_eq!(m.uri, "ssh://root@b1");
        assert_eq!(m.ssh.host, "root@b1");
        assert_eq!(m.systems, vec!["x86_64-linux", "i686-linux"]);
        assert_eq!(m.ssh_key.as_deref(), Some("/root/.ssh/id"));
        assert_eq!((m.max_jobs, m.speed_factor), (4, 2.5));
        assert_eq!(m.supported_features, vec!["kvm", "big-parallel"]);
        assert_eq!(m.mandatory_features, vec!["kvm"]);
        assert!(m.host_key.as_deref().unwrap().starts_with("ssh-ed25519 AAAAC3"));
    }

    #[test]
    fn defaults_placeholders_and_separators() {
        let p = run("b1;b2 - - - 0\n\n   # indented comment\n  b3\t-\t-\t3 ; # trailing\nuser@b4:2222", &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let uris: Vec<_> = p.machines.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(uris, ["ssh://b1", "ssh://b2", "ssh://b3", "ssh://user@b4:2222"]);
        assert_eq!(p.machines[0].systems, vec!["x86_64-linux"]);
        assert_eq!((p.machines[1].max_jobs, p.machines[1].speed_factor), (1, 1.0));
        assert_eq!(p.machines[2].max_jobs, 3);
        assert_eq!(p.machines[3].ssh.port, Some(2222));
        assert_eq!(p.machines[3].ssh.host, "user@b4");
        assert_eq!(p.machines[2].origin, Location { file: "builders".into(), line: 4, column: 3 });
    }

    #[test]
    fn nix_1x_remote_systems_conf_lines() {
        // Nix 1.x manual form: user@host systems key maxjobs [speed [features [mandatory]]].
        let p = run("nix@mac x86_64-darwin /root/.ssh/id_mac 2\nnix@big i686-linux,x86_64-linux /root/.ssh/id 8 2 kvm", &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        assert_eq!(p.machines[0].uri, "ssh://nix@mac");
        assert_eq!(p.machines[1].supported_features, vec!["kvm"]);
        assert_eq!(remote_systems_to_builders("/a:/b"), "@/a\n@/b");
    }

    #[test]
    fn bad_entries_are_located_named_and_skipped() {
        let p = run("good\nb2 x86_64-linux - lots\nb3 x86_64-linux - 1 -2\nb4 - - - - - - !!notbase64\nb5 - key/id", &[]);
        assert_eq!(p.machines.len(), 1);
        let d: Vec<_> = p.diagnostics.iter().map(|d| (d.at.line, d.at.column, d.field)).collect();
        assert_eq!(d, [(2, 19, FIELDS[3]), (3, 21, FIELDS[4]), (4, 16, FIELDS[7]), (5, 6, FIELDS[2])]);
        let text = p.diagnostics[0].to_string();
        assert!(text.starts_with("builders:2:19: error: max jobs (column 4): 'lots' is not a whole number"), "{text}");
        assert!(text.contains("hint: "), "{text}");
        assert!(p.diagnostics[3].message.contains("would be read as '/key/id'"));
    }

    #[test]
    fn percent_decoding_never_splits_a_character() {
        let m = parse("ssh://b1?remote-program=%aé - - 1 1", "t", "x86_64-linux", &mut |_| Ok(None));
        assert_eq!(m.machines.len(), 1, "{:?}", m.diagnostics);
        assert_eq!(m.machines[0].ssh.remote_program, "%aé");
        let m = parse("ssh://b1?remote-program=%2Fnix%2fstore%20x%", "t", "x86_64-linux", &mut |_| Ok(None));
        assert_eq!(m.machines[0].ssh.remote_program, "/nix/store x%");
    }

    #[test]
    fn include_cycles_and_fan_out_are_bounded() {
        let mut reads = 0;
        let mut loader = |p: &str| {
            reads += 1;
            Ok(Some(match p {
                "/self" => "@/self\n@/self\n@/self\nb1 x86_64-linux".to_string(),
                _ => (0..10).map(|_| "@/self\n").collect(),
            }))
        };
        let m = parse("@/fan", "t", "x86_64-linux", &mut loader);
        assert!(reads <= MAX_INCLUDE_READS, "{reads} reads");
        assert!(m.diagnostics.iter().any(|d| d.message.contains("includes itself")), "{:?}", m.diagnostics);
        let cycle = m.diagnostics.iter().find(|d| d.message.contains("includes itself")).unwrap();
        assert_eq!((cycle.at.file.as_str(), cycle.at.line), ("/self", 1));
    }

    #[test]
    fn includes_relative_missing_and_nested() {
        let p = run("@/etc/nix/machines\n@machines\n@/missing", &[("/etc/nix/machines", "# c\nb1 - - 2\n@/etc/nix/more"), ("/etc/nix/more", "b2")]);
        let uris: Vec<_> = p.machines.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(uris, ["ssh://b1", "ssh://b2"]);
        assert_eq!(p.machines[1].origin.file, "/etc/nix/more");
        assert_eq!(p.diagnostics.len(), 2);
        assert!(p.diagnostics[0].message.contains("relative") && p.diagnostics[0].message.contains("'/machines'"));
        assert_eq!(p.diagnostics[1].severity, Severity::Note, "a missing file is only worth a note, as Nix says nothing");
        let looped = run("@/a", &[("/a", "@/a")]);
        assert!(looped.diagnostics[0].message.contains("includes itself"), "{:?}", looped.diagnostics);
        let chain: Vec<(String, String)> = (0..20).map(|i| (format!("/c{i}"), format!("@/c{}", i + 1))).collect();
        let chain: Vec<(&str, &str)> = chain.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert!(run("@/c0", &chain).diagnostics[0].message.contains("nested"));
    }

    #[test]
    fn uri_normalisation_matches_nix_2_4() {
        assert_eq!(normalise_uri("hostA"), "ssh://hostA");
        assert_eq!(normalise_uri("user@hostA:2222"), "ssh://user@hostA:2222");
        assert_eq!(normalise_uri("remote"), "ssh://remote");
        for keep in ["ssh-ng://h", "local", "daemon", "/some/path", "auto?foo=1", "?x=y"] {
            assert_eq!(normalise_uri(keep), keep);
        }
    }

    #[test]
    fn non_ssh_schemes_and_hostile_hosts_are_refused() {
        let p = run("s3://bucket\nfile:///tmp/cache\nssh://-oProxyCommand=x\nssh-ng://b$(id)", &[]);
        assert!(p.machines.is_empty());
        assert_eq!(p.diagnostics.len(), 4);
        assert!(p.diagnostics[0].message.contains("type 's3'"), "{}", p.diagnostics[0]);
        assert!(p.diagnostics[1].hint.contains("binary cache cannot build"), "{}", p.diagnostics[1]);
    }

    #[test]
    fn stores_on_this_host_build_through_a_local_nix_store_serve() {
        let p = run("/tmp/m2 - - 1 1 bar\nlocal?root=/r - - 1 1 a,b c\nauto - - 1 1\ndaemon\n/tmp/m3?system-features=x - - 1 1 bar", &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let stores: Vec<_> = p.machines.iter().map(|m| (m.ssh.host.as_str(), m.ssh.local_store, m.ssh.remote_store.clone().unwrap_or_default())).collect();
        assert_eq!(
            stores,
            [
                ("localhost", true, "/tmp/m2?system-features=bar".to_string()),
                ("localhost", true, "local?root=/r&system-features=a%20b%20c".to_string()),
                ("localhost", true, "auto?system-features=".to_string()),
                ("localhost", true, "daemon?system-features=".to_string()),
                ("localhost", true, "/tmp/m3?system-features=x".to_string()),
            ]
        );
        assert_eq!(p.machines[0].uri, "/tmp/m2", "the machine keeps the name it was given");
    }

    #[test]
    fn the_shipped_example_file_parses_cleanly() {
        let text = include_str!("../../machines.conf.example");
        let p = run(text, &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        assert_eq!(p.machines.len(), 3);
        assert_eq!(p.machines[1].ssh.port, Some(2222));
        assert_eq!(p.machines[0].speed_factor, 2.0);
        assert!(p.machines[0].host_key.is_some());
        assert_eq!(p.machines[2].mandatory_features, vec!["benchmark"]);
    }

    #[test]
    fn ssh_ng_machines_run_the_daemon() {
        let p = run("ssh-ng://u@b1:2222?remote-store=local%3Froot%3D%2Fs - - 2\nssh-ng://b2?remote-program=/opt/nix/bin/nix-daemon", &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let (a, b) = (&p.machines[0].ssh, &p.machines[1].ssh);
        assert!(a.daemon && b.daemon);
        assert_eq!((a.host.as_str(), a.port, a.remote_program.as_str(), a.remote_store.as_deref()), ("u@b1", Some(2222), "nix-daemon", Some("local?root=/s")));
        assert_eq!(b.remote_program, "/opt/nix/bin/nix-daemon");
        assert!(!run("ssh://b1", &[]).machines[0].ssh.daemon);
    }

    #[test]
    fn ssh_key_host_key_and_compress_can_come_from_the_uri() {
        let p = run(&format!("ssh://b1?ssh-key=%2Froot%2Fk&base64-ssh-public-host-key={KEY_B64}&compress=true"), &[]);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let m = &p.machines[0];
        assert_eq!(m.ssh_key.as_deref(), Some("/root/k"));
        assert!(m.host_key.as_deref().is_some_and(|k| k.starts_with("ssh-ed25519 ")));
        assert!(m.ssh.compress);
        // the columns win
        let p = run("ssh://b1?ssh-key=%2Froot%2Fk - /etc/other 1", &[]);
        assert_eq!(p.machines[0].ssh_key.as_deref(), Some("/etc/other"));
        assert!(!p.machines[0].ssh.compress);
        // checked like the columns
        assert!(!run("ssh://b1?ssh-key=rel", &[]).diagnostics.is_empty());
    }

    #[test]
    fn uri_parameters_are_read() {
        let p = run("ssh://b1?remote-program=/usr/bin/nix-store&remote-store=local%3Froot%3D%2Ftmp%2Fs&compress=true", &[]);
        let t = &p.machines[0].ssh;
        assert_eq!(t.remote_program, "/usr/bin/nix-store");
        assert_eq!(t.remote_store.as_deref(), Some("local?root=/tmp/s"));
    }
}
