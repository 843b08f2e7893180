//! `@nix` JSON log records (Nix's `src/libutil/logging.cc`, `handleJSONLogMessage`): the only way to show text to the user after
//! `# accept`. Pure formatting; the binary owns the writer. Every record has
//! the keys Nix requires, because a record missing one aborts the whole Nix
//! invocation.

/// Nix verbosity levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
}

/// Activity types we start.
pub const ACT_UNKNOWN: u64 = 0;

/// Escapes a string for JSON.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `@nix {"action":"msg",...}`
pub fn msg(level: Level, text: &str) -> String {
    format!("@nix {{\"action\":\"msg\",\"level\":{},\"msg\":{}}}\n", level as u32, json_string(text))
}

/// `@nix {"action":"start",...}`
pub fn start(id: u64, level: Level, activity_type: u64, text: &str) -> String {
    format!("@nix {{\"action\":\"start\",\"id\":{id},\"level\":{},\"type\":{activity_type},\"text\":{},\"fields\":[]}}\n", level as u32, json_string(text))
}

/// `@nix {"action":"stop",...}`
pub fn stop(id: u64) -> String {
    format!("@nix {{\"action\":\"stop\",\"id\":{id}}}\n")
}

/// `s` without terminal escape sequences (Nix colours store paths in its
/// messages, `ESC [ … m`): for text that is stored or printed outside Nix's
/// own log, which removes them itself when not writing to a terminal.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // parameters and intermediates, then one final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_colours_are_stripped() {
        assert_eq!(strip_ansi("cannot add path '\u{1b}[35;1m/nix/store/x-dep\u{1b}[0m' because"), "cannot add path '/nix/store/x-dep' because");
        assert_eq!(strip_ansi("plain"), "plain");
        assert_eq!(strip_ansi("cut \u{1b}[35"), "cut ");
    }

    #[test]
    fn records_are_one_line_with_required_keys() {
        let m = msg(Level::Error, "bad \"thing\"\non b1\u{1b}[0m");
        assert_eq!(m, "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"bad \\\"thing\\\"\\non b1\\u001b[0m\"}\n");
        assert_eq!(m.matches('\n').count(), 1);
        let s = start(7, Level::Info, 103, "copying");
        assert!(s.contains("\"id\":7") && s.contains("\"type\":103") && s.contains("\"text\":\"copying\""));
        assert_eq!(stop(7), "@nix {\"action\":\"stop\",\"id\":7}\n");
    }
}
