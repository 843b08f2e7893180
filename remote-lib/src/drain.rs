//! Draining machines: a drained machine takes no new builds (builds running
//! there finish), for every hook sharing the load directory. A drain is a
//! file in `<load dir>/build-hook/drain/` named after the machine (or `*`
//! for all of them) holding the Unix time it ends (0: until undrained).

use std::fs;
use std::io;
use std::path::PathBuf;

/// The drain markers of a load directory.
#[derive(Clone, Debug)]
pub struct Drains {
    dir: PathBuf,
}

/// The marker that drains every machine.
const ALL: &str = "*";

impl Drains {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Drains { dir: dir.into() }
    }

    fn file(&self, uri: Option<&str>) -> PathBuf {
        self.dir.join(uri.map(crate::transport::file_name_for).unwrap_or_else(|| ALL.into()))
    }

    /// Drains `uri` (`None`: every machine) until `until` (Unix time;
    /// `None`: until undrained).
    pub fn drain(&self, uri: Option<&str>, until: Option<u64>) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let f = self.file(uri);
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, format!("{}\n", until.unwrap_or(0)))?;
        fs::rename(tmp, f)
    }

    /// Ends a drain (`None`: the drain of every machine, and each machine's).
    pub fn undrain(&self, uri: Option<&str>) -> io::Result<()> {
        let remove = |p: PathBuf| match fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        match uri {
            Some(u) => remove(self.file(Some(u))),
            None => {
                if let Ok(rd) = fs::read_dir(&self.dir) {
                    for e in rd.flatten() {
                        remove(e.path())?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether `uri` is drained at `now`: `Some(until)` (0: no end), or `None`.
    /// An unreadable marker counts as a drain with no end (the operator meant
    /// something); one whose time has passed does not count.
    pub fn drained(&self, uri: &str, now: u64) -> Option<u64> {
        [self.file(Some(uri)), self.file(None)].into_iter().find_map(|p| {
            let text = fs::read_to_string(p).ok()?;
            let until = text.trim().parse::<u64>().unwrap_or(0);
            (until == 0 || until > now).then_some(until)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_one_all_until_and_undrain() {
        let dir = tempfile::tempdir().unwrap();
        let d = Drains::new(dir.path().join("drain"));
        assert_eq!(d.drained("ssh://b1", 100), None);
        d.drain(Some("ssh://b1"), None).unwrap();
        assert_eq!(d.drained("ssh://b1", 100), Some(0));
        assert_eq!(d.drained("ssh://b2", 100), None);
        d.drain(Some("ssh://b2"), Some(150)).unwrap();
        assert_eq!(d.drained("ssh://b2", 100), Some(150));
        assert_eq!(d.drained("ssh://b2", 151), None, "a drain ends by itself");
        d.drain(None, None).unwrap();
        assert_eq!(d.drained("ssh://b3", 100), Some(0));
        d.undrain(Some("ssh://b1")).unwrap();
        assert_eq!(d.drained("ssh://b1", 100), Some(0), "still drained by the drain of all");
        d.undrain(None).unwrap();
        assert_eq!(d.drained("ssh://b1", 100), None);
        assert_eq!(d.drained("ssh://b3", 100), None);
    }
}
