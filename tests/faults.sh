#!/usr/bin/env bash
# Fault suite: real nix-build -> build-hook -> real sshd builders, with a
# fault injected in each phase. For every fault it checks that the build
# fails over to the healthy builder (or fails with a clear error naming the
# builder), within a bound set by the stall timeout, that no slot stays
# locked, nothing invalid is registered, no temporary is left in the store,
# and that the faulty builder is marked failing only when it was lost (not
# when it refused). Each test prints one line "FAULT <name>: <what the user
# saw> — recovered in <s> s" (docs/faults.md is made from them).
# Needs root. Usage: bash tests/faults.sh [test-name...]
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/tests/lib/testbed.sh"
T_LOGS=/tmp/bh-fault-logs T_NAME=faults
source "$REPO/tests/lib/harness.sh"
HOOK=${HOOK:-$REPO/target/release/build-hook}
BUILTIN=/usr/libexec/nix/build-remote
NIX=$REPO/tests/nix
LOAD=/nix/var/nix/current-load
# Short limits, so that every fault is noticed within seconds.
export BUILD_HOOK_CONNECT_TIMEOUT=3 BUILD_HOOK_STALL_TIMEOUT=4 BUILD_HOOK_BUILD_SILENT_TIMEOUT=4
export BUILD_HOOK_SERVER_ALIVE_INTERVAL=1 BUILD_HOOK_SERVER_ALIVE_COUNT=3 BUILD_HOOK_BACKOFF_BASE=30
# A build must end this soon after its fault: the stall timeout, a connect
# timeout for the next builder, and the next builder's own work (≤ 12 s here).
BOUND=25

nonce() { echo "$1-$(date +%s%N)-$RANDOM"; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.1f}')"; }
nb() { timeout 180 nix-build "$@" --max-jobs 0 --builders "@$TB/machines" --option build-hook "$HOOK" --no-out-link; }
health_failures() { sed -n 's/^failures=//p' "$LOAD/build-hook/health/ssh:__root@10.201.$1.2" 2>/dev/null || echo 0; }
slots_free() { local j; for j in $(seq 0 $(($2-1))); do flock -n "$LOAD/ssh:__root@10.201.$1.2-$j" true || return 1; done; }
no_temporaries() { ! ls -a /nix/store | grep -q '\.build-hook-'; }
# The first line build-hook printed, without the "building X on Y failed:" preamble.
first_hook_line() { grep -m1 -E "^build-hook:|^error: build of" "$1" | sed -E "s/^build-hook: building '[^']*' on '[^']*' failed: //; s|/nix/store/[a-z0-9]{32}-|/nix/store/…-|g" | cut -c1-200; }
report() { echo "FAULT $1: $2 — recovered in $3 s" | tee -a "$T_LOGS/faults.txt"; }

# b1 (preferred: speed 10, one slot) is the victim, b2 the healthy builder.
victim_and_spare() { { tb_machines_line 1 1 10; tb_machines_line 2 1 1; } > "$TB/machines"; }
restore() {
  tb_unshape 1; ip link set bhv1 up 2>/dev/null
  local p; for p in $(tb_nix_pids 1); do kill -CONT "$p" 2>/dev/null; done
  [ -f "$TB/b1/sshd.pid" ] || tb_start_sshd 1 >/dev/null
  rm -f "$LOAD"/build-hook/health/ssh:__root@10.201.[123].2
}

# fault_in PHASE ACTION: ACTION (kill|stop|cut) hits b1 during PHASE
# (upload|build|download); the build must finish on b2.
fault_in() {
  local phase=$1 action=$2 log="$TB/fault-$1-$2.log" ev="$TB/events.fault" args=() trigger
  restore; tb_empty_store 1; tb_empty_store 2; victim_and_spare; : > "$ev"
  case $phase in
    upload)
      head -c 30000000 /dev/urandom > "$TB/fault-input"
      args=(--arg input "$(nix-store --add "$TB/fault-input")")
      tb_shape 1 30mbit; trigger="copying 1 paths to 'ssh://root@10.201.1.2'" ;;
    build) args=(--argstr seconds 8 --argstr chatty 1); trigger="b1 start" ;;
    download)
      args=(--argstr outMB 30); tb_shape 1 30mbit; trigger="copying outputs from 'ssh://root@10.201.1.2'" ;;
  esac
  # Empty the logs first: the background job truncates them only when it starts.
  : > "$log"; : > "$log.out"
  nb "$NIX/fault.nix" --argstr nonce "$(nonce "$phase-$action")" --argstr events "$ev" "${args[@]}" >"$log.out" 2>"$log" &
  local pid=$! i
  for i in $(seq 1 300); do grep -qF "$trigger" "$log" "$ev" 2>/dev/null && break; sleep 0.1; done
  grep -qF "$trigger" "$log" "$ev" || { kill $pid; wait $pid; cat "$log"; fail "the $phase phase did not start on b1"; }
  # On first contact the download first measures the link (a few seconds at
  # 30 Mbit/s), then streams through a compressed session: wait for its zstd.
  if [ "$phase" = download ]; then
    for i in $(seq 1 100); do tb_pids_named 1 zstd | grep -q . && break; sleep 0.1; done
    tb_pids_named 1 zstd | grep -q . || { kill $pid; wait $pid; cat "$log"; fail "no compressed download started on b1"; }
  fi
  sleep 0.5
  local t0; t0=$(now)
  case $action in
    kill) tb_kill_all 1 ;;
    stop) for i in $(tb_nix_pids 1); do kill -STOP "$i"; done ;;
    cut) ip link set bhv1 down ;;
  esac
  wait $pid; local rc=$? t1; t1=$(now)
  cat "$log"
  local took; took=$(secs "$t0" "$t1")
  restore
  [ $rc -eq 0 ] || fail "the build failed instead of moving to b2"
  out=$(tail -1 "$log.out"); nix-store --verify-path "$out" || fail "the output is not valid"
  grep -q "failed (.*building '.*' on 'ssh://root@10.201.2.2' instead" "$log" || fail "no fail-over message"
  python3 -c "import sys; sys.exit(0 if $took < $BOUND else 1)" || fail "recovery took $took s (more than $BOUND)"
  slots_free 1 1 && slots_free 2 1 || fail "a slot stayed locked"
  no_temporaries || fail "temporaries left in the store"
  report "b1 $action during $phase" "$(first_hook_line "$log")" "$took"
}

test_killed_during_upload() { fault_in upload kill; }
test_killed_during_build() { fault_in build kill; }
test_killed_during_download() { fault_in download kill; }
test_stalled_during_upload() { fault_in upload stop; }
test_stalled_during_build() { fault_in build stop; }
test_stalled_during_download() { fault_in download stop; }
test_link_cut_during_upload() { fault_in upload cut; }
test_link_cut_during_build() { fault_in build cut; }
test_link_cut_during_download() { fault_in download cut; }

test_a_build_that_keeps_talking_is_not_a_stall() {
  restore; { tb_machines_line 2 1 1; } > "$TB/machines"
  local t0; t0=$(now)
  out=$(nb "$NIX/fault.nix" --argstr nonce "$(nonce chatty)" --argstr seconds 8 --argstr chatty 1 2>"$TB/chatty.log" | tail -1)
  cat "$TB/chatty.log"
  [ -e "$out" ] || fail "a build printing every second for 8 s (silence limit 4 s) was stopped"
  ! grep -q stalled "$TB/chatty.log" || fail "reported as stalled"
}

# A builder whose store is on a small tmpfs: its own Nix refuses the upload.
test_builder_disk_full_is_a_refusal_in_its_words() {
  restore
  tb_kill_all 3; mountpoint -q "$TB/b3/nix" && umount "$TB/b3/nix"
  mount -t tmpfs -o size=20m tmpfs "$TB/b3/nix" || fail "cannot mount a tmpfs"
  tb_start_sshd 3 >/dev/null
  rm -f "$LOAD/build-hook/health/ssh:__root@10.201.3.2"
  tb_machines_line 3 1 > "$TB/machines"
  head -c 40000000 /dev/urandom > "$TB/full-input"
  local input t0 rc; input=$(nix-store --add "$TB/full-input"); t0=$(now)
  nb "$NIX/fault.nix" --argstr nonce "$(nonce full)" --arg input "$input" >/dev/null 2>"$TB/full.log"; rc=$?
  local took; took=$(secs "$t0" "$(now)")
  tb_kill_all 3; umount "$TB/b3/nix"; tb_start_sshd 3 >/dev/null
  cat "$TB/full.log"
  [ $rc -ne 0 ] || fail "the build succeeded on a full builder"
  grep -q "No space left on device" "$TB/full.log" || fail "the builder's own words are not shown"
  grep -q "the builder said" "$TB/full.log" || fail "not reported as the builder's refusal"
  [ "$(health_failures 3)" = 0 ] || fail "a full builder was marked as down"
  slots_free 3 1 || fail "slot left locked"
  no_temporaries || fail "temporaries left in the store"
  report "b3's store is full during upload" "$(first_hook_line "$TB/full.log")" "$took"
}

# A hostile builder: tests/lib/fake-builder.py as its nix-store.
hostile() { # hostile MODE EXPECTED [nix file args...]
  local mode=$1 expect=$2; shift 2
  restore
  printf '#!/bin/sh\nexec python3 %s %s "$@"\n' "$REPO/tests/lib/fake-builder.py" "$mode" > "$TB/fake-$mode"
  chmod +x "$TB/fake-$mode"
  echo "ssh://root@10.201.1.2?remote-program=$TB/fake-$mode x86_64-linux $TB/client_key 1 1 - - $(tb_hostkey_b64 1)" > "$TB/machines"
  local drv outs t0 rc; drv=$(nix-instantiate "$@" 2>/dev/null); outs=$(nix-store -q --outputs "$drv")
  t0=$(now)
  BUILD_HOOK_COMPRESS=${COMPRESS:-0} nb "$drv" >/dev/null 2>"$TB/hostile-$mode.log"; rc=$?
  local took; took=$(secs "$t0" "$(now)")
  cat "$TB/hostile-$mode.log"
  [ $rc -ne 0 ] || fail "the lie was believed: the build succeeded"
  grep -qF -- "$expect" "$TB/hostile-$mode.log" || fail "no clear error ('$expect')"
  grep -q "ssh://root@10.201.1.2" "$TB/hostile-$mode.log" || fail "the builder is not named"
  local o; for o in $outs; do
    ! nix-store --check-validity "$o" 2>/dev/null || fail "$o was registered"
    [ ! -e "$o" ] || fail "$o was left on disk"
  done
  ! nix-store --check-validity "/nix/store/00000000000000000000000000000000-forged" 2>/dev/null || fail "a forged path became valid"
  no_temporaries || fail "temporaries left in the store"
  slots_free 1 1 || fail "slot left locked"
  report "hostile builder: $mode" "$(first_hook_line "$TB/hostile-$mode.log")" "$took"
}

test_hostile_deriver_with_a_newline() { hostile deriver-newline "deriver:" "$NIX/fault.nix" --argstr nonce "$(nonce h1)"; }
test_hostile_reference_outside_the_store() { hostile ref-outside-store "reference: '/etc/passwd' is not a store path" "$NIX/fault.nix" --argstr nonce "$(nonce h2)"; }
test_hostile_reference_to_an_unknown_path() { hostile ref-unknown "neither an output of this build nor valid locally" "$NIX/fault.nix" --argstr nonce "$(nonce h3)"; }
test_hostile_nar_longer_than_announced() { hostile nar-longer "longer than the 120 bytes the builder announced" "$NIX/fault.nix" --argstr nonce "$(nonce h4)"; }
test_hostile_nar_longer_than_announced_compressed() { COMPRESS=3 hostile nar-longer "longer than the 120 bytes the builder announced" "$NIX/fault.nix" --argstr nonce "$(nonce h4z)"; }
test_hostile_nar_shorter_than_announced() { hostile nar-shorter "NAR size mismatch" "$NIX/fault.nix" --argstr nonce "$(nonce h5)"; }
test_hostile_endless_nar() { hostile nar-endless "longer than the 1048576 bytes the builder announced" "$NIX/fault.nix" --argstr nonce "$(nonce h6)"; }
test_hostile_wrong_nar_hash() { hostile bad-hash "NAR hash mismatch" "$NIX/fault.nix" --argstr nonce "$(nonce h7)"; }
test_hostile_forged_fixed_output() { hostile fixed-forged "fixed-output hash mismatch" "$NIX/fixed.nix" --argstr nonce "$(nonce h8)"; }

# 64 hooks at once (4 nix-build -j16) and Nix's own hook, one load directory.
test_64_concurrent_hooks_and_nix_s_hook_share_the_load_directory() {
  restore
  : > "$TB/machines"; for i in 1 2 3; do tb_machines_line "$i" 2 >> "$TB/machines"; done
  local ev="$TB/events.many" n; : > "$ev"; n=$(nonce many)
  local pids=() k t0; t0=$(now)
  for k in 1 2 3 4; do
    timeout 300 nix-build "$NIX/par.nix" -j16 --arg n 16 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$n" --argstr tag "o$k" \
      --max-jobs 0 --builders "@$TB/machines" --option build-hook "$HOOK" --no-out-link >/dev/null 2>"$TB/many-$k.log" &
    pids+=($!)
  done
  timeout 300 nix-build "$NIX/par.nix" -j8 --arg n 8 --argstr seconds 1 --argstr events "$ev" --argstr nonce "$n" --argstr tag nix \
    --max-jobs 0 --builders "@$TB/machines" --option build-hook "$BUILTIN" --no-out-link >/dev/null 2>"$TB/many-nix.log" &
  pids+=($!)
  local p bad=0; for p in "${pids[@]}"; do wait "$p" || bad=1; done
  local took; took=$(secs "$t0" "$(now)")
  [ $bad = 0 ] || { tail -5 "$TB"/many-*.log; fail "a build failed"; }
  [ "$(grep -c ' start ' "$ev")" = 72 ] || fail "expected 72 builds, got $(grep -c ' start ' "$ev")"
  python3 "$REPO/tests/lib/peak.py" "$ev"
  python3 "$REPO/tests/lib/peak.py" "$ev" | awk '$2 > 2 { bad=1 } END { exit bad }' || fail "a builder ran more than 2 builds at once"
  for i in 1 2 3; do slots_free "$i" 2 || fail "b$i: slot left locked"; done
  local f; for f in "$LOAD"/build-hook/health/ssh:__root@10.201.[123].2; do
    head -1 "$f" | grep -qx "build-hook-health v1" || fail "health record $f damaged"
  done
  report "64 hooks and Nix's hook at once, 72 builds on 3 × 2 slots" "every build done, at most 2 at once per builder" "$took"
}

main() {
  tb_up 3 >/dev/null || { echo "cannot bring up the test bed"; exit 1; }
  : > "$T_LOGS/faults.txt"
  local all=(
    killed_during_upload killed_during_build killed_during_download
    stalled_during_upload stalled_during_build stalled_during_download
    link_cut_during_upload link_cut_during_build link_cut_during_download
    a_build_that_keeps_talking_is_not_a_stall builder_disk_full_is_a_refusal_in_its_words
    hostile_deriver_with_a_newline hostile_reference_outside_the_store hostile_reference_to_an_unknown_path
    hostile_nar_longer_than_announced hostile_nar_longer_than_announced_compressed hostile_nar_shorter_than_announced
    hostile_endless_nar hostile_wrong_nar_hash hostile_forged_fixed_output
    64_concurrent_hooks_and_nix_s_hook_share_the_load_directory
  )
  local sel=("$@"); [ ${#sel[@]} -eq 0 ] && sel=("${all[@]}")
  for t in "${sel[@]}"; do t_run "$t" "test_$t"; done
  restore
  tb_down
  echo "== what the user sees, per fault (also in $T_LOGS/faults.txt)"; cat "$T_LOGS/faults.txt"
  t_summary
}
main "$@"
