//! nix.conf as Nix reads it, for the settings the hook needs when Nix does
//! not send them (Lix 2.92+ sends only overridden settings): `name = value`
//! lines, `#` comments, the last value wins, `extra-NAME` appends to NAME,
//! `include PATH` and `!include PATH` (which ignores a missing file;
//! relative paths are relative to the including file's directory). Files
//! are read through a loader the caller supplies; includes are bounded in
//! depth and count, and cycles are reported.

use std::collections::BTreeMap;

/// A problem in a nix.conf, with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// The settings read, and what was wrong on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NixConf {
    pub settings: BTreeMap<String, String>,
    pub diagnostics: Vec<Diagnostic>,
}

impl NixConf {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.settings.get(name).map(String::as_str)
    }
}

/// Reads a file's text (`Ok(None)`: it does not exist).
pub type Loader<'a> = dyn FnMut(&str) -> std::io::Result<Option<String>> + 'a;

const MAX_DEPTH: usize = 16;
const MAX_READS: usize = 64;

/// Parses the nix.conf `text` read from `source`.
pub fn parse(text: &str, source: &str, loader: &mut Loader) -> NixConf {
    let mut conf = NixConf::default();
    let mut stack = vec![source.to_string()];
    let mut reads = 0;
    parse_into(text, source, loader, &mut conf, &mut stack, &mut reads);
    conf
}

fn parse_into(text: &str, source: &str, loader: &mut Loader, conf: &mut NixConf, stack: &mut Vec<String>, reads: &mut usize) {
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let diag = |message: String| Diagnostic { file: source.to_string(), line: n + 1, message };
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(&kw @ ("include" | "!include")), Some(path)) = (words.first(), words.get(1)) {
            if words.len() != 2 {
                conf.diagnostics.push(diag(format!("'{kw}' takes one path; write '{kw} /etc/nix/other.conf'")));
                continue;
            }
            let path = if path.starts_with('/') {
                path.to_string()
            } else {
                let dir = source.rsplit_once('/').map(|(d, _)| d).unwrap_or(".");
                format!("{dir}/{path}")
            };
            if stack.contains(&path) {
                conf.diagnostics.push(diag(format!("'{path}' includes itself (through {}); the include is skipped", stack.join(" → "))));
                continue;
            }
            if stack.len() > MAX_DEPTH || *reads >= MAX_READS {
                conf.diagnostics.push(diag(format!("'{path}' is skipped: more than {MAX_DEPTH} includes deep or {MAX_READS} files read")));
                continue;
            }
            *reads += 1;
            match loader(&path) {
                Ok(Some(t)) => {
                    stack.push(path.clone());
                    parse_into(&t, &path, loader, conf, stack, reads);
                    stack.pop();
                }
                Ok(None) if kw == "!include" => {}
                Ok(None) => conf.diagnostics.push(diag(format!("included file '{path}' does not exist (use '!include' for an optional file)"))),
                Err(e) => conf.diagnostics.push(diag(format!("cannot read included file '{path}': {e}"))),
            }
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            conf.diagnostics.push(diag(format!("'{line}' is not 'name = value'; Nix refuses this line too")));
            continue;
        };
        let (name, value) = (name.trim(), value.split_whitespace().collect::<Vec<_>>().join(" "));
        if name.is_empty() || name.contains(char::is_whitespace) {
            conf.diagnostics.push(diag(format!("'{line}' has no setting name before '='")));
            continue;
        }
        match name.strip_prefix("extra-") {
            Some(base) => {
                let e = conf.settings.entry(base.to_string()).or_default();
                if !e.is_empty() && !value.is_empty() {
                    e.push(' ');
                }
                e.push_str(&value);
            }
            None => {
                conf.settings.insert(name.to_string(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files<'a>(fs: &'a [(&'static str, &'static str)]) -> impl FnMut(&str) -> std::io::Result<Option<String>> + 'a {
        move |p| Ok(fs.iter().find(|(n, _)| *n == p).map(|(_, t)| t.to_string()))
    }

    #[test]
    fn last_value_wins_and_extra_appends() {
        let c = parse("builders = @/a\n# c\nbuilders = @/b # note\nextra-builders = @/c\nmax-jobs=4\n", "/etc/nix/nix.conf", &mut files(&[]));
        assert_eq!(c.get("builders"), Some("@/b @/c"));
        assert_eq!(c.get("max-jobs"), Some("4"));
        assert!(c.diagnostics.is_empty());
    }

    #[test]
    fn includes_relative_optional_and_cyclic() {
        let fs = [("/etc/nix/more.conf", "builders = @/m\ninclude more.conf\n"), ("/etc/nix/x/y.conf", "system-features = kvm")];
        let c = parse("include more.conf\n!include /nope\ninclude /missing\ninclude x/y.conf\n", "/etc/nix/nix.conf", &mut files(&fs));
        assert_eq!(c.get("builders"), Some("@/m"));
        assert_eq!(c.get("system-features"), Some("kvm"));
        let msgs: Vec<String> = c.diagnostics.iter().map(|d| d.to_string()).collect();
        assert!(msgs.iter().any(|m| m.starts_with("/etc/nix/more.conf:2:") && m.contains("includes itself")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("/etc/nix/nix.conf:3:") && m.contains("does not exist")), "{msgs:?}");
        assert_eq!(msgs.len(), 2, "{msgs:?}");
    }

    #[test]
    fn bad_lines_are_named() {
        let c = parse("builders\n= x\ninclude a b\n", "/n.conf", &mut files(&[]));
        assert_eq!(c.diagnostics.iter().map(|d| d.line).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn fan_out_is_bounded() {
        let mut reads = 0;
        let mut l = |_: &str| {
            reads += 1;
            Ok(Some("include /a\ninclude /b\n".to_string()))
        };
        let _ = parse("include /a\ninclude /b\n", "/n.conf", &mut l);
        assert!(reads <= MAX_READS);
    }
}
