#!/usr/bin/env bash
# Demo on a built-in default: brings up two local SSH builders (network +
# mount namespaces with their own /nix and a real sshd), then has real Nix
# build, through build-hook: a two-step chain (one remote output feeds the
# next build) and 8 one-second derivations spread over both builders.
# Prints where each build ran and the results, then removes the builders.
# Run as root on a Debian machine: bash scripts/demo.sh
set -eu
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked 2>&1 | tail -1
source tests/lib/testbed.sh
echo "== bringing up builders b1 and b2"
tb_up 2
trap tb_down EXIT
{ tb_machines_line 1 2; tb_machines_line 2 2; } > "$TB/machines"
echo "== machines file ($TB/machines):"; cut -c1-80 "$TB/machines" | sed 's/$/…/'
nonce="demo-$(date +%s)"
run() { nix-build "$@" --argstr nonce "$nonce" --max-jobs 0 --builders "@$TB/machines" \
          --option build-hook "$PWD/target/release/build-hook" --no-out-link; }
echo "== building a chain (dep -> top) remotely"
top=$(run tests/nix/chain.nix -A top)
echo "result $top:"; sed 's/^/  /' "$top"
echo "== building 8 independent one-second derivations on 2 builders x 2 slots"
: > "$TB/events.demo"
start=$(date +%s.%N)
run tests/nix/par.nix --arg n 8 --argstr events "$TB/events.demo" >/dev/null
python3 -c "print(f'8 builds took {$(date +%s.%N)-$start:.1f} s (ideal 2 s)')"
echo "builds per builder:"; grep ' start ' "$TB/events.demo" | cut -d' ' -f1 | sort | uniq -c
echo "peak concurrent builds per builder (max jobs 2):"; python3 tests/lib/peak.py "$TB/events.demo"
echo "== done: every output above was built on a builder and copied back into the local store"
