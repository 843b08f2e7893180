#!/usr/bin/env bash
# First contact, traced: each round builds the transfer benchmark's closure
# (20 inputs, 100 MB, copied back) three ways on a fresh builder store:
# build-hook from an empty load directory (first contact), build-hook with a
# new connection but a known builder, and Nix's built-in hook. Prints the
# three times per round and build-hook's copy lines (-v) for each of its
# builds, so a misjudged link or a wait shows.
# Usage (root): bash bench/first-contact.sh [ROUNDS=3] [DATA=mixed|random]
#   BH_BENCH_SHAPE=100mbit shapes the builder's link (tbf) first, and then
#   also prints the wire floor: what the link needs to carry the closure up
#   and down at zstd -19, and the best ratio against Nix's hook it allows.
set -eu
ROUNDS=${1:-3}; KIND=${2:-mixed}
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_one_builder
bash bench/make-data.sh "$DATA" 20 5 "$KIND" > "$DATA/first-contact.nix"
[ -n "${BH_BENCH_SHAPE:-}" ] && tb_shape 1 "$BH_BENCH_SHAPE"
LOGS=$(mktemp -d /tmp/bh-first-contact.XXXXXX)

# one HOOK LABEL -> seconds; the build's -v log (timestamped) in $LOGS/LABEL.log
one() {
  tb_wipe_store 1 >/dev/null
  local t0; t0=$(date +%s.%N)
  nix-build bench/transfer.nix --arg inputsFile "$DATA/first-contact.nix" --argstr nonce "t$(date +%s%N)" \
    --max-jobs 0 --builders "@$TB/machines" --option build-hook "$1" --no-out-link -v 2>&1 \
    | perl -MTime::HiRes=time -ne 'BEGIN{$t0=time} printf("%7.3f %s", time-$t0, $_)' > "$LOGS/$2.log"
  python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')"
}

echo "== $KIND closure, ${BH_BENCH_SHAPE:-unshaped} link; seconds per build"
printf '%6s %14s %15s %10s %8s\n' round "first contact" "new connection" "nix hook" ratio
for r in $(seq 1 "$ROUNDS"); do
  export NIX_CURRENT_LOAD; NIX_CURRENT_LOAD=$(mktemp -d /tmp/bh-bench-load.XXXXXX)
  fc=$(one "$OURS" "first-$r")
  nc=$(one "$OURS" "new-$r")
  rm -rf "$NIX_CURRENT_LOAD"; unset NIX_CURRENT_LOAD
  nx=$(one "$BUILTIN" "nix-$r")
  printf '%6s %12s s %13s s %8s s %7.2fx\n' "$r" "$fc" "$nc" "$nx" "$(python3 -c "print($nx/$fc)")"
done
if [ -n "${BH_BENCH_SHAPE:-}" ]; then
  # The wire floor on this link: the fewest bytes zstd makes of the closure
  # (-19, long window; cached beside the data, it takes ~30 s), once up and
  # once down, at the rate the shaped link carries (20 MB of random bytes
  # through ssh, the last 19 MB timed at the builder). No hook compressing
  # the stream can do better.
  fb="$DATA/first-contact-$KIND.zstd19-bytes"
  if [ ! -s "$fb" ]; then
    n=$(set -o pipefail; cat $(sed -n 's/.*storePath "\(.*\)".*/\1/p' "$DATA/first-contact.nix") | zstd -19 -T0 --long=27 -c | wc -c) || n=0
    if [ "$n" -gt 0 ]; then echo "$n" > "$fb"; fi
  fi
  head -c 20000000 /dev/urandom > "$TB/probe-20mb"
  ns=$(ssh -x -T -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i "$TB/client_key" \
    root@10.201.1.2 'head -c 1000000 >/dev/null; s=$(date +%s%N); cat >/dev/null; echo $(( $(date +%s%N) - s ))' < "$TB/probe-20mb") || ns=""
  { [ -s "$fb" ] && [ -n "$ns" ] && python3 - "$(cat "$fb")" "$ns" "$nx"; } <<'PY' || echo "wire floor: not measured"
import sys
b, ns, nx = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rate = 19.0 / (ns / 1e9)
floor = 2 * b / 1e6 / rate
print(f"wire floor: {b/1e6:.1f} MB each way at zstd -19; this link carries {rate:.1f} MB/s through ssh;"
      f" {floor:.2f} s of wire up and down. Against Nix's hook's last {nx:.2f} s, no hook that compresses"
      f" the stream can exceed {nx/floor:.2f}x (before connecting, building and registering)")
PY
fi
tb_unshape 1
for r in $(seq 1 "$ROUNDS"); do
  echo "-- round $r, first contact:"; grep "build-hook:" "$LOGS/first-$r.log" || true
done
echo "(logs: $LOGS)"
