#!/usr/bin/env bash
# Runs one of Nix 2.8.0's own functional tests (from Debian bookworm's `nix`
# source package) against the installed nix-bin, the way Nix's `make
# installcheck` runs it: configure the test directory's templates from the
# installed Nix, run `init.sh`, then `bash -e TEST`.
#
#   upstream-2.8.sh SRC_TESTS_DIR WORK_DIR TEST HOOK
#
# SRC_TESTS_DIR  the `tests/` directory of the unpacked source (read only)
# WORK_DIR       scratch directory (its tests/ copy is made afresh)
# TEST           e.g. build-remote-input-addressed.sh
# HOOK           the build hook to put in the test's nix.conf, or "nix" for
#                Nix's built-in one
# Exit status: the test's (0 pass, 99 skip, other fail).
set -u
src=$1 work=$2 test=$3 hook=$4

rm -rf "$work/tests"
mkdir -p "$work"
cp -a "$src" "$work/tests"
cd "$work/tests" || exit 2

# The static busybox the tests build with. Builds in a store under another
# root run in a sandbox, which sees the host only through sandbox-paths: the
# busybox lives in a directory of its own that is mounted there, under a name
# that contains "busybox" (the tests check that).
# `--arg busybox PATH` copies the file into the store under a hashed name,
# from which busybox cannot tell its applet (nixpkgs patches busybox for this);
# a tiny static wrapper runs the real one as "busybox".
bb_dir=$work/busybox
mkdir -p "$bb_dir"
cp /bin/busybox "$bb_dir/busybox.real"
printf '#include <unistd.h>\nint main(int c, char **v) { (void)c; v[0] = "busybox"; execv("%s", v); return 127; }\n' \
  "$bb_dir/busybox.real" > "$bb_dir/wrapper.c"
gcc -static -Os -o "$bb_dir/busybox" "$bb_dir/wrapper.c" || exit 2
system=$(uname -m)-linux

subst() {
  sed -e "s|@bindir@|/usr/bin|g" -e "s|@coreutils@|/usr/bin|g" -e "s|@dot@||g" \
      -e "s|@bash@|/bin/bash|g" -e "s|@sandbox_shell@|$bb_dir/busybox|g" \
      -e "s|@PACKAGE_VERSION@|2.8.0|g" -e "s|@system@|$system|g" \
      -e "s|@BUILD_SHARED_LIBS@|1|g" "$1" > "${1%.in}"
}
for f in *.in; do subst "$f"; done
# Until build-hook speaks the daemon protocol, `ssh-ng://` builders are
# rewritten to `ssh://` (same host, same parameters) when asked.
if [ "${BH_REWRITE_SSH_NG:-0}" = 1 ]; then
  sed -i 's|ssh-ng://|ssh://|g' build-remote.sh
fi

export TEST_NAME=${test%.sh}
export TMPDIR=$work/tmp
mkdir -p "$TMPDIR"
unset NIX_CONFIG NIX_REMOTE NIX_REMOTE_SYSTEMS NIX_CURRENT_LOAD
export NIX_REMOTE=

# init.sh writes the test's nix.conf; the hook and the sandbox paths are added
# to it, as a user would in their own nix.conf.
bash -e init.sh >"$work/init.log" 2>&1 || { echo "init.sh failed: see $work/init.log"; exit 2; }
conf="$TMPDIR/nix-test/$TEST_NAME/etc/nix.conf"
{
  echo "extra-sandbox-paths = $bb_dir"
  [ "$hook" = nix ] || echo "build-hook = $hook"
} >> "$conf"
exec bash -e "$test"
