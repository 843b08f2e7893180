#!/usr/bin/env bash
# Debian chroots with a newer Nix than the host's (trixie: 2.26, sid: 2.34),
# each with the Nix source package of its own version unpacked in /src/nix,
# so that Nix's own functional tests can run there against the installed
# nix-bin (see tests/lib/upstream-env.sh). Source this file.
#
#   ch_make NAME SUITE      debootstrap SUITE into $BH_CHROOTS/NAME (idempotent:
#                           reused when its .bh-complete stamp exists), install
#                           nix-bin & co inside and `apt-get source nix`
#   ch_run NAME [-b HOST:INNER[:ro]]... [-e VAR=VAL]... [--] CMD...
#                           run CMD inside the chroot (see below)
#   ch_dir NAME             the chroot's directory
#   ch_versions NAME        print the chroot's Debian suite, nix-bin version, /src/nix
#   ch_upstream_test NAME [TEST...]  run Nix's own functional tests in the chroot
#                           (tests/lib/upstream-env.sh), PASS/FAIL/SKIP per test
#   ch_serve NAME PROG ARGS...  the chroot's `nix-store --serve --write` /
#                           `nix-daemon --stdio` for the host (stdin/stdout passed through)
#   bash chroots.sh FUNC ARGS...  the same functions as a command (ch_FUNC)
#
# ch_run runs CMD in a private mount namespace (`unshare -m --propagation
# private`): proc, /dev (recursively, so /dev/pts and /dev/shm too), /sys and
# the -b binds are mounted there only and vanish with the namespace, so
# nothing can leak onto the host's /proc, /dev, ... and there is nothing to
# unmount. The chroot's directory is entered with pivot_root, not chroot(2):
# a chrooted process may not create user namespaces (clone(CLONE_NEWUSER)
# fails with EPERM), and Nix's sandbox needs them when no build users are
# configured. The environment is reset to PATH, HOME=/root, TERM, LANG=C.UTF-8
# plus the -e assignments.
#
# Nothing here touches the host's apt sources: the suites are only named on
# debootstrap's command line and in the chroot's own sources.list.
set -u

BH_CHROOTS=${BH_CHROOTS:-/var/cache/bh-chroots}
BH_MIRROR=${BH_MIRROR:-http://deb.debian.org/debian}
# What the chroots get: Nix, a static busybox for the tests' derivations,
# sshd/ssh for remote builders, zstd, ps/pkill; jq, git, man, xz, curl are used
# by some of Nix's functional tests; mount for umount; dpkg-dev for
# `apt-get source`.
CH_PACKAGES=(nix-bin busybox-static openssh-server openssh-client zstd procps
  jq git man-db xz-utils bzip2 gzip curl ca-certificates mount dpkg-dev)

ch_dir() { echo "$BH_CHROOTS/$1"; }

ch_log() { echo "chroots: $*" >&2; }

# The part of ch_run that runs in the new mount namespace.
_ch_inner() {
  local r=$1; shift
  local -a binds=() envs=()
  while [ $# -gt 0 ]; do
    case $1 in
      -b) binds+=("$2"); shift 2 ;;
      -e) envs+=("$2"); shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || set -- /bin/bash
  mount --bind "$r" "$r" || return 1
  mount -t proc proc "$r/proc" || return 1
  mount --rbind /dev "$r/dev" || return 1
  mount --rbind /sys "$r/sys" || return 1
  mount -t tmpfs -o mode=0755 tmpfs "$r/run" || return 1
  local b host inner ro
  for b in "${binds[@]}"; do
    IFS=: read -r host inner ro <<<"$b"
    if [ -d "$host" ]; then mkdir -p "$r$inner"; else mkdir -p "$(dirname "$r$inner")"; touch "$r$inner"; fi
    mount --bind "$host" "$r$inner" || return 1
    [ "$ro" = ro ] && { mount -o remount,bind,ro "$r$inner" || return 1; }
  done
  cd "$r" || return 1
  mkdir -p .bh-oldroot
  pivot_root . .bh-oldroot || return 1
  # From here on only the chroot's own binaries. Detach the host's tree
  # (lazily: it is busy until this shell execs).
  exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 "${envs[@]}" \
    /bin/sh -c 'cd /; if [ -x /usr/bin/umount ] || [ -x /bin/umount ]; then umount -l /.bh-oldroot; fi; exec "$@"' sh "$@"
}

ch_run() {
  local name=$1; shift
  local r; r=$(ch_dir "$name")
  [ -x "$r/bin/sh" ] || { ch_log "no chroot at $r (ch_make $name SUITE first)"; return 1; }
  unshare -m --propagation private -- bash -c "$(declare -f _ch_inner); _ch_inner \"\$@\"" _ "$r" "$@"
}

# The chroot's Nix programs, called from the host with stdin/stdout passed
# through, e.g. as a builder's remote program (Nix 2.34 serving a store at the
# chroot's /nix):
#   ch_serve sid nix-store --serve --write      ch_serve sid nix-daemon --stdio
#   bash tests/lib/chroots.sh serve sid nix-store --serve --write   (the same, as a command)
# This is ch_run, not chroot(8): under a plain chroot the 2.26/2.34 programs
# die at start ("reading symbolic link /proc/self/exe"); with /proc but no
# /dev a build fails ("opening pseudoterminal master: No such device"); with
# both, builds run but silently unsandboxed (a chrooted process gets EPERM
# from clone(CLONE_NEWUSER) and sandbox-fallback = true kicks in).
ch_serve() {
  local name=$1; shift
  ch_run "$name" -- "$@"
}

# Whether Nix's functional tests (the source of the chroot's Nix) are there.
ch_has_tests() { [ -d "$(ch_dir "$1")/src/nix/tests/functional" ]; }

# The chroot's Nix version, e.g. 2.34.8.
ch_nix_version() {
  local v; v=$(chroot "$(ch_dir "$1")" dpkg-query -W -f '${Version}' nix-bin 2>/dev/null); v=${v%%+*}; echo "${v%%-*}"
}

ch_versions() {
  local r; r=$(ch_dir "$1")
  printf '%s: %s (%s), nix-bin %s, source %s\n' "$1" \
    "$(cat "$r/.bh-suite" 2>/dev/null)" "$(cat "$r/etc/debian_version" 2>/dev/null)" \
    "$(chroot "$r" dpkg-query -W -f '${Version}' nix-bin 2>/dev/null)" \
    "$(readlink "$r/src/nix" 2>/dev/null)"
}

# The Nix source of the chroot's nix-bin version, unpacked in /src/nix-<version>
# with /src/nix pointing at it: `apt-get source nix` (the Debian source
# package: upstream minus non-free bits, plus Debian's patches). When the
# mirror does not have it (seen: sid's Sources index names
# nix_2.34.8+dfsg-1.dsc but the pool answers 404), the upstream tag
# <version> from the git directory $BH_NIX_GIT (a clone of NixOS/nix) is
# used instead.
_ch_source() {
  local name=$1 r t0 ver
  r=$(ch_dir "$name"); t0=$SECONDS
  ch_log "$name: apt-get source nix (log: $r.source.log)"
  if ch_run "$name" -- sh -c '
      set -e; mkdir -p /src; cd /src; rm -rf nix nix-*/ nix_*
      apt-get source -q nix
      ln -sfn "$(ls -d nix-*/ | sed "s:/\$::" | head -1)" nix
      test -d nix/tests/functional' >"$r.source.log" 2>&1; then
    ch_log "$name: apt-get source took $((SECONDS - t0))s"
    return 0
  fi
  ver=$(chroot "$r" dpkg-query -W -f '${Version}' nix-bin); ver=${ver%%+*}; ver=${ver%%-*}
  # A NixOS/nix git directory: $BH_NIX_GIT, else a mirror this machine may keep.
  if [ -z "${BH_NIX_GIT:-}" ] && [ -d /work/.mirror/NixOS+nix/repo ]; then BH_NIX_GIT=/work/.mirror/NixOS+nix/repo; fi
  if [ -n "${BH_NIX_GIT:-}" ] && git --git-dir="$BH_NIX_GIT" rev-parse -q --verify "refs/tags/$ver" >/dev/null; then
    ch_log "$name: apt-get source failed (see $r.source.log); using tag $ver of $BH_NIX_GIT"
    rm -rf "$r/src/nix" "$r/src/nix-$ver"; mkdir -p "$r/src/nix-$ver"
    git --git-dir="$BH_NIX_GIT" archive "refs/tags/$ver" | tar -x -C "$r/src/nix-$ver" || return 1
    ln -sfn "nix-$ver" "$r/src/nix"
    return 0
  fi
  ch_log "$name: apt-get source failed (see $r.source.log) and no tag $ver in \$BH_NIX_GIT (a git clone of NixOS/nix)"
  tail -5 "$r.source.log" >&2
  return 1
}

ch_make() {
  local name=$1 suite=$2 r t0
  r=$(ch_dir "$name")
  if [ -f "$r/.bh-complete" ]; then
    # A chroot made when no Nix source could be had (say, before a NixOS/nix
    # git directory existed here) gets it now.
    ch_has_tests "$name" || _ch_source "$name" || ch_log "$name: still no Nix source"
    ch_versions "$name"; return 0
  fi
  command -v debootstrap >/dev/null || {
    ch_log "installing debootstrap on the host"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2 || return 1
  }
  command -v unshare >/dev/null && command -v pivot_root >/dev/null || { ch_log "need util-linux"; return 1; }
  mkdir -p "$BH_CHROOTS"
  if [ ! -f "$r/.bh-debootstrapped" ]; then
    # Half-made: start again. (No mounts can be left under $r: everything
    # mounted there lived in a private namespace.)
    rm -rf "$r"
    ch_log "debootstrap --variant=minbase $suite $r (log: $r.debootstrap.log)"
    t0=$SECONDS
    unshare -m --propagation private -- \
      debootstrap --variant=minbase "$suite" "$r" "$BH_MIRROR" >"$r.debootstrap.log" 2>&1 || {
      ch_log "debootstrap failed; see $r.debootstrap.log"; tail -5 "$r.debootstrap.log" >&2; return 1; }
    echo "$suite" > "$r/.bh-suite"
    touch "$r/.bh-debootstrapped"
    ch_log "debootstrap took $((SECONDS - t0))s"
  fi
  # apt inside the chroot only: the suite's main + deb-src, no Valid-Until
  # check (sid's Release can count as expired on a dated mirror), no
  # recommends, and no daemons started by maintainer scripts.
  printf 'deb %s %s main\ndeb-src %s %s main\n' "$BH_MIRROR" "$suite" "$BH_MIRROR" "$suite" > "$r/etc/apt/sources.list"
  rm -f "$r/etc/apt/sources.list.d/debian.sources"
  printf 'Acquire::Check-Valid-Until "false";\nAPT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$r/etc/apt/apt.conf.d/99bh"
  printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
  cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
  if [ ! -f "$r/.bh-installed" ]; then
    t0=$SECONDS
    ch_log "$name: apt-get install ${CH_PACKAGES[*]} (log: $r.install.log)"
    ch_run "$name" -e DEBIAN_FRONTEND=noninteractive -- sh -c "
      set -e
      apt-get update -q
      apt-get install -y -q ${CH_PACKAGES[*]}
      apt-get clean
    " >"$r.install.log" 2>&1 || { ch_log "install failed; see $r.install.log"; tail -15 "$r.install.log" >&2; return 1; }
    touch "$r/.bh-installed"
    ch_log "$name: install took $((SECONDS - t0))s"
  fi
  # Without its source the chroot still serves as a client or builder; only
  # Nix's functional tests cannot run there (ch_has_tests says so).
  if [ ! -e "$r/src/nix/tests/functional" ]; then
    _ch_source "$name" || ch_log "$name: no Nix source: Nix's own tests cannot run in this chroot"
  fi
  # Nix: no build users (the tests run as root without nixbld), no substituters.
  mkdir -p "$r/etc/nix"
  [ -f "$r/etc/nix/nix.conf.bh-orig" ] || cp "$r/etc/nix/nix.conf" "$r/etc/nix/nix.conf.bh-orig" 2>/dev/null || true
  printf 'build-users-group =\nsubstituters =\nexperimental-features = nix-command\n' > "$r/etc/nix/nix.conf"
  mkdir -p "$r/nix/store" "$r/nix/var/nix"
  touch "$r/.bh-complete"
  ch_versions "$name"
  du -sh "$r" >&2
}

# Run Nix's own functional tests of the chroot's Nix version inside the
# chroot, against its installed nix-bin (tests/lib/upstream-env.sh, bound
# read-only at /usr/local/bin/bh-upstream-test). Logs stay in the chroot:
# $BH_CHROOTS/NAME/var/log/nix-upstream-tests/<test>.log.
#   ch_upstream_test sid build-remote-input-addressed
#   ch_upstream_test trixie            # every *build-remote* test
ch_upstream_test() {
  local name=$1; shift
  local here; here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
  local -a hook=()
  # The hook under test is bound at /opt/bh/build-hook.
  if [ -n "${BH_HOOK:-}" ]; then hook=(-b "$BH_HOOK:/opt/bh/build-hook:ro" -e BH_HOOK=/opt/bh/build-hook); fi
  ch_run "$name" -b "$here/upstream-env.sh:/usr/local/bin/bh-upstream-test:ro" "${hook[@]}" \
    ${NIX_TESTS_TIMEOUT:+-e NIX_TESTS_TIMEOUT=$NIX_TESTS_TIMEOUT} \
    ${BH_REWRITE_SSH_NG:+-e BH_REWRITE_SSH_NG=$BH_REWRITE_SSH_NG} \
    ${NIX_TESTS_LOGS:+-e NIX_TESTS_LOGS=$NIX_TESTS_LOGS} \
    -- bash /usr/local/bin/bh-upstream-test "$@"
}

# Executed rather than sourced: `bash chroots.sh FUNC ARGS...` runs ch_FUNC.
if [[ "${BASH_SOURCE[0]}" == "$0" ]] && [ $# -gt 0 ]; then
  f=ch_$1; shift
  declare -F "$f" >/dev/null || { echo "usage: $0 make|run|serve|versions|upstream_test|dir ARGS..." >&2; exit 2; }
  "$f" "$@"
fi
