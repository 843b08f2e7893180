#!/usr/bin/env bash
# Dispatch benchmark: our hook against Nix's built-in hook, in the same run.
#  1. reply latency, driving the hook protocol directly (decline and accept);
#  2. makespan of real `nix-build` over N independent S-second derivations on
#     B builders x J slots, with the ideal and the peak busy slots per builder:
#     build-hook on first contact (builders restarted, empty load directory)
#     and warm (connections open), its two other ways of waiting for a slot
#     (inside the try; postponing at once), Nix's own hook, and as a floor
#     the same builds run by Nix itself on this machine, B x J at once.
# Usage (root): bash bench/dispatch.sh [N=24] [S=1] [B=3] [J=2] [ROUNDS=2]
# (BH_BENCH_POSTPONE=0 skips the slow postpone-at-once run.)
set -eu
N=${1:-24}; S=${2:-1}; B=${3:-3}; J=${4:-2}; ROUNDS=${5:-2}
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin build-hook --example reply_latency 2>&1 | tail -1
source tests/lib/testbed.sh
tb_up "$B" >/dev/null
trap tb_down EXIT
: > "$TB/machines"; for i in $(seq 1 "$B"); do tb_machines_line "$i" "$J" | sed "s|^ssh://|${BH_BENCH_SCHEME:-ssh}://|" >> "$TB/machines"; done
OURS=$PWD/target/release/build-hook
BUILTIN=/usr/libexec/nix/build-remote

echo "== reply latency (median of 30, from process start to the reply line)"
drv=$(nix-instantiate tests/nix/chain.nix -A dep --argstr nonce "lat-$(date +%s)" 2>/dev/null)
./target/release/examples/reply_latency "$TB/machines" "$drv" 30

# Hook variants, each a wrapper that sets build-hook's knobs:
#   queue (default): builds accepted while every slot is busy wait in a queue,
#     one per slot, connected, and start the moment a slot frees;
#   wait in try: BUILD_HOOK_QUEUE=0, the try itself waits up to 3 s for a slot;
#   postpone at once: BUILD_HOOK_QUEUE=0 BUILD_HOOK_SLOT_WAIT_MS=0, as Nix's
#     own hook answers (Nix then sleeps its 5 s poll interval).
variant() { printf '#!/bin/sh\n%s exec "%s" "$@"\n' "$2" "$OURS" > "$TB/hook-$1"; chmod +x "$TB/hook-$1"; echo "$TB/hook-$1"; }
Q=$(variant queue ""); W=$(variant wait "BUILD_HOOK_QUEUE=0"); P=$(variant postpone "BUILD_HOOK_QUEUE=0 BUILD_HOOK_SLOT_WAIT_MS=0")

# makespan LABEL HOOK [first|local]: one nix-build of the N builds; "first"
# restarts every builder (no open connection) and gives the hook an empty load
# directory (no health, no history), as on a CI runner's first build; "local"
# has Nix build them itself on this machine, B x J at once, with no builder:
# the floor that Nix's own scheduling leaves, which no hook beats.
makespan() {
  local label=$1 hook=$2 ev="$TB/events.bench" t0 t
  local how=(--max-jobs 0 --builders "@$TB/machines" --option build-hook "$hook")
  # (With no builders, Nix 2.8 still starts its default hook once, which
  # declines for good.)
  [ "${3:-}" = local ] && how=(--max-jobs $((B * J)) --builders "")
  : > "$ev"
  if [ "${3:-}" = first ]; then
    for i in $(seq 1 "$B"); do tb_wipe_store "$i" >/dev/null; done
    export NIX_CURRENT_LOAD; NIX_CURRENT_LOAD=$(mktemp -d /tmp/bh-bench-load.XXXXXX)
  fi
  t0=$(date +%s.%N)
  nix-build tests/nix/par.nix --arg n "$N" --argstr seconds "$S" --argstr events "$ev" \
    --argstr nonce "bench-$(date +%s%N)" "${how[@]}" --no-out-link >/dev/null 2>"$TB/dispatch.err" || { tail -5 "$TB/dispatch.err"; echo "build failed with $label"; exit 1; }
  t=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')")
  if [ "${3:-}" = first ]; then rm -rf "$NIX_CURRENT_LOAD"; unset NIX_CURRENT_LOAD; fi
  printf '%-34s %6s s   peak busy slots: %s\n' "$label" "$t" "$(python3 tests/lib/peak.py "$ev" | tr '\n' ' ')"
  echo "$label|$t" >> "$TB/makespans"
}

echo "== makespan: $N independent ${S}s builds on $B builders x $J slots (ideal $(python3 -c "import math;print(math.ceil($N/($B*$J))*$S)") s)"
echo "   first contact: builders restarted, empty load directory; warm: build-hook's shared connections open"
echo "   (Nix's hook opens a new connection for every build either way)"
: > "$TB/makespans"
# One untimed warm run: connections and health exist in warm state.
makespan "warm-up" "$Q" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  makespan "build-hook, warm" "$Q"
  makespan "build-hook wait in try, warm" "$W"
  makespan "nix build-remote" "$BUILTIN"
  makespan "floor: Nix building locally" "" local
  makespan "build-hook, first contact" "$Q" first
  # The builders restarted: open the shared connections again, untimed.
  N=$((B * J)) makespan "warm-up" "$Q" >/dev/null
done
if [ "${BH_BENCH_POSTPONE:-1}" = 1 ]; then
  makespan "build-hook postpone at once, warm" "$P"
fi
python3 - "$TB/makespans" <<'PY'
import sys, statistics
d = {}
for l in open(sys.argv[1]):
    name, t = l.rstrip("\n").rsplit("|", 1)
    if name != "warm-up":
        d.setdefault(name, []).append(float(t))
nix = statistics.median(d["nix build-remote"])
print(f"medians (Nix's hook {nix:.2f} s):")
for name, ts in d.items():
    m = statistics.median(ts)
    print(f"  {name:34s} {m:6.2f} s   {nix/m:5.2f}x Nix's hook   (runs: {ts})")
PY
rm -f "$TB/makespans"
