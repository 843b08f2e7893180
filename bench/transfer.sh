#!/usr/bin/env bash
# Transfer benchmark: real nix-build of a derivation with 20 inputs (100 MB:
# half text-like, half random) whose output copies them back, through our hook
# and Nix's built-in hook in the same run, on a fresh builder store every time,
# on an unshaped veth link and on a 100 Mbit/s tbf link; then the same with
# all-random data; then the hook's peak RSS while moving a 1 GiB path each way.
# Usage (root): bash bench/transfer.sh [ROUNDS=2]   (BH_BENCH_ONLY="first contact": those rows only)
set -eu
ROUNDS=${1:-2}
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_one_builder
bash bench/make-data.sh "$DATA" 20 5 mixed > "$DATA/mixed.nix"
bash bench/make-data.sh "$DATA" 20 5 random > "$DATA/random.nix"

# one HOOK INPUTS [WIPE] -> seconds for a fresh build on a fresh builder store.
# WIPE is tb_wipe_store (default: the builder restarts, so every build opens a
# new ssh connection) or tb_empty_store (the builder stays up; a connection
# build-hook opened for the previous build is still there, as in repeated use).
one() {
  "${3:-tb_wipe_store}" 1 >/dev/null
  local t0; t0=$(date +%s.%N)
  nix-build bench/transfer.nix --arg inputsFile "$2" --argstr nonce "t$(date +%s%N)" \
    --max-jobs 0 --builders "@$TB/machines" --option build-hook "$1" --no-out-link >/dev/null 2>"$TB/transfer.err" \
    || { cat "$TB/transfer.err"; echo "build failed with $1"; exit 1; }
  python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')"
}

# first_contact: the builder restarts and build-hook starts from an empty
# load directory every run (no shared connection, no health record, no
# learned level), as on a CI runner's first build.
first_contact() {
  tb_wipe_store 1 >/dev/null
  export NIX_CURRENT_LOAD; NIX_CURRENT_LOAD=$(mktemp -d /tmp/bh-bench-load.XXXXXX)
}

compare() { # compare LABEL INPUTS WIPE
  local o=() b=() r
  # BH_BENCH_ONLY=TEXT runs only the conditions whose label contains TEXT.
  case "$1" in *"${BH_BENCH_ONLY:-}"*) ;; *) return 0 ;; esac
  if [ "$3" != first_contact ]; then
    # One untimed warm-up each: build-hook learns its zstd level per builder
    # from the previous transfer (it then keeps it), as it would in real use.
    one "$OURS" "$2" "$3" >/dev/null; one "$BUILTIN" "$2" "$3" >/dev/null
  fi
  for r in $(seq 1 "$ROUNDS"); do o+=("$(one "$OURS" "$2" "$3")"); b+=("$(one "$BUILTIN" "$2" "$3")"); done
  unset NIX_CURRENT_LOAD; rm -rf /tmp/bh-bench-load.*
  python3 - "$1" "${o[*]}" "${b[*]}" <<'PY'
import sys, statistics
label, o, b = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
mo, mb = statistics.median(o), statistics.median(b)
print(f"{label:44s} build-hook {mo:6.2f} s  nix build-remote {mb:6.2f} s  ratio {mb/mo:5.2f}x   (runs: {o} vs {b})")
PY
}

echo "== 20 inputs, 100 MB, out copies them back; fresh builder store each run; median of $ROUNDS after a warm-up"
echo "   'new connection': the builder restarts before every build, so both hooks start with an ssh handshake"
echo "   'connection open': the builder stays up; build-hook reuses the connection it shares between builds"
echo "   'first contact': as 'new connection', and build-hook starts from an empty load directory"
echo "   every run (no health record, no learned compression level), as a fresh CI runner does"
echo "   (Nix's hook opens a new connection for every build either way)"
for link in unshaped 100mbit; do
  if [ "$link" = unshaped ]; then tb_unshape 1; name="unshaped veth"; else tb_shape 1 100mbit; name="100 Mbit/s tbf"; fi
  for data in mixed random; do
    [ "$data" = mixed ] && what=mixed || what="all random"
    compare "$what, $name, first contact" "$DATA/$data.nix" first_contact
    compare "$what, $name, new connection" "$DATA/$data.nix" tb_wipe_store
    compare "$what, $name, connection open" "$DATA/$data.nix" tb_empty_store
  done
done
tb_unshape 1

[ -n "${BH_BENCH_ONLY:-}" ] && exit 0
echo "== peak RSS of build-hook moving a 1 GiB path (input up, output down)"
bash bench/make-data.sh "$DATA" 1 1074 random > "$DATA/big.nix"
cat > "$TB/rss-hook" <<W
#!/bin/sh
exec /usr/bin/time -f "%M" -a -o "$TB/rss.txt" "$OURS" "\$@"
W
chmod +x "$TB/rss-hook"
for level in 0 6; do
  : > "$TB/rss.txt"
  t=$(BUILD_HOOK_COMPRESS=$level one "$TB/rss-hook" "$DATA/big.nix")
  echo "zstd level $level: 1 GiB up and 1 GiB down in $t s; peak RSS of the hook: $(sort -n "$TB/rss.txt" | tail -1) KiB"
done
