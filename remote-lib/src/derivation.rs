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

/// What a derivation's outputs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Paths known from the inputs (the usual kind).
    InputAddressed,
    /// Paths fixed by declared hashes.
    Fixed,
    /// Content-addressed, paths known only after the build (`__contentAddressed`).
    Floating,
    /// Anything else (deferred or impure outputs): not built remotely.
    Other,
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
        // The closing quote first, so the text is allocated once at its size
        // (a `.drv` can list tens of thousands of paths, twice).
        let start = self.pos;
        let mut end = start;
        let mut escaped = false;
        loop {
            match self.s.get(end) {
                None => {
                    self.pos = end;
                    return Err(self.err("'\"' ending a string"));
                }
                Some(b'"') => break,
                Some(b'\\') => {
                    if end + 1 >= self.s.len() {
                        self.pos = end;
                        return Err(self.err("a character after '\\'"));
                    }
                    escaped = true;
                    end += 2;
                }
                Some(_) => end += 1,
            }
        }
        let raw = &self.s[start..end];
        let out = if escaped {
            let mut out = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                if raw[i] == b'\\' {
                    out.push(match raw[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        c => c,
                    });
                    i += 2;
                } else {
                    out.push(raw[i]);
                    i += 1;
                }
            }
            out
        } else {
            raw.to_vec()
        };
        self.pos = end + 1;
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
                v.shrink_to_fit();
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

    /// The kind of the derivation's outputs (all outputs are of one kind).
    pub fn kind(&self) -> Kind {
        let all = |f: &dyn Fn(&Output) -> bool| !self.outputs.is_empty() && self.outputs.iter().all(f);
        if all(&|o| o.path_known() && o.hash_algo.is_empty() && o.hash.is_empty()) {
            Kind::InputAddressed
        } else if all(&|o| o.path_known() && !o.hash_algo.is_empty() && !o.hash.is_empty()) {
            Kind::Fixed
        } else if all(&|o| !o.path_known() && !o.hash_algo.is_empty() && o.hash.is_empty() && o.hash_algo != "impure") {
            Kind::Floating
        } else {
            Kind::Other
        }
    }

    /// The derivation's name (the `.drv` path's name without `.drv`).
    pub fn name_of(drv_path: &str) -> &str {
        let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
        let name = base.split_once('-').map_or(base, |(_, n)| n);
        name.strip_suffix(".drv").unwrap_or(name)
    }

    /// The ATerm text as Nix writes it, with input derivations replaced by
    /// `inputs` (hash → output names) when given, and output paths blanked
    /// (also in the environment) when `mask_outputs` is set.
    pub fn unparse(&self, mask_outputs: bool, inputs: Option<&BTreeMap<String, Vec<String>>>) -> Vec<u8> {
        let mut s = Vec::with_capacity(1024);
        let list = |s: &mut Vec<u8>, items: &mut dyn Iterator<Item = Vec<u8>>| {
            s.push(b'[');
            for (i, it) in items.enumerate() {
                if i > 0 {
                    s.push(b',');
                }
                s.extend_from_slice(&it);
            }
            s.push(b']');
        };
        s.extend_from_slice(b"Derive(");
        let mut outs = self.outputs.iter().map(|o| {
            let mut t = b"(".to_vec();
            for (i, f) in [o.name.as_str(), if mask_outputs { "" } else { o.path.as_str() }, &o.hash_algo, &o.hash].iter().enumerate() {
                if i > 0 {
                    t.push(b',');
                }
                quote(&mut t, f);
            }
            t.push(b')');
            t
        });
        list(&mut s, &mut outs);
        s.push(b',');
        let input_drvs = inputs.unwrap_or(&self.input_drvs);
        let mut ins = input_drvs.iter().map(|(k, outs)| {
            let mut t = b"(".to_vec();
            quote(&mut t, k);
            t.push(b',');
            let mut sorted = outs.clone();
            sorted.sort();
            sorted.dedup();
            t.push(b'[');
            for (i, o) in sorted.iter().enumerate() {
                if i > 0 {
                    t.push(b',');
                }
                quote(&mut t, o);
            }
            t.extend_from_slice(b"])");
            t
        });
        list(&mut s, &mut ins);
        s.push(b',');
        list(&mut s, &mut self.input_srcs.iter().map(|p| quoted(p)));
        s.push(b',');
        quote(&mut s, &self.platform);
        s.push(b',');
        quote(&mut s, &self.builder);
        s.push(b',');
        list(&mut s, &mut self.args.iter().map(|a| quoted(a)));
        s.push(b',');
        let mut env = self.env.iter().map(|(k, v)| {
            let mut t = b"(".to_vec();
            quote(&mut t, k);
            t.push(b',');
            let masked = mask_outputs && self.outputs.iter().any(|o| &o.name == k);
            quote(&mut t, if masked { "" } else { v });
            t.push(b')');
            t
        });
        list(&mut s, &mut env);
        s.push(b')');
        s
    }

    /// Nix's "hash modulo" of a derivation (`hashDerivationModulo` with
    /// masked outputs, as `staticOutputHashes`): what a content-addressed
    /// output's realisation is keyed by (`sha256:<base16>!<output>`), and
    /// what an input-addressed output path is computed from. Input
    /// derivations are read through `read` and replaced by their own hash
    /// modulo (a fixed-output one by the hash of its declared content).
    pub fn hash_modulo(&self, read: &mut dyn FnMut(&str) -> Result<Derivation, String>) -> Result<[u8; 32], String> {
        self.hash_modulo_depth(&mut Memo { read, known: BTreeMap::new() }, true, 0)
    }

    /// Input derivations are hashed with their outputs as they are (Nix's
    /// `pathDerivationModulo`); only the derivation asked about is masked.
    fn hash_modulo_depth(&self, memo: &mut Memo, mask: bool, depth: usize) -> Result<[u8; 32], String> {
        use sha2::Digest;
        if depth > 512 {
            return Err("input derivations nest more than 512 deep".into());
        }
        if self.kind() == Kind::Fixed {
            // One hash per output in Nix; derivations here have one output when fixed.
            let o = &self.outputs[0];
            let text = format!("fixed:out:{}:{}:{}", o.hash_algo, o.hash, o.path);
            return Ok(sha2::Sha256::digest(text.as_bytes()).into());
        }
        let mut inputs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (path, outs) in &self.input_drvs {
            let h = match memo.known.get(path) {
                Some(h) => *h,
                None => {
                    let d = (memo.read)(path)?;
                    let h = d.hash_modulo_depth(memo, false, depth + 1)?;
                    memo.known.insert(path.clone(), h);
                    h
                }
            };
            inputs.entry(crate::hash::Sha256Hash(h).to_hex()).or_default().extend(outs.iter().cloned());
        }
        Ok(sha2::Sha256::digest(self.unparse(mask, Some(&inputs))).into())
    }

    /// Reads the `BasicDerivation` wire form (what [`Derivation::write_basic`]
    /// writes): the inputs come back as `input_srcs`, with no input
    /// derivations. Every count and string is bounded.
    pub fn read_basic<R: io::Read + ?Sized>(r: &mut R) -> Result<Derivation, wire::WireError> {
        const MAX: usize = 1 << 24;
        let n = wire::read_u64(r, "outputs")?;
        if n > 4096 {
            return Err(wire::WireError::TooLong { what: "outputs", len: n, limit: 4096 });
        }
        let mut outputs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let name = wire::read_string(r, 4096, "output name")?;
            let path = wire::read_string(r, 4096, "output path")?;
            let hash_algo = wire::read_string(r, 4096, "output hash algorithm")?;
            let hash = wire::read_string(r, 4096, "output hash")?;
            outputs.push(Output { name, path, hash_algo, hash });
        }
        let input_srcs = wire::read_strings(r, 4096, "inputs")?;
        let platform = wire::read_string(r, 4096, "platform")?;
        let builder = wire::read_string(r, MAX, "builder")?;
        let args = wire::read_strings(r, MAX, "args")?;
        let n = wire::read_u64(r, "env")?;
        if n > 1 << 16 {
            return Err(wire::WireError::TooLong { what: "env", len: n, limit: 1 << 16 });
        }
        let mut env = Vec::with_capacity(n as usize);
        for _ in 0..n {
            env.push((wire::read_string(r, 4096, "env name")?, wire::read_string(r, MAX, "env value")?));
        }
        Ok(Derivation { outputs, input_drvs: BTreeMap::new(), input_srcs, platform, builder, args, env })
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

/// Input derivations' hashes, each worked out once (a build graph shares
/// many inputs).
struct Memo<'a> {
    read: &'a mut dyn FnMut(&str) -> Result<Derivation, String>,
    known: BTreeMap<String, [u8; 32]>,
}

/// Appends `v` as an ATerm string (Nix's escapes: `"`, `\\`, newline, CR, tab).
fn quote(s: &mut Vec<u8>, v: &str) {
    s.push(b'"');
    for &c in v.as_bytes() {
        match c {
            b'"' => s.extend_from_slice(b"\\\""),
            b'\\' => s.extend_from_slice(b"\\\\"),
            b'\n' => s.extend_from_slice(b"\\n"),
            b'\r' => s.extend_from_slice(b"\\r"),
            b'\t' => s.extend_from_slice(b"\\t"),
            c => s.push(c),
        }
    }
    s.push(b'"');
}

fn quoted(v: &str) -> Vec<u8> {
    let mut t = Vec::new();
    quote(&mut t, v);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = r#"Derive([("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top","","")],[("/nix/store/26zjw483mz5dh3k05amp80pyvvibhsld-dep.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo building top; cat $dep/sub/f > $out"],[("PATH","/bin:/usr/bin"),("builder","/bin/sh"),("dep","/nix/store/86blry61wgdwbnnw978vd4h6h2wi0048-dep"),("name","top"),("nonce","vec1"),("out","/nix/store/33lfs1if5diswhrxb547bs5d6x5qv1wy-top"),("system","x86_64-linux")])"#;

    // Made by Nix 2.8.0's nix-instantiate (see the test below for the expression's parts).
    const DEP: &str = r#"Derive([("out","/nix/store/mvk0r91i0xv5bdijwv2hq8k66mzs6dms-dep","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo \"q\\\\ t\ttab\" > $out"],[("builder","/bin/sh"),("name","dep"),("out","/nix/store/mvk0r91i0xv5bdijwv2hq8k66mzs6dms-dep"),("system","x86_64-linux")])"#;
    const FOD: &str = r#"Derive([("out","/nix/store/cf1fjhz2mpqm06x4fby60z4bxpnsmmws-fod","sha256","4d6037fc764dc35938630567521c3f9ed3a6be10ce88f4b1e29f42f6e13e6c3c")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","fod"),("out","/nix/store/cf1fjhz2mpqm06x4fby60z4bxpnsmmws-fod"),("outputHash","sha256-TWA3/HZNw1k4YwVnUhw/ntOmvhDOiPSx4p9C9uE+bDw="),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])"#;
    const TOP2: &str = r#"Derive([("dev","/nix/store/z79c04lh5m0gwrff8g3jbhv3q7vl49wk-top-dev","",""),("out","/nix/store/17i1y56mpihpc4qqa6v33bn5rjih5jfh-top","","")],[("/nix/store/174vfyzg61ysikd0cgvqx0wndq4w0szf-dep.drv",["out"]),("/nix/store/xwcp9ivknchzkkb4jg06hzfybjm4z96b-fod.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","cat /nix/store/mvk0r91i0xv5bdijwv2hq8k66mzs6dms-dep /nix/store/cf1fjhz2mpqm06x4fby60z4bxpnsmmws-fod > $out"],[("builder","/bin/sh"),("dev","/nix/store/z79c04lh5m0gwrff8g3jbhv3q7vl49wk-top-dev"),("name","top"),("out","/nix/store/17i1y56mpihpc4qqa6v33bn5rjih5jfh-top"),("outputs","out dev"),("system","x86_64-linux")])"#;
    // `__contentAddressed = true` (recursive sha256); Nix 2.8 registered its
    // realisation under sha256:b38c5560…21e7!out.
    const CAF: &str = r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo ca > $out"],[("builder","/bin/sh"),("name","caf"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;

    fn read_test_drv(path: &str) -> Result<Derivation, String> {
        let text = match path {
            "/nix/store/174vfyzg61ysikd0cgvqx0wndq4w0szf-dep.drv" => DEP,
            "/nix/store/xwcp9ivknchzkkb4jg06hzfybjm4z96b-fod.drv" => FOD,
            _ => return Err(format!("no {path}")),
        };
        Derivation::parse(path, text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn unparse_gives_back_the_exact_text() {
        for t in [DEP, FOD, TOP2, CAF, TOP] {
            let d = Derivation::parse("/nix/store/x.drv", t.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(d.unparse(false, None)).unwrap(), t);
        }
    }

    #[test]
    fn hash_modulo_matches_nix_for_every_kind() {
        use crate::store_path::make_store_path;
        let caf = Derivation::parse("/nix/store/nwd2y68bvjs0qdd60sxbyv0gcf6dlngx-caf.drv", CAF.as_bytes()).unwrap();
        assert_eq!(caf.kind(), Kind::Floating);
        let h = caf.hash_modulo(&mut read_test_drv).unwrap();
        assert_eq!(crate::hash::Sha256Hash(h).to_hex(), "b38c556096d615eb5a99ab7cac19cd46c4ec3ea62bcd9f7c81e16f8827bb21e7");
        // Input-addressed output paths are made from the hash modulo: this
        // checks masking, escapes and (for top) inputs replaced by their
        // hashes, a fixed-output one included.
        let dep = read_test_drv("/nix/store/174vfyzg61ysikd0cgvqx0wndq4w0szf-dep.drv").unwrap();
        let h = dep.hash_modulo(&mut read_test_drv).unwrap();
        assert_eq!(make_store_path("/nix/store", "output:out", &h, "dep"), "/nix/store/mvk0r91i0xv5bdijwv2hq8k66mzs6dms-dep");
        let top = Derivation::parse("/nix/store/p0nzrd7jh57mxrsz1sfc3h567y8qjy37-top.drv", TOP2.as_bytes()).unwrap();
        assert_eq!((top.kind(), read_test_drv("/nix/store/xwcp9ivknchzkkb4jg06hzfybjm4z96b-fod.drv").unwrap().kind()), (Kind::InputAddressed, Kind::Fixed));
        let h = top.hash_modulo(&mut read_test_drv).unwrap();
        assert_eq!(make_store_path("/nix/store", "output:out", &h, "top"), "/nix/store/17i1y56mpihpc4qqa6v33bn5rjih5jfh-top");
        assert_eq!(make_store_path("/nix/store", "output:dev", &h, "top-dev"), "/nix/store/z79c04lh5m0gwrff8g3jbhv3q7vl49wk-top-dev");
        assert!(top.hash_modulo(&mut |p: &str| Err(format!("no {p}"))).is_err());
        assert_eq!(Derivation::name_of("/nix/store/p0nzrd7jh57mxrsz1sfc3h567y8qjy37-top.drv"), "top");
    }

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
    fn basic_derivation_reads_back() {
        let d = Derivation::parse("/nix/store/42ka40fgb8k4q9lhi1l10fy6ak13bvs0-top.drv", TOP.as_bytes()).unwrap();
        let mut out = Vec::new();
        d.write_basic(&mut out, &["/nix/store/86blry61wgdwbnnw978vd4h6h2wi0048-dep".into()]).unwrap();
        let back = Derivation::read_basic(&mut &out[..]).unwrap();
        assert_eq!((back.outputs, back.input_srcs.clone(), back.env, back.args), (d.outputs, vec!["/nix/store/86blry61wgdwbnnw978vd4h6h2wi0048-dep".to_string()], d.env, d.args));
        assert!(back.input_drvs.is_empty());
        assert!(Derivation::read_basic(&mut &out[..out.len() - 3]).is_err(), "cut");
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
