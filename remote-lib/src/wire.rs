//! Wire primitives shared by the hook's stdin stream, the `nix-store --serve`
//! protocol, export streams and NARs: little-endian u64 integers and
//! length-prefixed byte strings padded with zeros to a multiple of 8.
//!
//! Every read takes an explicit size limit, so a hostile or corrupt peer can
//! never make us allocate more than the caller allowed. Non-zero padding is
//! rejected, as Nix does.

use std::io::{self, Read, Write};

/// Largest list we accept (paths in a closure, settings, env entries).
pub const MAX_LIST: u64 = 1 << 22;

/// What went wrong while reading or writing a wire value.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("I/O error while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("unexpected end of stream while reading {what}")]
    Eof { what: &'static str },
    #[error("{what} is {len} bytes long, more than the limit of {limit}")]
    TooLong { what: &'static str, len: u64, limit: u64 },
    #[error("non-zero padding after {what}")]
    Padding { what: &'static str },
    #[error("{what} is not valid UTF-8")]
    Utf8 { what: &'static str },
}

fn io_err(what: &'static str, e: io::Error) -> WireError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        WireError::Eof { what }
    } else {
        WireError::Io { what, source: e }
    }
}

/// Reads one u64.
pub fn read_u64<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<u64, WireError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(|e| io_err(what, e))?;
    Ok(u64::from_le_bytes(b))
}

/// Reads one u64 and maps it to a bool (non-zero is true, as Nix does).
pub fn read_bool<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<bool, WireError> {
    Ok(read_u64(r, what)? != 0)
}

/// Number of padding bytes after a payload of `len` bytes.
pub fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// Reads and checks the padding after a payload of `len` bytes.
pub fn read_padding<R: Read + ?Sized>(r: &mut R, len: u64, what: &'static str) -> Result<(), WireError> {
    let pad = padding(len);
    if pad > 0 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..pad]).map_err(|e| io_err(what, e))?;
        if b[..pad].iter().any(|&x| x != 0) {
            return Err(WireError::Padding { what });
        }
    }
    Ok(())
}

/// Reads a byte string of at most `limit` bytes.
pub fn read_bytes<R: Read + ?Sized>(r: &mut R, limit: usize, what: &'static str) -> Result<Vec<u8>, WireError> {
    let len = read_u64(r, what)?;
    if len > limit as u64 {
        return Err(WireError::TooLong { what, len, limit: limit as u64 });
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(|e| io_err(what, e))?;
    read_padding(r, len, what)?;
    Ok(buf)
}

/// Reads a UTF-8 string of at most `limit` bytes.
pub fn read_string<R: Read + ?Sized>(r: &mut R, limit: usize, what: &'static str) -> Result<String, WireError> {
    String::from_utf8(read_bytes(r, limit, what)?).map_err(|_| WireError::Utf8 { what })
}

/// Reads a counted list of strings.
pub fn read_strings<R: Read + ?Sized>(r: &mut R, limit: usize, what: &'static str) -> Result<Vec<String>, WireError> {
    let n = read_u64(r, what)?;
    if n > MAX_LIST {
        return Err(WireError::TooLong { what, len: n, limit: MAX_LIST });
    }
    (0..n).map(|_| read_string(r, limit, what)).collect()
}

/// Writes one u64.
pub fn write_u64<W: Write + ?Sized>(w: &mut W, v: u64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

/// Writes a byte string with its length and padding.
pub fn write_bytes<W: Write + ?Sized>(w: &mut W, b: &[u8]) -> io::Result<()> {
    write_u64(w, b.len() as u64)?;
    w.write_all(b)?;
    let pad = padding(b.len() as u64);
    if pad > 0 {
        w.write_all(&[0u8; 8][..pad])?;
    }
    Ok(())
}

/// Writes a counted list of strings.
pub fn write_strings<W: Write + ?Sized, S: AsRef<str>>(w: &mut W, items: &[S]) -> io::Result<()> {
    write_u64(w, items.len() as u64)?;
    for s in items {
        write_bytes(w, s.as_ref().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_try_and_zero_match_capture() {
        // The hook protocol's framing: "try" followed by the integer 0.
        let mut out = Vec::new();
        write_bytes(&mut out, b"try").unwrap();
        write_u64(&mut out, 0).unwrap();
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0, b't', b'r', b'y', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut r = &out[..];
        assert_eq!(read_string(&mut r, 10, "tag").unwrap(), "try");
        assert_eq!(read_u64(&mut r, "n").unwrap(), 0);
        assert!(r.is_empty());
    }

    #[test]
    fn empty_and_aligned_strings_have_no_padding() {
        let mut out = Vec::new();
        write_bytes(&mut out, b"").unwrap();
        write_bytes(&mut out, b"12345678").unwrap();
        assert_eq!(out.len(), 8 + 8 + 8);
    }

    #[test]
    fn nonzero_padding_is_rejected() {
        let mut bytes = vec![1, 0, 0, 0, 0, 0, 0, 0, b'x', 0, 0, 0, 0, 0, 0, 1];
        let err = read_bytes(&mut &bytes[..], 10, "s").unwrap_err();
        assert!(matches!(err, WireError::Padding { .. }), "{err}");
        bytes[15] = 0;
        assert_eq!(read_bytes(&mut &bytes[..], 10, "s").unwrap(), b"x");
    }

    #[test]
    fn length_limit_is_enforced_before_allocating() {
        let mut bytes = Vec::new();
        write_u64(&mut bytes, u64::MAX).unwrap();
        let err = read_bytes(&mut &bytes[..], 100, "path").unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }), "{err}");
    }

    #[test]
    fn truncated_input_is_eof() {
        let err = read_u64(&mut &[1u8, 2][..], "count").unwrap_err();
        assert!(matches!(err, WireError::Eof { what: "count" }));
    }
}
