#!/usr/bin/env bash
# Conformance: Nix's own functional tests for remote builds, taken from the
# Nix source at the tag of the Nix under test, run with
# `build-hook = target/release/build-hook`:
#   Nix 2.8.0   the host's nix-bin (Debian bookworm), tests from bookworm's
#               `nix` source package
#   Nix 2.26.3  a Debian trixie chroot (tests/lib/chroots.sh), its own source
#   Nix 2.34.8  a Debian sid chroot, its own source
# The chroots are made on first use with debootstrap (about 2 minutes each)
# and kept in $BH_CHROOTS (default /var/cache/bh-chroots).
#
# Prints one line per upstream test per Nix version, then
# "N passed, N failed, N expected to fail, N skipped". Exit status 1 if a
# test failed that was not expected to, or an expected failure passed.
#
#   bash tests/conformance.sh                  # everything
#   BH_CONFORMANCE_VERSIONS="2.8 2.34" bash tests/conformance.sh
#   BH_CONFORMANCE_HOOK=nix bash tests/conformance.sh   # Nix's own hook, for comparison
#   BH_NIX_GIT=/path/to/nix.git  a NixOS/nix git directory, for a version whose
#               source the package archive lacks (its tag is used)
#
# Every test runs as written, `ssh-ng://` builders included (build-hook
# reaches their nix-daemon through its bridge). BH_REWRITE_SSH_NG=1 rewrites
# the `ssh-ng://` line of build-remote.sh to `ssh://` (as this suite did
# before build-hook spoke the daemon protocol).
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
source tests/lib/chroots.sh
source tests/lib/testbed.sh

VERSIONS=${BH_CONFORMANCE_VERSIONS:-2.8 2.26 2.34}
HOOK=${BH_CONFORMANCE_HOOK:-$ROOT/target/release/build-hook}
WORK=${BH_CONFORMANCE_WORK:-/tmp/bh-conformance}
LOGS=$WORK/logs
mkdir -p "$LOGS"
export BH_REWRITE_SSH_NG=${BH_REWRITE_SSH_NG:-0}
# Tests expected to fail (none now): " name name ".
XFAIL=" "

pass=0 fail=0 xfail=0 skip=0 bad=0
result() { # VERSION TEST RES SECS LOG
  local v=$1 t=$2 res=$3 note=
  if [ "$BH_REWRITE_SSH_NG" = 1 ]; then
    case $t in build-remote-input-addressed|build-remote-content-addressed-*) note=" (ssh-ng line rewritten to ssh)" ;; esac
  fi
  if [[ $XFAIL == *" $t "* ]]; then
    case $res in
      FAIL) res=XFAIL; xfail=$((xfail + 1)) ;;
      PASS) res=XPASS; bad=1; fail=$((fail + 1)) ;;
    esac
  else
    case $res in
      PASS) pass=$((pass + 1)) ;;
      SKIP) skip=$((skip + 1)) ;;
      *) fail=$((fail + 1)); bad=1 ;;
    esac
  fi
  printf '%-5s nix %-7s %-42s %4ss%s  %s\n' "$res" "$v" "$t" "$4" "$note" "$5"
}

if [ "$HOOK" != nix ] && [ ! -x "$HOOK" ]; then
  echo "conformance: $HOOK is missing; run 'cargo build --release' first" >&2; exit 2
fi
tb_install
mkdir -p /nix/store

run_2_8() {
  command -v busybox >/dev/null || [ -x /bin/busybox ] || { apt-get install -y -qq busybox-static >&2 || return 1; }
  command -v gcc >/dev/null || { apt-get install -y -qq gcc libc6-dev >&2 || return 1; }
  local src=$WORK/src-2.8 ver
  ver=$(nix-store --version | awk '{print $3}')
  if [ ! -d "$src/tests" ]; then
    # bookworm's source package, fetched with a private apt state (the host's
    # sources are not touched).
    local apt=$WORK/apt-2.8
    rm -rf "$apt" "$src"; mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$src"
    local suite; suite=$(. /etc/os-release; echo "${VERSION_CODENAME:-bookworm}")
    echo "deb-src http://deb.debian.org/debian $suite main" > "$apt/sources.list"
    local o=(-o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$apt/lists" -o Dir::Cache::Archives="$apt/archives")
    { apt-get "${o[@]}" update -qq && (cd "$apt" && apt-get "${o[@]}" source --download-only -qq "nix=$(dpkg-query -W -f '${source:Version}' nix-bin)"); } >"$LOGS/source-2.8.log" 2>&1 || {
      echo "conformance: cannot fetch the source of nix $ver (see $LOGS/source-2.8.log)" >&2; return 1; }
    tar -xf "$apt"/nix_*.orig.tar.* -C "$src" --strip-components=1 || return 1
  fi
  local t rc t0
  for t in build-remote-input-addressed build-remote-content-addressed-fixed build-remote-content-addressed-floating binary-cache-build-remote; do
    t0=$SECONDS
    timeout -k 10 300 bash tests/lib/upstream-2.8.sh "$src/tests" "$WORK/run-2.8" "$t.sh" "$HOOK" >"$LOGS/2.8-$t.log" 2>&1 </dev/null
    rc=$?
    case $rc in 0) r=PASS ;; 99) r=SKIP ;; *) r=FAIL ;; esac
    result "$ver" "$t" "$r" $((SECONDS - t0)) "$LOGS/2.8-$t.log"
  done
}

run_chroot() { # NAME SUITE
  local name=$1 suite=$2 ver line
  ch_make "$name" "$suite" >"$LOGS/chroot-$name.log" 2>&1 || { echo "conformance: cannot make the $suite chroot (see $LOGS/chroot-$name.log)" >&2; return 1; }
  ver=$(ch_nix_version "$name")
  if ! ch_has_tests "$name"; then
    skip=$((skip + 1))
    printf 'SKIP  nix %-7s %-42s  the package archive has no source for nix %s (set BH_NIX_GIT to a NixOS/nix git directory)\n' "$ver" "(all tests)" "$ver"
    return 0
  fi
  local hookarg=()
  [ "$HOOK" != nix ] && hookarg=("$HOOK")
  # upstream-env.sh prints: RES TEST SECS rc=N nix VER LOG
  while read -r res t secs _ _ _ log; do
    case $res in PASS|FAIL|SKIP|MISSING) ;; *) continue ;; esac
    cp "$(ch_dir "$name")$log" "$LOGS/$ver-$t.log" 2>/dev/null
    result "$ver" "$t" "$res" "${secs%s}" "$LOGS/$ver-$t.log"
  done < <(BH_HOOK=${hookarg[0]:-} NIX_TESTS_LOGS=/var/log/nix-upstream-tests ch_upstream_test "$name" 2>&1)
}

for v in $VERSIONS; do
  case $v in
    2.8) run_2_8 || { fail=$((fail + 1)); bad=1; } ;;
    2.26) run_chroot trixie trixie || { fail=$((fail + 1)); bad=1; } ;;
    2.34) run_chroot sid sid || { fail=$((fail + 1)); bad=1; } ;;
    *) echo "conformance: unknown version $v (2.8, 2.26, 2.34)" >&2; bad=1 ;;
  esac
done
echo "$pass passed, $fail failed, $xfail expected to fail, $skip skipped (hook: $HOOK; logs: $LOGS)"
exit $bad
