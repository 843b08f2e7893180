//! `.drv` files (ATerm text, Nix's `src/libstore/derivations.cc`) and their `BasicDerivation` form for the
//! serve protocol's `BuildDerivation`.
//!
//! Parsing is pure: the caller reads the file. Like the built-in hook we keep
//! outputs, platform, builder, args and env as they are, and when the
//! derivation has input derivations we replace `inputSrcs` with the full input
//! closure Nix sent after `# accept`.

use crate::wire;
use std::collections::BTreeMap;
use std::io::{self, Write};

/// Why a `.drv` could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DerivationError {
    #[error("{drv}: byte {offset}: expected {expected}")]
    Syntax { drv: String, offset: usize, expected: &'static str },
    #[error("{drv}: derivation format '{format}' is not supported (only plain Derive(...))")]
    Format { drv: String, format: String },
}

/// One output: `(name, path, hashAlgo, hash)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub name: String,
    pub path: String,
    pub hash_algo: String,
    pub hash: String,
}

impl Output {
    /// Floating content-addressed, deferred or impure outputs have no path
    /// until they are built.
    pub fn path_known(&self) -> bool {
        !self.path.is_empty()
    }
}

/// A parsed derivation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: Vec<Output>,
    pub input_drvs: BTreeMap<String, Vec<String>>,
    pub input_srcs: Vec<String>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    drv: &'a str,
}

impl<'a> Parser<'a> {
    fn err(&self, expected: &'static str) -> DerivationError {
        DerivationError::Syntax { drv: self.drv.to_string(), offset: self.pos, expected }
    }
    fn lit(&mut self, t: &'static str) -> Result<(), DerivationError> {
        if self.s[self.pos..].starts_with(t.as_bytes()) {
            self.pos += t.len();
            Ok(())
        } else {
            Err(self.err(t))
        }
    }
    fn peek(&self, c: u8) -> bool {
        self.s.get(self.pos) == Some(&c)
    }
    fn string(&mut self) -> Result<String, DerivationError> {
        self.lit("\"").map_err(|_| self.err("'\"' starting a string"))?;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.pos) {
                None => return Err(self.err("'\"' ending a string")),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = *self.s.get(self.pos + 1).ok_or_else(|| self.err("a character after '\\'"))?;
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        c => c,
                    });
                    self.pos += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("UTF-8 text in a string"))
    }
    fn path(&mut self) -> Result<String, DerivationError> {
        let start = self.pos;
        let s = self.string()?;
        if !s.starts_with('/') {
            self.pos = start;
            return Err(self.err("an absolute path"));
        }
        Ok(s)
    }
    /// `[item,item,...]`
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T, DerivationError>) -> Result<Vec<T>, DerivationError> {
        self.lit("[")?;
        let mut v = Vec::new();
        if self.peek(b']') {
            self.pos += 1;
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            if self.peek(b',') {
                self.pos += 1;
            } else {
                self.lit("]").map_err(|_| self.err("',' or ']'"))?;
                return Ok(v);
            }
        }
    }
}

impl Derivation {
    /// Parses the ATerm text of `drv_path`.
    pub fn parse(drv_path: &str, text: &[u8]) -> Result<Self, DerivationError> {
        let mut p = Parser { s: text, pos: 0, drv: drv_path };
        if !text.starts_with(b"Derive(") {
            let format = String::from_utf8_lossy(&text[..text.iter().position(|&c| c == b'(').unwrap_or(text.len().min(20))]).into_owned();
            return Err(DerivationError::Format { drv: drv_path.to_string(), format });
        }
        p.lit("Derive(")?;
        let outputs = p.list(|p| {
            p.lit("(")?;
            let name = p.string()?;
            p.lit(",")?;
            let path = p.string()?;
            p.lit(",")?;
            let hash_algo = p.string()?;
            p.lit(",")?;
            let hash = p.string()?;
            p.lit(")")?;
            Ok(Output { name, path, hash_algo, hash })
        })?;
        p.lit(",")?;
        let input_drvs = p
            .list(|p| {
                p.lit("(")?;
                let path = p.path()?;
                p.lit(",")?;
                let outs = p.list(|p| p.string())?;
                p.lit(")")?;
                Ok((path, outs))
            })?
            .into_iter()
            .collect();
        p.lit(",")?;
        let input_srcs = p.list(|p| p.path())?;
        p.lit(",")?;
        let platform = p.string()?;
        p.lit(",")?;
        let builder = p.string()?;
        p.lit(",")?;
        let args = p.list(|p| p.string())?;
        p.lit(",")?;
        let env = p.list(|p| {
            p.lit("(")?;
            let k = p.string()?;
            p.lit(",")?;
            let v = p.string()?;
            p.lit(")")?;
            Ok((k, v))
        })?;
        p.lit(")")?;
        if p.pos != text.len() {
            return Err(p.err("the end of the derivation"));
        }
        Ok(Derivation { outputs, input_drvs, input_srcs, platform, builder, args, env })
    }

    /// Writes the `BasicDerivation` wire form. `inputs` is the closure
    /// Nix sent after accept; it replaces `inputSrcs` when the derivation has
    /// input derivations.
    pub fn write_basic<W: Write>(&self, w: &mut W, inputs: &[String]) -> io::Result<()> {
        wire::write_u64(w, self.outputs.len() as u64)?;
        for o in &self.outputs {
            for f in [&o.name, &o.path, &o.hash_algo, &o.hash] {
                wire::write_bytes(w, f.as_bytes())?;
            }
        }
        if self.input_drvs.is_empty() {
            wire::write_strings(w, &self.input_srcs)?;
        } else {
            let mut srcs = inputs.to_vec();
            srcs.sort();
            srcs.dedup();
            wire::write_strings(w, &srcs)?;
        }
        wire::write_bytes(w, self.platform.as_bytes())?;
        wire::write_bytes(w, self.builder.as_bytes())?;
        wire::write_strings(w, &self.args)?;
        wire::write_u64(w, self.env.len() as u64)?;
        for (k, v) in &self.env {
            wire::write_bytes(w, k.as_bytes())?;
            wire::write_bytes(w, v.as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = r#"Derive([("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top","","")],[("/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-dep.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo building top; cat $dep/sub/f > $out"],[("PATH","/bin:/usr/bin"),("builder","/bin/sh"),("dep","/nix/store/86blry61wgdwbnnw978vd4h6h2wi0048-dep"),("name","top"),("nonce","vec1"),("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top"),("system","x86_64-linux")])"#;

    #[test]
    fn parses_real_drv_from_nix_2_8() {
        let d = Derivation::parse("/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top.drv", TOP.as_bytes()).unwrap();
        assert_eq!(d.outputs.len(), 1);
        assert_eq!(d.outputs[0].path, "/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top");
        assert_eq!(d.input_drvs["/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-dep.drv"], vec!["out"]);
        assert_eq!(d.platform, "x86_64-linux");
        assert_eq!(d.args[1], "echo building top; cat $dep/sub/f > $out");
        assert_eq!(d.env.len(), 7);
    }

    #[test]
    fn escapes_are_decoded() {
        let text = r#"Derive([("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-x","","")],[],[],"x86_64-linux","/bin/sh",[],[("v","q\" b\\ n\n r\r t\t u:é $x")])"#;
        let d = Derivation::parse("/nix/store/x.drv", text.as_bytes()).unwrap();
        assert_eq!(d.env[0].1, "q\" b\\ n\n r\r t\t u:é $x");
    }

    #[test]
    fn errors_name_the_drv_and_offset() {
        let err = Derivation::parse("/nix/store/a.drv", b"Derive([(\"out\"").unwrap_err();
        assert!(err.to_string().starts_with("/nix/store/a.drv: byte "), "{err}");
        let err = Derivation::parse("/nix/store/a.drv", b"DrvWithVersion(\"xp-dyn-drv\",[])").unwrap_err();
        assert!(matches!(err, DerivationError::Format { .. }), "{err}");
        let bad = TOP.replace("[],\"x86_64-linux\"", "[\"relative\"],\"x86_64-linux\"");
        assert!(Derivation::parse("/nix/store/a.drv", bad.as_bytes()).is_err());
    }

    #[test]
    fn basic_derivation_replaces_input_srcs_with_closure() {
        let d = Derivation::parse("/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top.drv", TOP.as_bytes()).unwrap();
        let mut out = Vec::new();
        d.write_basic(&mut out, &["/nix/store/86blry61wgdwbnnw978vd4h6h2wi0048-dep".into()]).unwrap();
        let r = &mut &out[..];
        assert_eq!(wire::read_u64(r, "n").unwrap(), 1);
        for want in ["out", "/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top", "", ""] {
            assert_eq!(wire::read_string(r, 1000, "f").unwrap(), want);
        }
        assert_eq!(wire::read_strings(r, 1000, "srcs").unwrap(), vec!["/nix/store/86blry61wgdwbnnw978vd4h6h2wi0048-dep"]);
        assert_eq!(wire::read_string(r, 1000, "p").unwrap(), "x86_64-linux");
        assert_eq!(wire::read_string(r, 1000, "b").unwrap(), "/bin/sh");
        assert_eq!(wire::read_strings(r, 1000, "a").unwrap().len(), 2);
        assert_eq!(wire::read_u64(r, "env").unwrap(), 7);
    }
}
