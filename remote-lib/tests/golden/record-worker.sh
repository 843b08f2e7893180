#!/usr/bin/env bash
# Re-records the worker-protocol captures in this directory from the real
# nix-daemon on PATH (2.8.0 when they were committed), or with a chroot's name
# (tests/lib/chroots.sh) from that chroot's nix-daemon (sid: 2.34.8). Run as root:
#   bash remote-lib/tests/golden/record-worker.sh        # worker-2.8-*.bin
#   bash remote-lib/tests/golden/record-worker.sh sid    # worker-2.34-*.bin
#
# The daemon runs against a throw-away store in /tmp/bh-worker-golden (a fixed
# directory, so that store paths and the client's bytes are the same on every
# run): NIX_STORE_DIR, NIX_STATE_DIR, NIX_LOG_DIR and NIX_CONF_DIR point there,
# NIX_REMOTE=local keeps it off the host's daemon, and its nix.conf has
# sandbox = false, build-users-group = (builds run as root with /bin/sh),
# no substituters, trusted-users = root, ca-derivations on (2.8 asserts on QueryRealisation without it). The host's store and daemon are not touched.
# The client is record-worker.py, written from the protocol's definition
# independently of remote-lib/src/worker.rs.
#
# worker-2.8-trusted-s2c.bin  what `nix-daemon --stdio` (trusted) sent for: handshake
#     (client 1.38, daemon 1.34, version string), SetOptions, QueryValidPaths (none valid),
#     AddToStoreNar of `hello` (hello-file.nar, content-addressed, framed), QueryValidPaths
#     (hello valid), QueryPathInfo of hello (valid) and of a missing path (not valid),
#     AddToStoreNar with a wrong NAR hash (error, new format), AddMultipleToStore of `dir`
#     (dir.nar, content-addressed) and `ia` (input-addressed, refers to hello), NarFromPath
#     of hello (120 bytes), BuildDerivation of worker-ok.drv (built, one log line) and of
#     worker-fail.drv (builder exits 1), QueryRealisation of an unknown output, and last
#     NarFromPath of the missing path (the daemon fails after STDERR_LAST and hangs up).
# worker-2.8-trusted-c2s.bin  every byte the client sent in that session.
# worker-2.8-untrusted-s2c.bin  what a socket-mode nix-daemon sent to user `nobody` (not
#     in trusted-users): handshake, AddToStoreNar of the unsigned input-addressed `ia`
#     (refused: lacks a valid signature), BuildDerivation of worker-ok.drv (refused: not
#     privileged), QueryPathInfo of hello (valid).
# worker-ok.drv, worker-fail.drv  the two derivations, as nix-instantiate wrote them.
#
# With a chroot (`record-worker.sh sid`), the same two sessions against that
# chroot's Nix: everything above is prepared on the host as before (the
# host's Nix computes the paths and writes show.json, in the JSON form the
# client reads), then the store is emptied and the chroot's nix-instantiate
# must write the same two .drv files (same store directory, same
# expression: it is checked byte for byte against worker-ok.drv and
# worker-fail.drv). The daemons run inside the chroot (ch_run: pivot_root
# into it, its own binaries only) with $W bind-mounted at the same path, so
# the store directory is the same: `nix-daemon --stdio` for the trusted
# session (the client starts it through ch_run), and a socket-mode
# nix-daemon for the untrusted one, whose socket under $W the client,
# running on the host as `nobody`, connects to (the daemon sees uid 65534,
# `nobody` in the chroot too, not in trusted-users). Nix 2.34.8 answers at
# protocol 1.38 (it sends its feature list; the client offers none) and says
# whether it trusts the client. The files are worker-<major.minor>-*.bin,
# named after the chroot daemon's version:
# worker-2.34-trusted-s2c.bin, worker-2.34-trusted-c2s.bin,
# worker-2.34-untrusted-s2c.bin  as for 2.8 above.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
CH=${1:-}
W=/tmp/bh-worker-golden
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ]; then
    # in a chroot: the daemon is in its own process group (setsid below)
    if [ -n "$CH" ]; then kill -- "-$daemon_pid" 2>/dev/null || true; else kill "$daemon_pid" 2>/dev/null || true; fi
    wait "$daemon_pid" 2>/dev/null || true
  fi
  chmod -R u+w "$W" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
cleanup
mkdir -p "$W/etc" "$W/store" "$W/state" "$W/log"
chmod 755 "$W" "$W/state"
cat > "$W/etc/nix.conf" <<CONF
build-users-group =
sandbox = false
substituters =
trusted-users = root
require-sigs = true
experimental-features = nix-command ca-derivations
CONF
export NIX_STORE_DIR=$W/store NIX_STATE_DIR=$W/state NIX_LOG_DIR=$W/log NIX_CONF_DIR=$W/etc NIX_USER_CONF_FILES=$W/etc/nix.conf NIX_REMOTE=local

hash_of() { sha256sum "$1" | cut -d' ' -f1; }
nix32_of() { nix-hash --type sha256 --to-base32 "$(hash_of "$1")"; }
export WG_HELLO_NAR=$here/hello-file.nar WG_DIR_NAR=$here/dir.nar
export WG_HELLO_HASH=$(hash_of "$WG_HELLO_NAR") WG_DIR_HASH=$(hash_of "$WG_DIR_NAR")
export WG_HELLO=$(nix-store --print-fixed-path --recursive sha256 "$WG_HELLO_HASH" hello)
export WG_DIR=$(nix-store --print-fixed-path --recursive sha256 "$WG_DIR_HASH" dir)
export WG_HELLO_CA=fixed:r:sha256:$(nix32_of "$WG_HELLO_NAR") WG_DIR_CA=fixed:r:sha256:$(nix32_of "$WG_DIR_NAR")
export WG_IA=$W/store/11111111111111111111111111111111-ia
export WG_BAD=$W/store/22222222222222222222222222222222-bad
export WG_MISSING=$W/store/33333333333333333333333333333333-missing

cat > "$W/drv.nix" <<'NIX'
let mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" script ]; PATH = "/bin:/usr/bin"; };
in { ok = mk "worker-ok" "echo building worker-ok; echo hello > $out"; fail = mk "worker-fail" "echo failing on purpose; exit 1"; }
NIX
export WG_DRV_OK=$(nix-instantiate "$W/drv.nix" -A ok) WG_DRV_FAIL=$(nix-instantiate "$W/drv.nix" -A fail)
export WG_SHOW=$W/show.json
nix show-derivation "$WG_DRV_OK" "$WG_DRV_FAIL" > "$WG_SHOW"
if [ -z "$CH" ]; then
  cp "$WG_DRV_OK" "$here/worker-ok.drv"; cp "$WG_DRV_FAIL" "$here/worker-fail.drv"; chmod 644 "$here"/worker-*.drv
  nix_daemon() { nix-daemon "$@"; }
else
  source "$repo/tests/lib/chroots.sh"
  # The chroot's programs, on $W with the same environment.
  ch_env=(-b "$W:$W")
  for v in NIX_STORE_DIR NIX_STATE_DIR NIX_LOG_DIR NIX_CONF_DIR NIX_USER_CONF_FILES NIX_REMOTE; do ch_env+=(-e "$v=${!v}"); done
  in_ch() { ch_run "$CH" "${ch_env[@]}" -- "$@"; }
  nix_daemon() { in_ch nix-daemon "$@"; }
  # A store made by the chroot's Nix, with the same two derivations.
  chmod -R u+w "$W/store"; rm -rf "$W/store" "$W/state" "$W/log"; mkdir -p "$W/store" "$W/state" "$W/log"; chmod 755 "$W/state"
  [ "$(in_ch nix-instantiate "$W/drv.nix" -A ok)" = "$WG_DRV_OK" ] && [ "$(in_ch nix-instantiate "$W/drv.nix" -A fail)" = "$WG_DRV_FAIL" ] \
    || { echo "the chroot's nix-instantiate made other derivations" >&2; exit 1; }
  cmp "$WG_DRV_OK" "$here/worker-ok.drv" && cmp "$WG_DRV_FAIL" "$here/worker-fail.drv"
  WG_DAEMON=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \
    bash -c 'source "$1"; shift; ch_run "$@"' _ "$repo/tests/lib/chroots.sh" "$CH" "${ch_env[@]}" -- nix-daemon --stdio)
  export WG_DAEMON
fi

python3 "$here/record-worker.py" trusted "$W/trusted"

if [ -z "$CH" ]; then
  nix-daemon > "$W/daemon.log" 2>&1 &
else
  setsid bash -c 'source "$1"; shift; ch_run "$@"' _ "$repo/tests/lib/chroots.sh" "$CH" "${ch_env[@]}" -- nix-daemon > "$W/daemon.log" 2>&1 &
fi
daemon_pid=$!
for _ in $(seq 50); do [ -S "$W/state/daemon-socket/socket" ] && break; sleep 0.1; done
chmod 755 "$W/state/daemon-socket"
mkdir -m 777 "$W/out"
setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 "$here/record-worker.py" untrusted "$W/out/untrusted" "$W/state/daemon-socket/socket"

v=$(nix_daemon --version | awk '{print $NF}' | cut -d. -f1,2)
cp "$W/out/untrusted-s2c.bin" "$here/worker-$v-untrusted-s2c.bin"
cp "$W/trusted-s2c.bin" "$here/worker-$v-trusted-s2c.bin"
cp "$W/trusted-c2s.bin" "$here/worker-$v-trusted-c2s.bin"
ls -l "$here"/worker-*
