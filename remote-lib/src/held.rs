//! Sessions opened ahead: after a job, a serve session to the same builder
//! is started and held by a small detached process (`build-hook __hold`), so
//! that the next job to that builder finds the builder's `nix-store --serve`
//! already running instead of paying its start-up (≈ 35 ms of CPU on the
//! builder for Nix 2.8, plus the channel; six builds starting at once on a
//! 2-core builder wait for each other's).
//!
//! The holder is the session process's parent: it spawns the session command
//! (ssh through the shared connection), listens on a Unix socket next to the
//! shared connection's (`<control socket>.<command hash>.h<i>`, one per
//! index `i`, each index owned through a lock file while it is offered), and
//! gives the first process that connects the session's stdin, stdout and
//! stderr (`SCM_RIGHTS`) and the session's process id. From then on it only
//! waits: when the session process exits it sends its wait status on the
//! socket; when the taker closes the socket or writes to it (the taker died,
//! or wants the session killed) it kills the session's process group. A
//! session nobody takes within its time to live, or that ends by itself, is
//! ended and its socket removed.
//!
//! A fresh session is held, never one a job has used: the builder's
//! `nix-store` caches what it was asked about paths, and a cached answer
//! could be stale by the time another job asked.

use crate::machines::Machine;
use crate::transport::{self, SshConfig};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What went wrong in a holder.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("{what} '{path}': {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot start the session command '{program}': {source}")]
    Spawn { program: String, source: io::Error },
    #[error("usage: build-hook __hold PREFIX COUNT TTL-MS -- COMMAND...")]
    Usage,
}

/// The holder–taker exchange (4-byte pid, the three descriptors, then the
/// raw wait status; any byte or EOF from the taker means kill). It is part
/// of the hash in the socket names, so a hook whose exchange differs never
/// meets a holder started by another version: change it with the exchange.
const PROTOCOL: &str = "build-hook held session 1";

/// How long a held session waits for a job at most.
pub const MAX_TTL: Duration = Duration::from_secs(60);

/// How often a holder checks its session and its time while it waits.
const TICK_MS: i32 = 100;

/// Where the sessions for `m` are held, and the command they run: `None`
/// when nothing may be held (a store on this host, an `ssh-ng://` builder,
/// connection sharing off or the user's own). The prefix names the shared
/// connection and a hash of the whole session command, so that two machines
/// lines for the same host with different remote programs or stores never
/// take each other's sessions.
pub fn prefix(m: &Machine, cfg: &SshConfig) -> Option<(PathBuf, Command)> {
    if transport::is_local(m) || m.ssh.daemon || transport::users_own_sharing(cfg) {
        return None;
    }
    let sock = transport::control_socket(m, cfg)?;
    // The cipher list only shapes a new connection; a held session always
    // goes through the open one.
    let plain = SshConfig { ciphers: None, ..cfg.clone() };
    let cmd = transport::session_command(m, &plain).ok()?;
    let words = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|w| w.as_encoded_bytes());
    let envs = cmd.get_envs().flat_map(|(k, v)| [k.as_encoded_bytes(), v.map(|v| v.as_encoded_bytes()).unwrap_or(b"\0unset")]);
    let version = std::iter::once(PROTOCOL.as_bytes());
    let hex = transport::words_hex(version.chain(words).chain(envs));
    let name = format!("{}.{}", sock.file_name()?.to_string_lossy(), &hex[..8]);
    Some((sock.with_file_name(name), cmd))
}

fn socket_path(prefix: &Path, i: usize) -> PathBuf {
    suffixed(prefix, &format!(".h{i}"))
}

fn lock_path(prefix: &Path, i: usize) -> PathBuf {
    suffixed(prefix, &format!(".h{i}.lock"))
}

fn suffixed(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Takes the lock of index `i` without waiting; `None` when another holder
/// owns it.
fn try_lock(prefix: &Path, i: usize) -> Option<std::fs::File> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock_path(prefix, i)).ok()?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (r == 0).then_some(f)
}

/// Whether one of the `count` indices is free (no holder offers a session
/// there). The lock taken to find out is released at once.
fn has_free_index(prefix: &Path, count: usize) -> bool {
    (0..count).any(|i| try_lock(prefix, i).is_some())
}

/// After a job on `m`: when fewer than `count` sessions are held for it and
/// its shared connection is open, starts `program __hold …` (detached: its
/// own session, no inherited descriptors, so neither Nix's kill of the
/// hook's process group nor the hook's exit ends it, and Nix's log pipe is
/// not kept open) to hold one more for `ttl` (at most [`MAX_TTL`]). Whether
/// one was started.
pub fn park(program: &Path, m: &Machine, cfg: &SshConfig, count: usize, ttl: Duration) -> bool {
    let count = count.min(MAX_PER_MACHINE);
    if count == 0 || ttl.is_zero() || !transport::shared_connection_open(m, cfg) {
        return false;
    }
    let Some((prefix, cmd)) = prefix(m, cfg) else { return false };
    if !has_free_index(&prefix, count) {
        return false;
    }
    let mut c = Command::new(program);
    c.arg("__hold").arg(&prefix).arg(count.to_string()).arg(ttl.min(MAX_TTL).as_millis().to_string()).arg("--");
    // Only through the shared connection: if it is gone by the time the
    // session starts, the session fails at once rather than open a
    // connection (or become the master) of its own. ssh keeps the first
    // value it is given for an option, so these go before the others; the
    // shared connection's client ignores the proxy command.
    c.arg(cmd.get_program()).args(["-o", "ControlMaster=no"]);
    // (OpenSSH refuses `-J` together with a proxy command.)
    let jump = cfg.extra_opts.iter().any(|o| o.starts_with("-J") || o.to_ascii_lowercase().contains("proxyjump"));
    if !jump {
        c.args(["-o", "ProxyCommand=false"]);
    }
    c.args(cmd.get_args());
    transport::copy_envs(&cmd, &mut c);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid, close_range and fcntl are async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            // Nix's log pipe (fd 4) and anything else not close-on-exec
            // becomes so (not closed now: std reports a failed exec through
            // one of them).
            const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
                for fd in 3..1024 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    // Not waited for: the hook exits soon after, and init reaps it.
    c.spawn().is_ok()
}

/// A held session, taken: its streams and its process, which the holder
/// (its parent) waits for.
pub struct Taken {
    /// To the holder: its wait status arrives here; writing or closing it
    /// kills the session.
    pub holder: UnixStream,
    pub pid: u32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The most sessions held for one builder (and command).
pub const MAX_PER_MACHINE: usize = 4;

/// How many sessions are held for `m` now, ready to be taken (for
/// `build-hook status`): offered sockets whose index a live holder owns.
/// Nothing is created or taken to find out.
pub fn held_now(m: &Machine, cfg: &SshConfig) -> usize {
    prefix(m, cfg).map_or(0, |(prefix, _)| offered(&prefix))
}

/// [`held_now`] under `prefix`.
fn offered(prefix: &Path) -> usize {
    (0..MAX_PER_MACHINE)
        .filter(|&i| socket_path(prefix, i).exists())
        .filter(|&i| {
            let Ok(f) = std::fs::File::open(lock_path(prefix, i)) else { return false };
            // A shared lock is refused only while a holder owns the index.
            // SAFETY: flock on a descriptor we own.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
            r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
        })
        .count()
}

/// Takes a session held for `m`, if there is one.
pub fn take(m: &Machine, cfg: &SshConfig) -> Option<Taken> {
    let (prefix, _) = prefix(m, cfg)?;
    (0..MAX_PER_MACHINE).find_map(|i| take_at(&socket_path(&prefix, i)))
}

fn take_at(path: &Path) -> Option<Taken> {
    let s = UnixStream::connect(path).ok()?;
    // A holder answers at once; one that does not is given up.
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut buf = [0u8; 4];
    let (n, mut fds) = recv_fds(&s, &mut buf, 3).ok()?;
    if n != 4 || fds.len() != 3 {
        return None;
    }
    s.set_read_timeout(None).ok()?;
    let stderr = fds.pop()?;
    let stdout = fds.pop()?;
    let stdin = fds.pop()?;
    Some(Taken { holder: s, pid: u32::from_le_bytes(buf), stdin, stdout, stderr })
}

/// The holder (`build-hook __hold PREFIX COUNT TTL-MS -- COMMAND...`): see
/// the module documentation. Returns when the session has ended or was
/// never needed.
pub fn hold_main(args: &[String]) -> Result<(), HeldError> {
    // Named apart from the hook in `ps -e`/`pgrep -x build-hook`.
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"build-hook-hold".as_ptr()) };
    let [prefix, count, ttl, dashes, argv @ ..] = args else { return Err(HeldError::Usage) };
    let (Ok(count), Ok(ttl), true, false) = (count.parse::<usize>(), ttl.parse::<u64>(), dashes == "--", argv.is_empty()) else {
        return Err(HeldError::Usage);
    };
    hold(Path::new(prefix), count.min(MAX_PER_MACHINE), START_DELAY, Duration::from_millis(ttl).min(MAX_TTL), argv)
}

/// How long a holder waits before it starts its session: a job ends
/// with others (the last round of a fan-out), and the session's start-up
/// would take CPU from their downloads and from Nix registering them.
pub const START_DELAY: Duration = Duration::from_millis(250);

/// Holds one session running `argv` at the first free index below `count`
/// under `prefix`, started after `delay`, for `ttl`.
pub fn hold(prefix: &Path, count: usize, delay: Duration, ttl: Duration, argv: &[String]) -> Result<(), HeldError> {
    let Some((i, lock)) = (0..count).find_map(|i| try_lock(prefix, i).map(|l| (i, l))) else { return Ok(()) };
    std::thread::sleep(delay);
    let path = socket_path(prefix, i);
    let tmp = suffixed(prefix, &format!(".h{i}.new"));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|source| HeldError::Io { what: "cannot listen on", path: tmp.clone(), source })?;
    let mut child = {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match c.spawn() {
            Ok(c) => c,
            Err(source) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(HeldError::Spawn { program: argv[0].clone(), source });
            }
        }
    };
    let pid = child.id();
    let kill = || {
        // SAFETY: our child's process group, the child not yet reaped.
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    };
    if let Err(source) = std::fs::rename(&tmp, &path) {
        kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&tmp);
        return Err(HeldError::Io { what: "cannot offer the session at", path, source });
    }
    let until = Instant::now() + ttl;
    let taker = loop {
        match child.try_wait() {
            // Ended by itself (and reaped: its group is not ours to signal).
            Ok(Some(_)) | Err(_) => {
                let _ = std::fs::remove_file(&path);
                return Ok(());
            }
            Ok(None) if Instant::now() >= until => {
                let _ = std::fs::remove_file(&path);
                kill();
                let _ = child.wait();
                return Ok(());
            }
            Ok(None) => {}
        }
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, TICK_MS) } > 0 {
            if let Ok((s, _)) = listener.accept() {
                break s;
            }
        }
    };
    // Nobody else finds it now; the index is free for the next holder.
    let _ = std::fs::remove_file(&path);
    drop(listener);
    drop(lock);
    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
        kill();
        let _ = child.wait();
        return Ok(());
    };
    let sent = send_fds(&taker, &pid.to_le_bytes(), &[stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()]);
    drop((stdin, stdout, stderr));
    if sent.is_err() {
        kill();
        let _ = child.wait();
        return Ok(());
    }
    // The taker's end closing (it exited, or dropped the session) or any
    // byte from it kills the session, unless it has already ended (its
    // process is then a zombie until reaped below, so its id cannot have
    // been reused).
    let reaped = Arc::new(Mutex::new(false));
    if let Ok(mut r) = taker.try_clone() {
        let reaped = reaped.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let _ = r.read(&mut b);
            if !*reaped.lock().unwrap_or_else(|e| e.into_inner()) {
                // SAFETY: as above; checked under the lock the reaper takes.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            }
        });
    }
    wait_exited_keep_zombie(pid);
    let status = {
        let mut r = reaped.lock().unwrap_or_else(|e| e.into_inner());
        *r = true;
        child.wait()
    };
    if let Ok(st) = status {
        let mut t = &taker;
        let _ = t.write_all(&st.into_raw().to_le_bytes());
    }
    Ok(())
}

/// Blocks until process `pid` (our child) has exited, leaving it unreaped.
fn wait_exited_keep_zombie(pid: u32) {
    loop {
        // SAFETY: a zeroed siginfo for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting for our own child, without reaping it.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Reads a held session's wait status from its holder without blocking:
/// `None` while it runs, `Some(None)` when the holder ended without one.
pub fn try_status(holder: &UnixStream, got: &mut Vec<u8>) -> Option<Option<ExitStatus>> {
    let _ = holder.set_nonblocking(true);
    let mut buf = [0u8; 4];
    loop {
        let mut r = holder;
        match r.read(&mut buf[..4 - got.len()]) {
            Ok(0) => return Some(None),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() == 4 {
                    let raw = i32::from_le_bytes([got[0], got[1], got[2], got[3]]);
                    return Some(Some(ExitStatus::from_raw(raw)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(None),
        }
    }
}

/// Asks the holder to kill the session (any byte does).
pub fn kill(holder: &UnixStream) {
    let mut w = holder;
    let _ = w.write(b"k");
}

fn send_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: a zeroed msghdr is valid; the fields set below point to live
    // buffers for the duration of the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, fds.len());
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fds(sock: &UnixStream, buf: &mut [u8], max: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let bytes = max * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut fds = Vec::new();
    // SAFETY: as in send_fds; every descriptor the kernel passed is taken
    // into an OwnedFd exactly once.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c) as *const RawFd;
                for k in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        n as usize
    };
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bh-held-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn holder(prefix: &Path, count: usize, ttl: Duration, argv: &[&str]) -> std::thread::JoinHandle<Result<(), HeldError>> {
        let (p, argv): (PathBuf, Vec<String>) = (prefix.to_path_buf(), argv.iter().map(|s| s.to_string()).collect());
        std::thread::spawn(move || hold(&p, count, Duration::ZERO, ttl, &argv))
    }

    fn wait_offered(prefix: &Path, i: usize) {
        let until = Instant::now() + Duration::from_secs(5);
        while !socket_path(prefix, i).exists() {
            assert!(Instant::now() < until, "no session offered at index {i}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn status(t: &Taken) -> Option<ExitStatus> {
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = try_status(&t.holder, &mut got) {
                return s;
            }
            assert!(Instant::now() < until, "no status from the holder");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_taken_session_carries_bytes_and_reports_its_exit_status() {
        let d = dir("carry");
        let prefix = d.join("conn.abcd1234");
        let h = holder(&prefix, 2, Duration::from_secs(10), &["sh", "-c", "cat; echo oops >&2; exit 7"]);
        wait_offered(&prefix, 0);
        let t = take_at(&socket_path(&prefix, 0)).expect("taken");
        assert!(!socket_path(&prefix, 0).exists(), "a taken session is no longer offered");
        let (mut w, mut r, mut e) =
            (std::fs::File::from(t.stdin.try_clone().unwrap()), std::fs::File::from(t.stdout.try_clone().unwrap()), std::fs::File::from(t.stderr.try_clone().unwrap()));
        w.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        drop(w);
        let Taken { holder, pid, stdin, stdout, stderr } = t;
        drop((stdin, stdout, stderr));
        let mut err = String::new();
        e.read_to_string(&mut err).unwrap();
        assert_eq!(err, "oops\n");
        let t = Taken {
            holder,
            pid,
            stdin: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            stdout: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            stderr: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
        };
        assert_eq!(status(&t).and_then(|s| s.code()), Some(7));
        h.join().unwrap().unwrap();
    }

    #[test]
    fn only_sessions_still_offered_by_a_live_holder_are_counted() {
        let d = dir("count");
        let prefix = d.join("conn.abcd1234");
        assert_eq!(offered(&prefix), 0);
        let h = holder(&prefix, 2, Duration::from_secs(10), &["sleep", "30"]);
        wait_offered(&prefix, 0);
        assert_eq!(offered(&prefix), 1);
        // Counting takes nothing: the session is still there to be taken.
        assert_eq!(offered(&prefix), 1);
        let t = take_at(&socket_path(&prefix, 0)).expect("still offered after being counted");
        assert_eq!(offered(&prefix), 0, "a taken session is not held any more");
        kill(&t.holder);
        h.join().unwrap().unwrap();
        // A socket left behind by a holder that died (its lock released) is not a held session.
        std::fs::write(socket_path(&prefix, 1), b"").unwrap();
        std::fs::write(lock_path(&prefix, 1), b"").unwrap();
        assert_eq!(offered(&prefix), 0);
    }

    #[test]
    fn a_kill_request_ends_the_session_and_the_status_says_so() {
        let d = dir("kill");
        let prefix = d.join("conn.abcd1234");
        let h = holder(&prefix, 1, Duration::from_secs(10), &["sleep", "30"]);
        wait_offered(&prefix, 0);
        let t = take_at(&socket_path(&prefix, 0)).expect("taken");
        kill(&t.holder);
        assert_eq!(status(&t).and_then(|s| s.signal()), Some(libc::SIGKILL));
        h.join().unwrap().unwrap();
    }

    #[test]
    fn a_taker_that_goes_away_takes_its_session_with_it() {
        let d = dir("gone");
        let prefix = d.join("conn.abcd1234");
        let h = holder(&prefix, 1, Duration::from_secs(10), &["sleep", "30"]);
        wait_offered(&prefix, 0);
        let t = take_at(&socket_path(&prefix, 0)).expect("taken");
        let t0 = Instant::now();
        drop(t);
        h.join().unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "the holder ended the session when its taker left");
    }

    #[test]
    fn an_untaken_session_ends_with_its_time_and_frees_its_index() {
        let d = dir("ttl");
        let prefix = d.join("conn.abcd1234");
        let t0 = Instant::now();
        let h = holder(&prefix, 1, Duration::from_millis(300), &["sleep", "30"]);
        wait_offered(&prefix, 0);
        assert!(!has_free_index(&prefix, 1), "an offered index is taken");
        h.join().unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(!socket_path(&prefix, 0).exists());
        assert!(has_free_index(&prefix, 1));
        assert!(take_at(&socket_path(&prefix, 0)).is_none());
    }

    #[test]
    fn one_session_per_index_and_each_is_taken_once() {
        let d = dir("once");
        let prefix = d.join("conn.abcd1234");
        let h0 = holder(&prefix, 2, Duration::from_secs(10), &["cat"]);
        wait_offered(&prefix, 0);
        let h1 = holder(&prefix, 2, Duration::from_secs(10), &["cat"]);
        wait_offered(&prefix, 1);
        // A third finds no free index and holds nothing.
        hold(&prefix, 2, Duration::ZERO, Duration::from_secs(10), &["cat".to_string()]).unwrap();
        let a = take_at(&socket_path(&prefix, 0)).expect("first");
        let b = take_at(&socket_path(&prefix, 1)).expect("second");
        assert!(take_at(&socket_path(&prefix, 0)).is_none() && take_at(&socket_path(&prefix, 1)).is_none());
        assert_ne!(a.pid, b.pid);
        drop((a, b));
        h0.join().unwrap().unwrap();
        h1.join().unwrap().unwrap();
    }

    #[test]
    fn a_session_that_ends_by_itself_is_withdrawn() {
        let d = dir("ends");
        let prefix = d.join("conn.abcd1234");
        let h = holder(&prefix, 1, Duration::from_secs(10), &["true"]);
        h.join().unwrap().unwrap();
        assert!(!socket_path(&prefix, 0).exists());
    }
}
