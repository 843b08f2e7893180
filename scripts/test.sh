#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, runs the unit
# and golden tests (cargo test), then the real end-to-end suite (tests/e2e.sh:
# real nix-build -> build-hook -> sshd builders in namespaces). Run as root.
set -u
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh must run as root (it creates network namespaces and builds with Nix)"; exit 1; }
bash scripts/install-deps.sh || exit 1
export PATH="$HOME/.cargo/bin:$PATH"
echo "== cargo build --release"
cargo build --release --locked 2>&1 | tail -3 || exit 1
echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee /tmp/bh-cargo-test.log | grep -E "^(test result|test .*FAILED|failures:)|panicked"
unit=${PIPESTATUS[0]}
echo "== end-to-end (tests/e2e.sh)"
bash tests/e2e.sh
e2e=$?
[ $unit -eq 0 ] && [ $e2e -eq 0 ]
