#!/usr/bin/env bash
# Dispatch benchmark: our hook against Nix's built-in hook, in the same run.
#  1. reply latency, driving the hook protocol directly (decline and accept);
#  2. makespan of real `nix-build` over N independent S-second derivations on
#     B builders x J slots, with the ideal and the peak busy slots per builder.
# Usage (root): bash bench/dispatch.sh [N=24] [S=1] [B=3] [J=2] [ROUNDS=2]
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

echo "== makespan: $N independent ${S}s builds on $B builders x $J slots (ideal $(python3 -c "import math;print(math.ceil($N/($B*$J))*$S)") s)"
for r in $(seq 1 "$ROUNDS"); do
  for hook in "$OURS" "$BUILTIN"; do
    ev="$TB/events.bench"; : > "$ev"
    t0=$(date +%s.%N)
    nix-build tests/nix/par.nix --arg n "$N" --argstr seconds "$S" --argstr events "$ev" \
      --argstr nonce "bench-$r-$(date +%s%N)" --max-jobs 0 --builders "@$TB/machines" \
      --option build-hook "$hook" --no-out-link >/dev/null 2>&1 || { echo "build failed with $hook"; exit 1; }
    t=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')")
    name=$([ "$hook" = "$OURS" ] && echo build-hook || echo "nix build-remote")
    printf '%-17s round %d: %6s s   peak busy slots: %s\n' "$name" "$r" "$t" "$(python3 tests/lib/peak.py "$ev" | tr '\n' ' ')"
    echo "$name $t" >> "$TB/makespans"
  done
done
python3 - "$TB/makespans" <<'PY'
import sys, statistics
d = {}
for l in open(sys.argv[1]):
    name, t = l.rsplit(" ", 1); d.setdefault(name, []).append(float(t))
o, b = statistics.median(d["build-hook"]), statistics.median(d["nix build-remote"])
print(f"median makespan: build-hook {o:.2f} s, nix build-remote {b:.2f} s, ratio {b/o:.2f}x")
PY
rm -f "$TB/makespans"
