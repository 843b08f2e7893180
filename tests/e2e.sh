#!/usr/bin/env bash
# End-to-end suite: real nix-build → our hook → real sshd builders (network +
# mount namespaces with their own /nix) → real `nix-store --serve` → outputs
# back in the local store. Needs root. Usage: bash tests/e2e.sh [test-name...]
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/tests/lib/testbed.sh"
source "$REPO/tests/lib/harness.sh"
HOOK=${HOOK:-$REPO/target/release/build-hook}
BUILTIN=/usr/libexec/nix/build-remote
NIX=$REPO/tests/nix
LOAD=/nix/var/nix/current-load
export BUILD_HOOK_CONNECT_TIMEOUT=${BUILD_HOOK_CONNECT_TIMEOUT:-3}

nonce() { echo "$1-$(date +%s%N)-$RANDOM"; }
machines() { : > "$TB/machines"; for spec in "$@"; do tb_machines_line ${spec/:/ } >> "$TB/machines"; done; }
# nb EXPR [args...]: nix-build through our hook with the machines file, no local builds.
nb() { timeout 300 nix-build "$@" --max-jobs 0 --builders "@$TB/machines" --option build-hook "$HOOK" --no-out-link; }
nb_builtin() { timeout 300 nix-build "$@" --max-jobs 0 --builders "@$TB/machines" --option build-hook "$BUILTIN" --no-out-link; }
slots_free() { # slots_free I JOBS [queue-]: every slot (or queue ticket) of builder I can be locked right now
  local j; for j in $(seq 0 $(($2-1))); do flock -n "$LOAD/ssh:__root@10.201.$1.2-${3:-}$j" true || return 1; done
}
# Health and history: tests that count on Nix's ranking (list order on a tie)
# must not be steered by speeds learned from earlier tests' builds.
reset_health() { rm -rf "$LOAD/build-hook/health"; rm -f "$LOAD/build-hook/history.jsonl" "$LOAD/build-hook/history.1.jsonl"; }

test_one_derivation() {
  machines 1:2
  out=$(nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce one)" 2>&1 | tee /dev/stderr | tail -1)
  [ -d "$out" ] || fail "no output"
  [ "$(cat "$out/sub/f")" = hello ] || fail "wrong content"
  [ -x "$out/x" ] && [ -L "$out/link" ] || fail "exec bit or symlink lost"
  nix-store --verify-path "$out" || fail "not valid"
  slots_free 1 2 || fail "slot left locked"
}

test_chain_output_feeds_next_build() {
  machines 1:2 2:2
  log=$(mktemp)
  out=$(nb "$NIX/chain.nix" -A top --argstr nonce "$(nonce chain)" 2>"$log")
  cat "$log"
  [ "$(head -1 "$out")" = hello ] || fail "chain content wrong"
  assert_contains "$log" "building dep on b"
  assert_contains "$log" "building top on b"
  nix-store --verify-path "$out" $(nix-store -qR "$out") || fail "not valid"
}

test_multi_output_derivation() {
  machines 2:2
  outs=$(nb "$NIX/multi.nix" -A all --argstr nonce "$(nonce multi)" 2>&1 | tee /dev/stderr | grep ^/nix/store)
  [ "$(echo "$outs" | wc -l)" = 3 ] || fail "expected 3 outputs, got: $outs"
  dev=$(echo "$outs" | grep -- -dev$); out=$(echo "$outs" | grep -- -multi$); doc=$(echo "$outs" | grep -- -doc$)
  [ "$(cat "$dev/include/where-is-out")" = "$out" ] || fail "dev does not point at out"
  nix-store -q --references "$dev" | grep -qx "$out" || fail "reference dev -> out not registered"
  nix-store -q --references "$doc" | grep -qx "$dev" || fail "reference doc -> dev not registered"
  nix-store --verify-path $outs || fail "not valid"
}

test_failing_build_reports_builder_message() {
  machines 1:2
  log=$(mktemp)
  nb "$NIX/fail.nix" --argstr nonce "$(nonce fail)" >"$log" 2>&1; rc=$?
  cat "$log"
  [ $rc -ne 0 ] || fail "nix-build succeeded"
  assert_contains "$log" "intentional failure on b1"
  assert_contains "$log" "failed with exit code 3"
  # worded and ended as Nix's own hook does
  assert_contains "$log" "error: build of '"
  assert_contains "$log" "failed with exit code 1"
  slots_free 1 2 || fail "slot left locked after a failed build"
}

test_unreachable_builder_is_named() {
  reset_health
  tb_stop_sshd 2
  machines 2:2
  log=$(mktemp)
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce unreach)" >"$log" 2>&1; rc=$?
  tb_start_sshd 2
  cat "$log"
  [ $rc -ne 0 ] || fail "build succeeded with no reachable builder"
  assert_contains "$log" "cannot build on 'ssh://root@10.201.2.2'"
  assert_contains "$log" "unreachable"
  slots_free 2 2 || fail "slot left locked"
}

test_unreachable_builder_falls_back_to_another() {
  reset_health
  tb_stop_sshd 2
  machines 2:2 1:2
  log=$(mktemp)
  out=$(nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce fallback)" 2>"$log"); rc=$?
  tb_start_sshd 2
  cat "$log"
  [ $rc -eq 0 ] || fail "build failed"
  assert_contains "$log" "building dep on b1"
  nix-store --verify-path "$out" || fail "not valid"
}

peaks_ok() { # peaks_ok EVENTS MAX: every builder's peak <= MAX; prints peaks
  python3 "$REPO/tests/lib/peak.py" "$1"
  python3 "$REPO/tests/lib/peak.py" "$1" | awk -v max="$2" '$2 > max { bad=1 } END { exit bad }' || fail "a builder ran more than $2 builds at once"
}

test_twelve_parallel_over_two_builders_respect_max_jobs() {
  reset_health
  machines 1:2 2:2
  ev="$TB/events.par"; : > "$ev"
  nb "$NIX/par.nix" --arg n 12 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$(nonce par)" >/dev/null || fail "build failed"
  [ "$(grep -c ' start ' "$ev")" = 12 ] || fail "expected 12 builds"
  peaks_ok "$ev" 2
  # both builders were used
  [ "$(python3 "$REPO/tests/lib/peak.py" "$ev" | wc -l)" = 2 ] || fail "only one builder used"
  slots_free 1 2 && slots_free 2 2 || fail "slot left locked"
}

# Builds accepted while every slot is busy wait in the queue (one per slot),
# connected, and start when a slot is released: never more at once than the
# machine's max jobs, and the queue is empty afterwards. With the queue off,
# the same builds are postponed instead and still all run.
test_builds_queue_while_every_slot_is_busy() {
  reset_health
  machines 1:1
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce qwarm)" >/dev/null 2>&1 || fail "warm-up build failed"
  rm -f "$LOAD"/*-queue-*
  ev="$TB/events.queue"; : > "$ev"
  nb "$NIX/par.nix" --arg n 4 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$(nonce queue)" --argstr tag q >/dev/null 2>"$TB/queue.err" &
  pid=$!
  # status shows the build waiting in the queue, with its derivation
  local seen=""
  for _ in $(seq 1 40); do
    seen=$("$HOOK" status --json --builders "@$TB/machines" | python3 -c 'import json,sys; print(" ".join(b["drv"] for m in json.load(sys.stdin)["machines"] for b in m["queued"]))')
    [ -n "$seen" ] && break; sleep 0.1
  done
  wait $pid || { tail "$TB/queue.err"; fail "queued builds failed"; }
  case "$seen" in /nix/store/*-q?.drv) ;; *) fail "status did not show the queued build (saw '$seen')";; esac
  [ "$(grep -c ' start ' "$ev")" = 4 ] || fail "expected 4 builds"
  peaks_ok "$ev" 1
  # Only a queued build takes a ticket (the files were removed above).
  [ -e "$LOAD/ssh:__root@10.201.1.2-queue-0" ] || fail "no build was queued (no ticket file)"
  slots_free 1 1 && slots_free 1 1 queue- || fail "a slot or ticket was left locked"
  rm -f "$LOAD"/*-queue-*
  : > "$ev"
  BUILD_HOOK_QUEUE=0 BUILD_HOOK_SLOT_WAIT_MS=200 nb "$NIX/par.nix" --arg n 3 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$(nonce noqueue)" --argstr tag n >/dev/null 2>&1 || fail "builds without the queue failed"
  [ "$(grep -c ' start ' "$ev")" = 3 ] || fail "expected 3 builds without the queue"
  peaks_ok "$ev" 1
  ! ls "$LOAD"/*-queue-* >/dev/null 2>&1 || fail "BUILD_HOOK_QUEUE=0 still queued a build"
}

test_builtin_hook_and_ours_share_the_load_directory() {
  reset_health
  machines 1:2 2:2
  ev="$TB/events.mixed"; : > "$ev"
  n1=$(nonce mixed)
  nb "$NIX/par.nix" --arg n 8 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$n1" --argstr tag ours >/dev/null 2>&1 &
  a=$!
  nb_builtin "$NIX/par.nix" --arg n 8 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$n1" --argstr tag theirs >/dev/null 2>&1 &
  b=$!
  wait $a || fail "our build failed"
  wait $b || fail "builtin build failed"
  [ "$(grep -c ' start ' "$ev")" = 16 ] || fail "expected 16 builds"
  grep -q 'start .* ours' "$ev" && grep -q 'start .* theirs' "$ev" || fail "both hooks should have built"
  peaks_ok "$ev" 2
}

test_bad_machines_line_is_reported_and_skipped() {
  reset_health
  { echo "ssh://root@10.201.9.2 x86_64-linux - lots"; tb_machines_line 1 2; } > "$TB/machines"
  log=$(mktemp)
  out=$(nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce badline)" 2>"$log"); rc=$?
  cat "$log"
  [ $rc -eq 0 ] || fail "the good machine should still be used"
  assert_contains "$log" "$TB/machines:1:38: error: max jobs (column 4): 'lots' is not a whole number"
  assert_contains "$log" "hint:"
}

test_relative_paths_are_explained() {
  log=$(mktemp)
  (cd "$TB" && timeout 60 nix-build "$NIX/chain.nix" -A dep --argstr nonce "$(nonce rel)" --max-jobs 0 \
     --builders "@machines" --option build-hook "$HOOK" --no-out-link) >"$log" 2>&1
  cat "$log"
  assert_contains "$log" "machines file path 'machines' is relative; Nix runs the hook in '/', so it would be read as '/machines'"
  echo "ssh://root@10.201.1.2 x86_64-linux client_key 2" > "$TB/machines.relkey"
  timeout 60 nix-build "$NIX/chain.nix" -A dep --argstr nonce "$(nonce relkey)" --max-jobs 0 \
     --builders "@$TB/machines.relkey" --option build-hook "$HOOK" --no-out-link >"$log" 2>&1
  cat "$log"
  assert_contains "$log" "ssh key path 'client_key' is relative; the hook runs in '/', so it would be read as '/client_key'"
}

# An ssh that records "start end rc host" of every invocation (test only).
ssh_logger() {
  cat > "$TB/ssh-logger" <<'W'
#!/usr/bin/env bash
s=$(date +%s.%N); /usr/bin/ssh "$@"; rc=$?
host=""; for a in "$@"; do [ "$prev" = "--" ] && host=$a; prev=$a; done
echo "$s $(date +%s.%N) $rc $host" >> "$SSH_CALLS"; exit $rc
W
  chmod +x "$TB/ssh-logger"
}

health_field() { sed -n "s/^$2=//p" "$LOAD/build-hook/health/ssh:__root@10.201.$1.2"; }

test_dead_builder_mid_run_is_skipped_then_used_again() {
  reset_health
  ssh_logger
  machines 1:2 2:2
  export SSH_CALLS="$TB/ssh-calls"; : > "$SSH_CALLS"
  ev="$TB/events.dead"; : > "$ev"
  BUILD_HOOK_SSH="$TB/ssh-logger" BUILD_HOOK_BACKOFF_BASE=10 \
    nb "$NIX/par.nix" --arg n 24 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$(nonce dead)" --argstr tag d >"$TB/dead.out" 2>&1 &
  pid=$!
  sleep 2
  killed_at=$(date +%s.%N)
  tb_kill_all 2          # sshd, its sessions and the builds running there
  wait $pid || { cat "$TB/dead.out"; fail "the run failed although b1 was alive"; }
  grep -q "failed (connection lost during a build" "$TB/dead.out" || grep -q "cannot reach\|failed (" "$TB/dead.out" || fail "no failover message"
  cat "$TB/dead.out" | grep build-hook
  [ "$(health_field 2 failures)" -ge 1 ] || fail "b2 not recorded as failing"
  slots_free 1 2 && slots_free 2 2 || fail "slot left locked"
  # Every failed attempt on b2 gave up within one connect timeout (+1 s slack),
  # and after the first failure nobody tried b2 again during its back-off (>= 8 s).
  python3 - "$SSH_CALLS" "$killed_at" "$BUILD_HOOK_CONNECT_TIMEOUT" <<'PY' || fail "dead builder was waited on or retried too soon"
import sys
calls = [l.split() for l in open(sys.argv[1]) if l.strip()]
killed, ct = float(sys.argv[2]), float(sys.argv[3])
b2 = [(float(s), float(e), int(rc)) for s, e, rc, h in calls if h == "root@10.201.2.2"]
failed = [c for c in b2 if c[2] != 0]
assert failed, "no failed attempt on b2 recorded"
first_fail_end = min(e for s, e, rc in failed)
for s, e, rc in failed:
    if s > killed:
        assert e - s <= ct + 1, f"an attempt on b2 took {e-s:.1f}s"
late = [s for s, e, rc in b2 if first_fail_end + ct < s < first_fail_end + 8]
print(f"{len(b2)} calls to b2, {len(failed)} failed; first failure ended {first_fail_end-killed:.2f}s after the kill; calls during back-off: {len(late)}")
assert not late, f"b2 was tried during its back-off at {[round(x-first_fail_end,2) for x in late]}"
PY
  # Bring it back: after its back-off it takes builds again.
  tb_start_sshd 2
  wait_until=$(health_field 2 retry_after)
  while [ "$(date +%s)" -le "$wait_until" ]; do sleep 0.5; done
  ev2="$TB/events.back"; : > "$ev2"
  nb "$NIX/par.nix" --arg n 8 --argstr seconds 1 --argstr events "$ev2" --argstr nonce "$(nonce back)" --argstr tag back >/dev/null 2>&1 || fail "second run failed"
  grep -q '^b2 start' "$ev2" || fail "b2 did not take builds after it came back"
  [ "$(health_field 2 failures)" = 0 ] || fail "b2's failures were not reset by a success"
}

test_racing_hooks_keep_the_health_state_readable() {
  # Fresh load directory, 2 nix-builds in parallel, one builder refusing
  # connections: every health record must stay whole.
  local fresh; fresh=$(mktemp -d)
  tb_stop_sshd 2
  machines 2:2 1:2
  for k in 1 2; do
    NIX_CURRENT_LOAD=$fresh nb "$NIX/par.nix" --arg n 10 --argstr seconds 0 --argstr events "$TB/events.race" --argstr nonce "$(nonce race$k)" --argstr tag r$k >/dev/null 2>&1 &
  done
  wait; rc=$?
  tb_start_sshd 2
  ls -la "$fresh/build-hook/health"
  for f in "$fresh"/build-hook/health/*; do
    cat "$f"
    python3 - "$f" <<'PY' || fail "corrupt health record $f"
import sys
lines = open(sys.argv[1]).read().split("\n")
assert lines[0] == "build-hook-health v1" and lines[-1] == "", lines
kv = dict(l.split("=", 1) for l in lines[1:-1])
for k in ("last_success", "failures", "retry_after"): int(kv[k])
PY
  done
  [ "$(ls "$fresh/build-hook/health" | wc -l)" = 2 ] || fail "expected one record per machine and no temporary files"
  grep -q '^failures=[1-9]' "$fresh/build-hook/health/ssh:__root@10.201.2.2" || fail "b2's failure not recorded"
  rm -rf "$fresh"
}

test_second_build_reuses_the_ssh_connection() {
  reset_health
  machines 1:2
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce reuse1)" >/dev/null 2>&1 || fail "first build failed"
  before=$(grep -c "Accepted publickey" "$TB/b1/sshd.log")
  nb "$NIX/chain.nix" -A top --argstr nonce "$(nonce reuse2)" >/dev/null 2>&1 || fail "second build failed"
  after=$(grep -c "Accepted publickey" "$TB/b1/sshd.log")
  echo "ssh logins on b1: $before before, $after after two more builds"
  [ "$after" = "$before" ] || fail "a new SSH handshake was made for a build within the sharing window"
}

held_socket() { ls "$LOAD"/build-hook/ssh/*.h[0-9] 2>/dev/null | head -1; }
wait_held() { local i; for i in $(seq 1 100); do [ -S "$(held_socket)" ] && return 0; sleep 0.05; done; return 1; }
# The Nix processes on builder I, once there are some (a held session's
# nix-store starts moments after its socket is offered).
wait_nix_pids() { local i p; for i in $(seq 1 100); do p=$(tb_nix_pids "$1"); [ -n "$p" ] && { echo $p; return 0; }; sleep 0.05; done; return 1; }

test_a_session_held_after_a_build_starts_the_next() {
  reset_health
  machines 1:2
  local log="$TB/held.log"
  # Only this test's held sessions, one at a time.
  tb_drop_held; sleep 0.2
  rm -f "$LOAD"/build-hook/ssh/*.h[0-9]*
  export BUILD_HOOK_HELD_SESSIONS=1
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce held1)" >/dev/null 2>&1 || fail "first build failed"
  # After the build a session to b1 is held, its nix-store already running there.
  wait_held || fail "no session was held after the build"
  pgrep -f "build-hook __hold" >/dev/null || fail "no holder process"
  wait_nix_pids 1 >/dev/null || fail "the held session has no nix-store on the builder"
  # status counts it (and counting does not take it: the next build uses it)
  local held; held=$("$HOOK" status --json --builders "@$TB/machines" | python3 -c 'import json,sys; print(json.load(sys.stdin)["machines"][0]["held_sessions"])')
  [ "$held" = 1 ] || fail "status --json shows $held sessions opened ahead, not 1"
  "$HOOK" status --builders "@$TB/machines" | grep -q "10.201.1.2.*(1 session opened ahead)" || fail "status does not show the session opened ahead"
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce held2)" -v >"$log" 2>&1 || { tail "$log"; fail "second build failed"; }
  assert_contains "$log" "using a session opened ahead"
  # A held session that stopped answering (its nix-store frozen) is given
  # up for a new one: the build succeeds and b1 is not marked as failing.
  wait_held || fail "no session was held after the second build"
  local frozen; frozen=$(wait_nix_pids 1) || fail "no nix-store runs on b1 for the held session"
  kill -STOP $frozen
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce held3)" -v >"$log" 2>&1 || { tail "$log"; kill -CONT $frozen; fail "build after a frozen held session failed"; }
  kill -CONT $frozen 2>/dev/null || true
  assert_not_contains "$log" "using a session opened ahead"
  assert_not_contains "$log" "failed"
  [ "$(health_field 1 failures)" = 0 ] || fail "b1 was marked as failing: failures=$(health_field 1 failures)"
  # Sharing off (persist 0): nothing is held.
  tb_drop_held; sleep 0.2
  BUILD_HOOK_CONTROL_PERSIST=0 nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce held4)" >/dev/null 2>&1 || fail "build without sharing failed"
  sleep 0.3
  ! pgrep -f "build-hook __hold" >/dev/null || fail "a session was held with connection sharing off"
  unset BUILD_HOOK_HELD_SESSIONS
}

# evil_builder DIRECTION MODE: machines entry for b1 whose remote-program
# damages the stream in DIRECTION (up: into nix-store, down: out of it).
evil_builder() {
  local w="$TB/evil-nix-store"
  printf '#!/bin/sh\nexec python3 %s %s %s 2000000 nix-store "$@"\n' "$REPO/tests/lib/mangle.py" "$1" "$2" > "$w"
  chmod +x "$w"
  echo "ssh://root@10.201.1.2?remote-program=$w x86_64-linux $TB/client_key 2 1 - - $(tb_hostkey_b64 1)" > "$TB/machines"
}

remote_valid() { ssh -i "$TB/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
  -o ControlPath=none root@10.201.1.2 nix-store --check-validity "$1" 2>/dev/null; }

test_corrupted_or_truncated_streams_are_detected_and_nothing_is_registered() {
  local input
  for level in 0 3; do
    for dir in down up; do
      for mode in flip cut; do
        # a fresh input, so that it really has to be uploaded
        head -c 4000000 /dev/urandom > "$TB/big-input-$level-$dir-$mode"; input=$(nix-store --add "$TB/big-input-$level-$dir-$mode")
        reset_health
        evil_builder "$dir" "$mode"
        log="$TB/corrupt-$level-$dir-$mode.log"
        drv=$(nix-instantiate "$NIX/big.nix" --argstr nonce "$(nonce corrupt)" --arg input "$input" 2>/dev/null)
        out=$(nix-store -q --outputs "$drv")
        BUILD_HOOK_COMPRESS=$level nb "$drv" >"$log" 2>&1 && { cat "$log"; fail "$dir/$mode/zstd $level: the build succeeded"; }
        echo "--- zstd $level, $dir, $mode:"; grep -E "build-hook|error" "$log" | head -4
        ! nix-store --check-validity "$out" 2>/dev/null || fail "$dir/$mode: a corrupt output was registered locally"
        [ ! -e "$out" ] || fail "$dir/$mode: $out left on disk"
        ! ls -a /nix/store | grep -q '\.build-hook-' || fail "$dir/$mode: temporary files left in the store"
        if [ "$dir" = up ]; then
          ! remote_valid "$input" || fail "up/$mode: the damaged input was registered on the builder"
        fi
        if [ "$dir/$mode" = up/flip ]; then
          assert_contains "$log" "hash mismatch importing path"   # the builder's own words reach the user
          assert_contains "$log" "the builder said"
        elif [ "$dir/$mode" = down/flip ]; then
          assert_contains "$log" "NAR hash mismatch"
        else
          grep -qiE "malformed NAR|unexpected end|connection ended|connection lost" "$log" || fail "no clear error for a truncated stream"
        fi
        slots_free 1 2 || fail "slot left locked"
      done
    done
  done
}

test_sigterm_ends_the_job_cleanly() {
  reset_health
  machines 1:2
  ev="$TB/events.term"; : > "$ev"
  # Sessions held open for the next build are meant to outlive a hook (their
  # own test covers them); here only the terminated hook's processes count.
  tb_drop_held; sleep 0.2
  export BUILD_HOOK_HELD_SESSIONS=0
  nb "$NIX/par.nix" --arg n 1 --argstr seconds 30 --argstr events "$ev" --argstr nonce "$(nonce term)" --argstr tag term >"$TB/term.out" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do grep -q start "$ev" && break; sleep 0.1; done
  grep -q start "$ev" || fail "the build did not start"
  hook=$(pgrep -x build-hook) || fail "no hook process"
  kill -TERM $hook
  wait $pid && fail "nix-build succeeded although its hook was terminated"
  cat "$TB/term.out"
  sleep 0.5
  ! pgrep -x build-hook || fail "the hook is still running"
  ! pgrep -f "nix-store --serve" >/dev/null || { pgrep -af "nix-store --serve"; fail "a nix-store --serve child was left running"; }
  slots_free 1 2 || fail "slot left locked"
  ! ls -a /nix/store | grep -q '\.build-hook-' || fail "temporary files left in the store"
  # the remote build was stopped with its session
  for _ in $(seq 1 50); do ip netns pids bhb1 | xargs -r ps -o cmd= -p | grep -q "sleep 30" || break; sleep 0.1; done
  ! ip netns pids bhb1 | xargs -r ps -o cmd= -p | grep -q "sleep 30" || fail "the remote build is still running"
}

test_stale_shared_connection_socket_is_replaced() {
  reset_health
  # Only this test's master: earlier tests' ones (to other builders) go.
  pkill -9 -f "ssh: .*build-hook/ssh/.*\[mux\]"; sleep 0.2
  rm -f "$LOAD"/build-hook/ssh/*
  machines 1:2
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce stale1)" >/dev/null 2>&1 || fail "first build failed"
  master=$(pgrep -f "ssh: .*build-hook/ssh/.*\[mux\]" | head -1)
  [ -n "$master" ] || fail "no shared master was started"
  sock=$(ls "$LOAD"/build-hook/ssh/* | head -1)
  kill -9 $master; sleep 0.2
  [ -S "$sock" ] || fail "expected the dead master's socket to be left behind"
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce stale2)" >/dev/null 2>&1 || fail "build after a dead master failed"
  pgrep -f "ssh: .*build-hook/ssh/.*\[mux\]" >/dev/null || fail "no new master"
  ssh -O check -o ControlPath="$sock" root@10.201.1.2 2>&1 | grep -q "Master running" || fail "the socket was not replaced by a live master"
}

test_check_command_says_why() {
  reset_health
  tb_stop_sshd 2
  { echo "ssh://root@10.201.9.2 x86_64-linux - lots"; tb_machines_line 2 2; tb_machines_line 1 2; } > "$TB/machines"
  # a build marks b2 as failing (it is tried first, fails, b1 takes over)
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce check)" >/dev/null 2>&1 || fail "build failed"
  "$HOOK" check --builders "@$TB/machines" --connect > "$TB/check.out"; rc=$?
  tb_start_sshd 2
  cat "$TB/check.out"
  [ $rc = 1 ] || fail "check should exit 1 when something is wrong"
  assert_contains "$TB/check.out" "$TB/machines:1:38: error: max jobs (column 4)"
  assert_contains "$TB/check.out" "ssh://root@10.201.2.2  ($TB/machines:2:1)"
  grep -q "health: SKIPPED for [0-9]* more s after 1 failed connection(s): ssh://root@10.201.2.2 is unreachable" "$TB/check.out" || fail "back-off not shown"
  assert_contains "$TB/check.out" "connect: FAILED: ssh://root@10.201.2.2 is unreachable"
  grep -q "connect: ok in [0-9]* ms, nix-store --serve protocol 2.7" "$TB/check.out" || fail "b1 not reported reachable"
  machines 1:2
  "$HOOK" check --builders "@$TB/machines" --connect || fail "check should exit 0 for a good setup"
}

test_incompressible_inputs_are_copied_uncompressed() {
  machines 1:2
  local rec="$LOAD/build-hook/health/ssh:__root@10.201.1.2" kind input log
  for kind in random text; do
    # A slow link, as learned from earlier copies: zstd -6 unless the data says otherwise.
    reset_health; mkdir -p "$(dirname "$rec")"
    printf 'build-hook-health v1\nlast_success=%s\nfailures=0\nretry_after=0\nreason=\nzstd=yes\naes=yes\nraw_mbps=12.0\ncompress=6\n' "$(date +%s)" > "$rec"
    if [ $kind = random ]; then head -c 4000000 /dev/urandom > "$TB/sample-$kind"; else seq 1 600000 > "$TB/sample-$kind"; fi
    echo "$kind $(date +%s%N)" >> "$TB/sample-$kind"
    input=$(nix-store --add "$TB/sample-$kind")
    log="$TB/sample-$kind.log"
    nb "$NIX/big.nix" --argstr nonce "$(nonce sample)" --arg input "$input" -vv >"$log" 2>&1 || { tail "$log"; fail "$kind build failed"; }
    grep "build-hook: \(copied\|the paths\)" "$log"
    if [ $kind = random ]; then
      assert_contains "$log" "look incompressible"
      grep -q "copied 1 paths to 'ssh://root@10.201.1.2': .* (uncompressed)" "$log" || fail "random input was not sent uncompressed"
    else
      assert_not_contains "$log" "look incompressible"
      grep -q "copied 1 paths to 'ssh://root@10.201.1.2': .* (zstd -6, " "$log" || fail "text input was not compressed"
    fi
  done
}

test_a_first_upload_goes_raw_while_the_link_is_measured() {
  machines 1:2
  local i list="[" log="$TB/first-up.log" rc
  # Three fresh, compressible inputs of about 4.9 MB each.
  for i in 1 2 3; do { echo "first $i $(date +%s%N)"; seq 1 700000; } > "$TB/fm-$i"; list="$list $TB/fm-$i"; done
  echo "$list ]" > "$TB/fm.nix"
  # First contact (no health record, no shared connection) on a slow link:
  # the upload starts raw while the builder is probed, and once the probe
  # says the link is slow the paths left go compressed.
  reset_health; close_shared_connections
  tb_shape 1 30mbit
  nb "$REPO/bench/transfer.nix" --arg inputsFile "$TB/fm.nix" --argstr nonce "$(nonce fm)" -v >"$log" 2>&1; rc=$?
  tb_unshape 1
  [ $rc = 0 ] || { tail "$log"; fail "the build failed"; }
  grep "build-hook: \(copying\|copied\|the link\)" "$log"
  assert_contains "$log" "uncompressed while the link is measured"
  assert_contains "$log" "go compressed"
  grep -q "copied [12] paths to 'ssh://root@10.201.1.2': .* (zstd -" "$log" || fail "the paths left were not compressed"
  [ "$(health_field 1 zstd)" = yes ] || fail "the probe beside the upload recorded no capabilities"
  # (This slow link's learned level must not reach the tests after this one.)
  reset_health
}

# First contact on a slow link with inputs that are half incompressible:
# those go first, raw, and measure the link themselves (no link probe beside
# them, whose bytes would share the slow link); the compressible ones follow
# compressed at the slow link's level.
test_incompressible_inputs_go_first_and_measure_the_link() {
  machines 1:2
  local i list="[" log="$TB/incomp-first.log" rc
  for i in 1 2; do { echo "text $i $(date +%s%N)"; seq 1 700000; } > "$TB/ic-t$i"; head -c 4500000 /dev/urandom > "$TB/ic-r$i"; list="$list $TB/ic-t$i $TB/ic-r$i"; done
  echo "$list ]" > "$TB/ic.nix"
  cat > "$TB/ssh-link-probe-log" <<'W'
#!/usr/bin/env bash
case "$*" in *"echo warm"*) echo "$(date +%s.%N)" >> "$LINK_PROBES" ;; esac
exec /usr/bin/ssh "$@"
W
  chmod +x "$TB/ssh-link-probe-log"
  export LINK_PROBES="$TB/link-probes"; : > "$LINK_PROBES"
  reset_health; close_shared_connections
  tb_shape 1 30mbit
  BUILD_HOOK_SSH="$TB/ssh-link-probe-log" nb "$REPO/bench/transfer.nix" --arg inputsFile "$TB/ic.nix" --argstr nonce "$(nonce ic)" -v >"$log" 2>&1; rc=$?
  tb_unshape 1
  [ $rc = 0 ] || { tail "$log"; fail "the build failed"; }
  grep "build-hook: \(copying\|copied\|the link\)" "$log"
  grep "build-hook: copied .* paths to" "$log" | head -1 | grep -q "copied 2 paths to 'ssh://root@10.201.1.2': 9.0 MB of NAR .*(uncompressed)" \
    || fail "the first copy was not the two random inputs, raw"
  grep -q "copied 2 paths to 'ssh://root@10.201.1.2': .* (zstd -6" "$log" || fail "the compressible inputs did not follow at the slow link's level"
  [ ! -s "$LINK_PROBES" ] || fail "the link was probed beside a raw start that measured it: $(cat "$LINK_PROBES")"
  echo "recorded: zstd=$(health_field 1 zstd) raw_mbps=$(health_field 1 raw_mbps) compress=$(health_field 1 compress)"
  [ "$(health_field 1 zstd)" = yes ] || fail "the capabilities were not recorded"
  python3 -c "import sys; sys.exit(0 if 1 < float('$(health_field 1 raw_mbps)') < 5 else 1)" 2>/dev/null || fail "the raw start's rate was not recorded as the link's"
  unset LINK_PROBES
  reset_health
}

# The ciphers negotiated by new SSH connections to builder I since line N of its log.
ciphers_since() { tail -n +"$(( $2 + 1 ))" "$TB/b$1/sshd.log" | sed -n 's/.*kex: client->server cipher: \([^ ]*\).*/\1/p'; }
close_shared_connections() {
  local s
  for s in "$LOAD"/build-hook/ssh/*; do [ -S "$s" ] && ssh -o ControlPath="$s" -O exit x >/dev/null 2>&1; done
  rm -f "$LOAD"/build-hook/ssh/*
}

test_new_connections_prefer_aes_gcm_unless_the_user_chose() {
  reset_health
  machines 1:2
  close_shared_connections
  # 1st build: the builder is probed (zstd, AES) on the way; an x86 builder
  # is taken to have AES instructions before that, so its first connection
  # already puts AES-GCM first when this CPU has them.
  local want=no; grep -qw aes /proc/cpuinfo && want=yes
  local expect=chacha20-poly1305@openssh.com; [ $want = yes ] && expect=aes128-gcm@openssh.com
  n=$(wc -l < "$TB/b1/sshd.log")
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce aes1)" >/dev/null 2>&1 || fail "first build failed"
  got=$(ciphers_since 1 "$n"); echo "first contact negotiated: $got"
  [ "$got" = "$expect" ] || fail "expected the first connection to use $expect, got '$got'"
  [ "$(health_field 1 aes)" = "$want" ] || fail "health record says aes=$(health_field 1 aes), expected $want"
  "$HOOK" check --builders "@$TB/machines" | grep "cipher for a new connection"
  # 2nd build on a new connection: AES-GCM first when both CPUs have AES.
  close_shared_connections
  "$HOOK" check --builders "@$TB/machines" | grep "cipher for a new connection"
  n=$(wc -l < "$TB/b1/sshd.log")
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce aes2)" >/dev/null 2>&1 || fail "second build failed"
  got=$(ciphers_since 1 "$n"); echo "new connection negotiated: $got"
  [ "$got" = "$expect" ] || fail "expected one new connection using $expect, got '$got'"
  # The user's choice wins: NIX_SSHOPTS names a cipher, and the knob turns it off.
  close_shared_connections
  n=$(wc -l < "$TB/b1/sshd.log")
  NIX_SSHOPTS="-c chacha20-poly1305@openssh.com" nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce aes3)" >/dev/null 2>&1 || fail "build with NIX_SSHOPTS failed"
  got=$(ciphers_since 1 "$n"); echo "with NIX_SSHOPTS=-c chacha20-poly1305@openssh.com: $got"
  [ "$got" = chacha20-poly1305@openssh.com ] || fail "NIX_SSHOPTS's cipher was not used: '$got'"
  close_shared_connections
  n=$(wc -l < "$TB/b1/sshd.log")
  BUILD_HOOK_PREFER_AES_GCM=0 nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce aes4)" >/dev/null 2>&1 || fail "build with the knob off failed"
  got=$(ciphers_since 1 "$n"); echo "with BUILD_HOOK_PREFER_AES_GCM=0: $got"
  [ "$got" = chacha20-poly1305@openssh.com ] || fail "OpenSSH's first choice was not kept: '$got'"
}

# A first build with nothing to upload and a small output does not wait for
# the builder to be probed: its capabilities are asked beside the build (the
# probe is slowed to 2 s here, so a build that waited for it would start
# after it answered), and its link is not measured, as nothing needed a
# compression level.
test_a_first_build_with_nothing_to_upload_asks_the_builder_beside_it() {
  reset_health
  machines 1:2
  close_shared_connections
  cat > "$TB/ssh-slow-probe" <<'W'
#!/usr/bin/env bash
case "$*" in
  *"echo zstd"*) s=$(date +%s.%N); sleep 2; /usr/bin/ssh "$@"; rc=$?; echo "$s $(date +%s.%N) $rc" >> "$PROBE_CALLS"; exit $rc ;;
esac
exec /usr/bin/ssh "$@"
W
  chmod +x "$TB/ssh-slow-probe"
  export PROBE_CALLS="$TB/probe-calls"; : > "$PROBE_CALLS"
  local ev="$TB/events.fc"; : > "$ev"
  BUILD_HOOK_SSH="$TB/ssh-slow-probe" nb "$NIX/par.nix" --arg n 1 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$(nonce fcnone)" --argstr tag f >/dev/null 2>"$TB/fc.err" || { tail -5 "$TB/fc.err"; fail "the build failed"; }
  [ "$(wc -l < "$PROBE_CALLS")" = 1 ] || fail "expected one capability probe, saw: $(cat "$PROBE_CALLS")"
  local started probed; started=$(awk '$2 == "start" { print $3 }' "$ev"); probed=$(awk '{ print $2 }' "$PROBE_CALLS")
  echo "the build started $(python3 -c "print(f'{$probed - $started:.2f}')") s before the capability probe answered"
  python3 -c "import sys; sys.exit(0 if $started < $probed else 1)" || fail "the build waited for the capability probe"
  echo "after the first build: zstd=$(health_field 1 zstd) aes=$(health_field 1 aes) raw_mbps=$(health_field 1 raw_mbps) compress=$(health_field 1 compress)"
  [ "$(health_field 1 zstd)" = yes ] || fail "the builder's zstd was not recorded"
  [ "$(health_field 1 aes)" != unknown ] || fail "the builder's AES instructions were not recorded"
  [ "$(health_field 1 raw_mbps)" = unknown ] && [ "$(health_field 1 compress)" = unknown ] || fail "the link was measured for a build that needed no level"
}

db_field() { # db_field PATH COLUMN: a column of the local store's ValidPaths row
  python3 -c "import sqlite3,sys; r=sqlite3.connect('/nix/var/nix/db/db.sqlite').execute('select $2 from ValidPaths where path=?',(sys.argv[1],)).fetchone(); print(r[0] if r and r[0] else '')" "$1"
}

test_fixed_output_is_checked_and_registered_with_its_content_address_and_signatures() {
  reset_health
  machines 1:2
  # The builder signs what it builds, as a signing builder would.
  local d="$TB/b1/etc-nix"
  [ -f "$d/sk" ] || nix-store --generate-binary-cache-key b1-test "$d/sk" "$d/pk"
  grep -q secret-key-files "$d/nix.conf" || echo "secret-key-files = /etc/nix/sk" >> "$d/nix.conf"
  # A held session's nix-store read nix.conf before this change.
  tb_drop_held 1
  out=$(nb "$NIX/fixed.nix" --argstr nonce "$(nonce fixed)" 2>&1 | tee /dev/stderr | tail -1)
  sed -i '/secret-key-files/d' "$d/nix.conf"; tb_drop_held 1
  [ "$(cat "$out")" = hello ] || fail "wrong content"
  nix-store --verify-path "$out" || fail "not valid"
  ca=$(db_field "$out" ca); sigs=$(db_field "$out" sigs)
  echo "ca=$ca sigs=$sigs"
  [ "$ca" = "fixed:sha256:$(nix-hash --type sha256 --to-base32 5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03)" ] || fail "content address not registered: '$ca'"
  case "$sigs" in b1-test:*) ;; *) fail "the builder's signature was not kept: '$sigs'" ;; esac
}

test_percent_signs_and_long_uris_in_key_uri_and_load_dir() {
  reset_health
  cp "$TB/client_key" "$TB/k%ey"
  echo "ssh://root@10.201.1.2?remote-program=nix-store&x=%25 x86_64-linux $TB/k%ey 2 1 - - $(tb_hostkey_b64 1)" > "$TB/machines"
  local load; load=$(mktemp -d /tmp/lo%adXXXX)
  out=$(NIX_CURRENT_LOAD=$load nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce pct)" 2>&1 | tee /dev/stderr | tail -1)
  [ -d "$out" ] || fail "no output"
  nix-store --verify-path "$out" || fail "not valid"
  # a store URI longer than a file name may be: hashed lock and record names
  echo "ssh://root@10.201.1.2?remote-program=nix-store&pad=$(printf 'x%.0s' $(seq 1 300)) x86_64-linux $TB/client_key 2 1 - - $(tb_hostkey_b64 1)" > "$TB/machines"
  out=$(NIX_CURRENT_LOAD=$load nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce long)" 2>&1 | tee /dev/stderr | tail -1)
  [ -d "$out" ] || fail "no output with a long URI"
  ls "$load" | grep -q '^uri-' || fail "no hashed slot file"
  rm -rf "$load"
}

test_operators_see_history_status_drain_and_explain() {
  reset_health
  rm -f "$LOAD/build-hook/history.jsonl" "$LOAD/build-hook/history.1.jsonl"; rm -rf "$LOAD/build-hook/drain"
  machines 1:2 2:2
  local B="--builders @$TB/machines"
  ev="$TB/events.ops"; : > "$ev"
  # status during a run shows busy slots and what they build
  nb "$NIX/par.nix" --arg n 4 --argstr seconds 3 --argstr events "$ev" --argstr nonce "$(nonce ops)" --argstr tag ops >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do [ "$(grep -c ' start ' "$ev")" -ge 4 ] && break; sleep 0.1; done
  st=$("$HOOK" status --json $B)
  echo "$st"
  python3 - "$st" <<'PY' || fail "status --json does not show 4 busy slots with their builds"
import json, sys
s = json.loads(sys.argv[1])
busy = sum(m["busy"] for m in s["machines"]); building = sum(len(m["building"]) for m in s["machines"])
assert busy == 4 and building == 4, (busy, building)
assert all(b["drv"].endswith(".drv") for m in s["machines"] for b in m["building"])
PY
  wait $pid || fail "the fan-out failed"
  # history: one record per build, on the machine that built it
  "$HOOK" history --json --last 100 $B > "$TB/history.json"
  cat "$TB/history.json"
  python3 - "$TB/history.json" "$ev" <<'PY' || fail "history does not match the builds"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ev = [l.split() for l in open(sys.argv[2]) if " start " in l]
where = {name: host for host, _, _, name in ev}
assert len(recs) == 4, len(recs)
for r in recs:
    assert r["result"] == "built", r
    assert r["machine"] == f"ssh://root@10.201.{where[r['name']][1:]}.2", (r, where)
    assert r["build_secs"] >= 2.5, r
PY
  "$HOOK" history $B | tee /dev/stderr | grep -q "^built" || fail "history table"
  "$HOOK" history --svg "$TB/timeline.svg" $B || fail "history --svg failed"
  python3 - "$TB/timeline.svg" <<'PY' || fail "the timeline is not an SVG with one bar per build"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
bars = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "build"]
assert root.tag.endswith("svg") and len(bars) == 4, len(bars)
PY
  # a drained machine gets no new build, and explain says why
  "$HOOK" drain 10.201.2.2 $B || fail "drain failed"
  "$HOOK" status $B | grep -q "10.201.2.2.*DRAINED" || fail "status does not show the drain"
  "$HOOK" check $B | grep -q "drained" || fail "check does not show the drain"
  drv=$(nix-instantiate "$NIX/chain.nix" -A dep --argstr nonce "$(nonce explain)" 2>/dev/null)
  "$HOOK" explain "$drv" $B | tee "$TB/explain.txt"
  grep -q "10.201.2.2.*no: drained" "$TB/explain.txt" || fail "explain does not name the drain"
  grep -q "would pick now: ssh://root@10.201.1.2" "$TB/explain.txt" || fail "explain does not name the pick"
  : > "$ev"
  # result hooks get the record on stdin, detached from the build
  rm -f "$TB/on-success.json"
  BUILD_HOOK_ON_SUCCESS="cat >> $TB/on-success.json" \
    nb "$NIX/par.nix" --arg n 4 --argstr seconds 0 --argstr events "$ev" --argstr nonce "$(nonce drained)" --argstr tag dr >/dev/null 2>&1 || fail "build with one machine drained failed"
  for _ in $(seq 1 50); do [ "$(grep -so '"result":"built"' "$TB/on-success.json" | wc -l)" = 4 ] && break; sleep 0.1; done
  [ "$(grep -o '"result":"built"' "$TB/on-success.json" | wc -l)" = 4 ] || fail "BUILD_HOOK_ON_SUCCESS did not get one record per build"
  ! grep -q '^b2 start' "$ev" || fail "a drained machine took a build"
  "$HOOK" undrain --all $B || fail "undrain failed"
  ! "$HOOK" status $B | grep -q DRAINED || fail "still drained"
}

test_a_closure_of_5000_missing_paths_copies_both_ways() {
  # Once the build-hook hung here: every request was written before any
  # reply was read, and the pipes filled between 1,000 and 1,300 paths.
  reset_health
  machines 1:2
  tb_empty_store 1
  cat > "$TB/rss-hook" <<W
#!/bin/sh
exec /usr/bin/time -f "%M" -a -o "$TB/rss-lc.txt" "$HOOK" "\$@"
W
  chmod +x "$TB/rss-hook"; : > "$TB/rss-lc.txt"
  local t0; t0=$(date +%s.%N)
  out=$(timeout 300 nix-build "$NIX/large-closure.nix" --arg n 5000 --argstr nonce "$(nonce lc)" --max-jobs 0 \
    --builders "@$TB/machines" --option build-hook "$TB/rss-hook" --no-out-link 2>"$TB/lc.err") || { tail -5 "$TB/lc.err"; fail "the build failed or hung"; }
  echo "5000 paths up, an output with 5000 references down: $(python3 -c "print(f'{$(date +%s.%N)-$t0:.1f}')") s, hook peak RSS $(sort -n "$TB/rss-lc.txt" | tail -1) KiB"
  [ "$(nix-store -q --references "$out" | wc -l)" = 5000 ] || fail "the output does not reference the 5000 inputs"
  nix-store --verify-path "$out" || fail "not valid"
  slots_free 1 2 || fail "slot left locked"
}

# Four builds taking the same 300 new inputs start at once on one builder:
# their hooks share the builder's upload lock (a hook that finds it busy asks
# again under it), so every input is uploaded exactly once.
test_builds_sharing_inputs_upload_each_path_once() {
  reset_health
  machines 1:4
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce siwarm)" >/dev/null 2>&1 || fail "warm-up build failed"
  local outs
  outs=$(nb "$NIX/shared-inputs.nix" --arg n 300 --arg k 4 --argstr nonce "$(nonce si)" -v 2>"$TB/si.err") || { tail -5 "$TB/si.err"; fail "the builds failed"; }
  [ "$(echo "$outs" | wc -l)" = 4 ] || fail "expected 4 outputs"
  for o in $outs; do [ "$(nix-store -q --references "$o" | wc -l)" = 300 ] || fail "$o does not reference the 300 inputs"; done
  local sent
  sent=$(sed -n "s/.*build-hook: copied \([0-9]*\) paths to .*/\1/p" "$TB/si.err" | awk '{ s += $1 } END { print s + 0 }')
  echo "paths uploaded by the four hooks together: $sent"
  [ "$sent" = 300 ] || fail "the 300 shared inputs were uploaded $sent times in all, not once each"
  slots_free 1 4 || fail "slot left locked"
}

# Learned speeds: a history in which b2 built the same derivations twice as
# fast as b1 makes the hook pick b2 (listed second) when both are free;
# without it Nix's rule (list order on a tie) picks b1. `explain` says which
# speed ranked each machine.
test_learned_speeds_send_the_build_to_the_faster_machine() {
  reset_health
  local H="$LOAD/build-hook/history.jsonl"
  rm -f "$H" "$LOAD/build-hook/history.1.jsonl"; rm -rf "$LOAD/build-hook/drain"
  machines 1:2 2:2
  log=$(mktemp)
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce learn0)" -v >"$log" 2>&1 || { cat "$log"; fail "build failed"; }
  assert_contains "$log" "building dep on b1"
  python3 - "$H" <<'PY'
import json, sys, time
now = time.time() - 3600
with open(sys.argv[1], "a") as f:
    for i, name in enumerate(["gcc", "glibc", "perl", "python", "openssl"]):
        for j in range(3):
            for m, secs in [("ssh://root@10.201.1.2", 200.0), ("ssh://root@10.201.2.2", 100.0)]:
                t = now + (i * 3 + j) * 300
                f.write(json.dumps({"start": t, "end": t + secs, "drv": f"/nix/store/{'a'*32}-{name}.drv", "name": name,
                    "system": "x86_64-linux", "machine": m, "slot": 0, "slot_wait": 0, "upload_bytes": 0, "upload_secs": 0,
                    "build_secs": secs, "download_bytes": 0, "download_secs": 0, "result": "built"}) + "\n")
PY
  drv=$(nix-instantiate "$NIX/chain.nix" -A dep --argstr nonce "$(nonce learn1)" 2>/dev/null)
  "$HOOK" explain --builders "@$TB/machines" "$drv" >"$log" 2>&1; cat "$log"
  assert_contains "$log" "learned from"
  assert_contains "$log" "would pick now: ssh://root@10.201.2.2"
  nb "$NIX/chain.nix" -A dep --argstr nonce "$(nonce learn1)" -v >"$log" 2>&1 || { cat "$log"; fail "build failed"; }
  cat "$log"
  assert_contains "$log" "building dep on b2"
  rm -f "$H"
}

# ssh-ng:// builders: the builders run `nix-daemon --stdio` over sshd (as
# root, so trusted); the hook speaks the daemon protocol through its bridge.
ng_machines() { : > "$TB/machines"; local spec; for spec in "$@"; do tb_machines_line ${spec/:/ } | sed 's|^ssh://|ssh-ng://|' >> "$TB/machines"; done; }
test_ssh_ng_builders_chain_fan_out_and_a_failure() {
  reset_health
  ng_machines 1:2 2:2
  log=$(mktemp)
  out=$(nb "$NIX/chain.nix" -A top --argstr nonce "$(nonce ng-chain)" 2>"$log")
  cat "$log"
  [ "$(head -1 "$out")" = hello ] || fail "chain content wrong"
  assert_contains "$log" "on 'ssh-ng://root@10.201."
  # the build log streams through the daemon protocol
  assert_contains "$log" "building dep on b"
  assert_contains "$log" "building top on b"
  nix-store --verify-path "$out" $(nix-store -qR "$out") || fail "not valid"
  ev="$TB/events.ng"; : > "$ev"
  nb "$NIX/par.nix" --arg n 8 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$(nonce ng-par)" >/dev/null || fail "fan-out failed"
  [ "$(grep -c ' start ' "$ev")" = 8 ] || fail "expected 8 builds"
  peaks_ok "$ev" 2
  [ "$(python3 "$REPO/tests/lib/peak.py" "$ev" | wc -l)" = 2 ] || fail "only one builder used"
  # compressed bulk sessions run the builder's nix-store beside its daemon
  BUILD_HOOK_COMPRESS=3 nb "$NIX/chain.nix" -A top --argstr nonce "$(nonce ng-zstd)" -v >"$log" 2>&1 || { cat "$log"; fail "compressed ssh-ng build failed"; }
  assert_contains "$log" "(zstd -3,"
  assert_contains "$log" "on 'ssh-ng://root@10.201."
  ng_machines 1:2
  nb "$NIX/fail.nix" --argstr nonce "$(nonce ng-fail)" >"$log" 2>&1 && fail "a failing build succeeded"
  cat "$log"
  assert_contains "$log" "intentional failure on b1"
  assert_contains "$log" "error: build of '"
  slots_free 1 2 && slots_free 2 2 || fail "slot left locked"
  # check --connect speaks the daemon protocol too
  "$HOOK" check --builders "@$TB/machines" --connect >"$log" 2>&1 || { cat "$log"; fail "check --connect failed"; }
  cat "$log"
  assert_contains "$log" "nix-daemon protocol 1."
  assert_contains "$log" "nix-daemon protocol 1.34 (Nix 2.8.0)"
}

# Multi-user Nix: a nix-daemon (its own NIX_CONF_DIR naming our hook and the
# machines) spawns the hook as root while a user who is not root builds
# through the daemon's socket.
test_a_user_builds_through_nix_daemon_and_our_hook() {
  machines 1:2
  id bh-user >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh bh-user || fail "cannot add a user"
  local d=$TB/daemon; rm -rf "$d"; mkdir -p "$d/conf"
  printf 'build-users-group =\nsubstituters =\nsandbox = false\nmax-jobs = 0\nbuild-hook = %s\nbuilders = @%s\nexperimental-features = nix-command\n' "$HOOK" "$TB/machines" > "$d/conf/nix.conf"
  NIX_CONF_DIR=$d/conf NIX_DAEMON_SOCKET_PATH=$d/socket NIX_CONFIG= nix-daemon >"$d/daemon.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do [ -S "$d/socket" ] && break; sleep 0.05; done
  [ -S "$d/socket" ] || { kill $pid; fail "nix-daemon did not start: $(cat "$d/daemon.log")"; }
  chmod 755 "$d" "$TB"; chmod 666 "$d/socket"
  # The user's own copy of the expression (the test tree may not be readable by them).
  local w; w=$(mktemp -d /tmp/bh-user-XXXX); cp "$NIX/chain.nix" "$NIX/chain-input.txt" "$w/"; chmod -R a+rX "$w"
  log=$(mktemp); chmod 666 "$log"
  runuser -u bh-user -- env -i PATH=/usr/bin:/bin HOME=/tmp NIX_REMOTE="unix://$d/socket" \
    NIX_CONFIG=$'substituters =\nexperimental-features = nix-command' \
    timeout 300 nix-build "$w/chain.nix" -A top --argstr nonce "$(nonce daemon)" --no-out-link >"$log" 2>&1; rc=$?
  kill $pid; wait $pid 2>/dev/null
  cat "$log"
  [ $rc = 0 ] || fail "the user's build through nix-daemon failed"
  out=$(grep '^/nix/store/' "$log" | tail -1)
  [ "$(head -1 "$out")" = hello ] || fail "wrong output"
  assert_contains "$log" "building top on b1"
  nix-store --verify-path "$out" $(nix-store -qR "$out") || fail "not valid"
  [ "$(stat -c %U "$out")" = root ] || fail "the output should belong to root (the daemon's hook registered it)"
  # Built by our hook (its history has the build), not Nix's.
  grep -q "$(basename "$(grep -o "/nix/store/[a-z0-9]*-top.drv" "$log" | head -1)")" "$LOAD/build-hook/history.jsonl" || fail "no history record: not our hook?"
  rm -rf "$w"
}

main() {
  tb_up 2 >/dev/null || { echo "cannot bring up the test bed"; exit 1; }
  local all=(
    one_derivation chain_output_feeds_next_build multi_output_derivation
    failing_build_reports_builder_message unreachable_builder_is_named
    unreachable_builder_falls_back_to_another twelve_parallel_over_two_builders_respect_max_jobs
    builds_queue_while_every_slot_is_busy
    builtin_hook_and_ours_share_the_load_directory bad_machines_line_is_reported_and_skipped
    relative_paths_are_explained second_build_reuses_the_ssh_connection a_session_held_after_a_build_starts_the_next
    racing_hooks_keep_the_health_state_readable dead_builder_mid_run_is_skipped_then_used_again
    corrupted_or_truncated_streams_are_detected_and_nothing_is_registered sigterm_ends_the_job_cleanly
    stale_shared_connection_socket_is_replaced check_command_says_why
    new_connections_prefer_aes_gcm_unless_the_user_chose a_first_build_with_nothing_to_upload_asks_the_builder_beside_it
    incompressible_inputs_are_copied_uncompressed
    a_first_upload_goes_raw_while_the_link_is_measured incompressible_inputs_go_first_and_measure_the_link
    fixed_output_is_checked_and_registered_with_its_content_address_and_signatures
    percent_signs_and_long_uris_in_key_uri_and_load_dir operators_see_history_status_drain_and_explain
    a_closure_of_5000_missing_paths_copies_both_ways builds_sharing_inputs_upload_each_path_once
    a_user_builds_through_nix_daemon_and_our_hook
    ssh_ng_builders_chain_fan_out_and_a_failure learned_speeds_send_the_build_to_the_faster_machine
  )
  local sel=("$@"); [ ${#sel[@]} -eq 0 ] && sel=("${all[@]}")
  for t in "${sel[@]}"; do t_run "$t" "test_$t"; done
  tb_down
  t_summary
}
main "$@"
