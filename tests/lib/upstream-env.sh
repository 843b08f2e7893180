#!/usr/bin/env bash
# Run Nix's own functional tests (tests/functional/*.sh of a Nix 2.2x/2.3x
# source tree, meson era) against the INSTALLED Nix (nix-bin), without
# building Nix: this generates what meson's configure step would have
# generated (<build>/config.nix and <build>/common/subst-vars.sh) from the
# installed programs, then runs each named test as meson does
# (`bash -x -e -u -o pipefail TEST` in tests/functional, with
# _NIX_TEST_SOURCE_DIR, _NIX_TEST_BUILD_DIR, TEST_NAME, NIX_REMOTE= and PS4).
#
# Meant to run inside a chroot made by tests/lib/chroots.sh (ch_upstream_test
# calls it there), but only needs bash, the nix programs on PATH, a static
# busybox and the source tree:
#
#   upstream-env.sh [TEST...]        e.g. build-remote-input-addressed
#                                    (".sh" optional; none: every test whose
#                                    name contains "build-remote")
# Environment:
#   NIX_SRC          the Nix source tree (default /src/nix)
#   NIX_TESTS_BUILD  where the generated files go (default /tmp/nix-tests-build)
#   NIX_TESTS_LOGS   one log per test: LOGS/<test>.log (default /var/log/nix-upstream-tests)
#   BUSYBOX          a static busybox (default: `command -v busybox`)
#   NIX_TESTS_TIMEOUT  seconds per test (default 300, as meson)
#   BH_HOOK          the build hook to test (added to the tests' settings as
#                    `build-hook = BH_HOOK`); unset: Nix's built-in one
#   BH_REWRITE_SSH_NG=1  run a copy of the tests with `ssh-ng://` builders
#                    rewritten to `ssh://` (same host and parameters)
#
# Prints one line per test: PASS / FAIL / SKIP (exit 77, meson's skip code;
# 99 is meson's "hard error" and counts as FAIL), with the time and the log's
# path; the exit status is 1 if any test failed.
#
# NIX_STORE is set empty: common/vars.sh reads it under `set -u` (meson runs
# upstream inside a Nix build env, where stdenv sets it; a non-empty value
# would set _NIX_TEST_NO_SANDBOX); Nix ignores an empty NIX_STORE.
#
# busybox: the tests pass `--arg busybox $busybox`, a path literal, so the
# file is copied into the store as /nix/store/<hash>-busybox and run as the
# builder with argv[0] "<hash>-busybox" and args "sh -e <script>". nixpkgs'
# busybox has a patch (busybox-in-store.patch) for exactly that name; Debian's
# does not ("<hash>-busybox: applet not found"). So $busybox here is a
# two-line script <build>/busybox, `#!<real static busybox> sh` + `exec <real
# busybox> "$@"`, and the real one (not in the store) is made visible in the
# sandbox with one setting added to the tests' own nix.conf, through
# NIX_CONFIG, which the builder-side nix-store --serve / nix-daemon --stdio
# children (ssh://localhost runs them directly) inherit too:
#   extra-sandbox-paths = <real busybox>
# (The build-remote tests build in chroot stores, --store $TEST_ROOT/machineN,
# which Nix always builds in its sandbox.)
set -u

SRC=${NIX_SRC:-/src/nix}
FDIR=$SRC/tests/functional
BUILD=${NIX_TESTS_BUILD:-/tmp/nix-tests-build}
if [ "${BH_REWRITE_SSH_NG:-0}" = 1 ]; then
  rm -rf "$BUILD/functional-rewritten"; mkdir -p "$BUILD"
  cp -a "$FDIR" "$BUILD/functional-rewritten"
  FDIR=$BUILD/functional-rewritten
  # Only the shared body of the three build-remote-* tests: the trustless
  # tests need a daemon on the builder (ssh-ng with remote-program
  # nix-daemon), and build-remote-with-mounted-ssh-ng does not use the hook.
  sed -i 's|ssh-ng://|ssh://|g' "$FDIR/build-remote.sh"
fi
settings="extra-sandbox-paths = PLACEHOLDER"
[ -n "${BH_HOOK:-}" ] && settings+=$'\n'"build-hook = $BH_HOOK"
LOGS=${NIX_TESTS_LOGS:-/var/log/nix-upstream-tests}
TIMEOUT=${NIX_TESTS_TIMEOUT:-300}

die() { echo "upstream-env: $*" >&2; exit 2; }
[ -f "$FDIR/common/vars.sh" ] && [ -f "$FDIR/common/subst-vars.sh.in" ] ||
  die "$FDIR is not a meson-era Nix functional test tree (Nix 2.8's tests/ use common.sh.in and exit 99 to skip; not handled here)"

nix_bin=$(command -v nix) || die "no nix on PATH"
real_busybox=$(readlink -f "${BUSYBOX:-$(command -v busybox)}") || die "no busybox (Debian: busybox-static)"
"$real_busybox" --list 2>/dev/null | grep -qx sh || die "$real_busybox has no sh applet"
if ldd "$real_busybox" >/dev/null 2>&1; then die "$real_busybox is dynamically linked; the sandbox needs a static one"; fi
mkdir -p "$BUILD"
busybox=$BUILD/busybox   # the tests require the path to match /busybox/
printf '#!%s sh\nexec %s "$@"\n' "$real_busybox" "$real_busybox" > "$busybox"; chmod 755 "$busybox"

# The values meson's test_confdata would have (tests/functional/meson.build).
bindir=$(dirname "$nix_bin")
coreutils=$(dirname "$(command -v ls)")
bash_path=$(command -v bash)
dot=$(command -v dot || true)
version=$(cat "$FDIR/.version" 2>/dev/null || "$nix_bin" --version | awk '{print $3}')
system=$("$nix_bin" --extra-experimental-features nix-command config show system 2>/dev/null || echo "$(uname -m)-linux")

subst() { # IN OUT
  sed -e "s|@bindir@|$bindir|g" -e "s|@coreutils@|$coreutils|g" -e "s|@dot@|$dot|g" \
      -e "s|@bash@|$bash_path|g" -e "s|@sandbox_shell@|$busybox|g" \
      -e "s|@PACKAGE_VERSION@|$version|g" -e "s|@system@|$system|g" "$1" > "$2"
}
mkdir -p "$BUILD/common" "$LOGS"
# The tests' chroot stores keep /nix/store as their logical store dir, and
# `readlink -f $TEST_ROOT/result` (-> /nix/store/<out>, which exists only
# under $TEST_ROOT/machine0) prints nothing unless /nix/store itself exists.
mkdir -p /nix/store
subst "$FDIR/config.nix.in" "$BUILD/config.nix"
subst "$FDIR/common/subst-vars.sh.in" "$BUILD/common/subst-vars.sh"
# Subdirectories (ca/, dyn-drv/, ...) get their own config.nix in meson's build tree.
for d in "$FDIR"/*/; do
  d=${d%/}; [ -f "$d/config.nix.in" ] || continue
  mkdir -p "$BUILD/${d##*/}"; subst "$d/config.nix.in" "$BUILD/${d##*/}/config.nix"
done

if [ $# -eq 0 ]; then
  set -- $(cd "$FDIR" && ls *build-remote*.sh | grep -v -e '^build-remote.sh$' -e '^build-remote-trustless.sh$' -e '^build-remote-trustless-after.sh$')
fi

# 2.26: TEST_NAME=suite/name; 2.28+: TEST_SUITE_NAME=suite, TEST_NAME=name.
split_names=; grep -q TEST_SUITE_NAME "$FDIR/common/test-root.sh" && split_names=1

failed=0
for t in "$@"; do
  t=${t%.sh}
  [ -f "$FDIR/$t.sh" ] || { echo "MISSING $t"; failed=1; continue; }
  case $t in */*) sub=${t%/*} ;; *) sub= ;; esac
  workdir=$FDIR${sub:+/$sub}
  builddir=$BUILD${sub:+/$sub}
  if [ -n "$sub" ] && [ ! -e "$builddir/common" ]; then ln -sfn ../common "$builddir/common"; fi
  suite=${sub:-main}; name=${t##*/}
  if [ -n "$split_names" ]; then tn=(TEST_SUITE_NAME="$suite" TEST_NAME="$name"); else tn=(TEST_NAME="$suite/$name"); fi
  log=$LOGS/${t//\//-}.log
  start=$(date +%s)
  (
    cd "$workdir" &&
    exec env _NIX_TEST_SOURCE_DIR="$workdir" _NIX_TEST_BUILD_DIR="$builddir" "${tn[@]}" \
      NIX_STORE= NIX_REMOTE= PS4='+(${BASH_SOURCE[0]-$0}:$LINENO) ' \
      NIX_CONFIG="${settings/PLACEHOLDER/$real_busybox}" \
      timeout -k 10 "$TIMEOUT" "$bash_path" -x -e -u -o pipefail "$workdir/${t##*/}.sh"
  ) </dev/null >"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  case $rc in
    0) res=PASS ;;
    77) res=SKIP ;;
    124) res=FAIL; echo "(timed out after ${TIMEOUT}s)" >>"$log" ;;
    *) res=FAIL ;;
  esac
  [ $res = FAIL ] && failed=1
  printf '%-4s %-45s %4ss rc=%-3s nix %s  %s\n' "$res" "$t" "$took" "$rc" "$version" "$log"
done
exit $failed
