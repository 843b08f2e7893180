#!/usr/bin/env bash
# A tiny test harness: `t_run NAME FUNC` runs FUNC with its output in a log,
# counts passes and failures, and `t_summary` prints "N passed, M failed".
set -u
T_PASS=0; T_FAIL=0; T_FAILED=()
T_LOGS=${T_LOGS:-/tmp/bh-e2e-logs}
mkdir -p "$T_LOGS"

# Each test runs in its own subshell, so `fail` ends the test there.
fail() { echo "ASSERTION FAILED: $*"; exit 1; }
# assert_contains FILE TEXT
assert_contains() { grep -qF -- "$2" "$1" || fail "'$1' does not contain '$2'"; }
assert_not_contains() { ! grep -qF -- "$2" "$1" || fail "'$1' contains '$2'"; }

t_run() {
  local name=$1 fn=$2 log="$T_LOGS/$1.log" start rc
  start=$(date +%s.%N)
  ( set -u; "$fn" ) >"$log" 2>&1
  rc=$?
  local took; took=$(python3 -c "print(f'{$(date +%s.%N)-$start:.1f}')")
  if [ $rc -eq 0 ]; then
    T_PASS=$((T_PASS+1)); echo "ok    $name (${took}s)"
  else
    T_FAIL=$((T_FAIL+1)); T_FAILED+=("$name"); echo "FAIL  $name (${took}s) — last lines of $log:"
    tail -25 "$log" | sed 's/^/      /'
  fi
}

t_summary() {
  [ ${#T_FAILED[@]} -gt 0 ] && echo "failed: ${T_FAILED[*]}"
  echo "${T_NAME:-e2e}: $T_PASS passed, $T_FAIL failed"
  [ $T_FAIL -eq 0 ]
}
