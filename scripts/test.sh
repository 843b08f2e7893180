#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, checks
# formatting and lints, runs the unit, golden and local-store tests (cargo
# test), a short run of every fuzz target, then the real end-to-end suite
# (tests/e2e.sh: real nix-build -> build-hook -> sshd builders in namespaces)
# the fault suite (tests/faults.sh) and Nix's own remote-build tests for
# Nix 2.8, 2.26 and 2.34 (tests/conformance.sh; the newer Nix in Debian
# chroots it makes). Run as root.
set -u
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh must run as root (it creates network namespaces and builds with Nix)"; exit 1; }
bash scripts/install-deps.sh || exit 1
export PATH="$HOME/.cargo/bin:$PATH"
status=0
step() { # step NAME CMD...: runs a step, remembers a failure, goes on
  local name=$1; shift
  echo "== $name"
  "$@" || { echo "FAILED: $name"; status=1; }
}
cargo_test() {
  cargo test --workspace --locked 2>&1 | tee /tmp/bh-cargo-test.log | grep -E "^(test result|test .*FAILED|failures:)|panicked"
  return "${PIPESTATUS[0]}"
}
step "cargo build --release" cargo build --release --locked
step "cargo fmt --check" cargo fmt --all --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test" cargo_test
if [ -d fuzz ]; then
  step "fuzz: every target, ${BH_FUZZ_SECONDS:-5} s each" cargo run --profile fuzz --locked -q -p bh-fuzz -- all --seconds "${BH_FUZZ_SECONDS:-5}"
fi
step "end-to-end (tests/e2e.sh)" bash tests/e2e.sh
if [ -f tests/faults.sh ]; then
  step "faults (tests/faults.sh)" bash tests/faults.sh
fi
step "conformance: Nix's own remote-build tests, Nix 2.8/2.26/2.34 (tests/conformance.sh)" bash tests/conformance.sh
step "versions: e2e scenarios with Nix 2.8/2.26/2.34 clients and a Nix 2.34 builder (tests/versions.sh)" bash tests/versions.sh
[ $status -eq 0 ] && echo "scripts/test.sh: every step passed" || echo "scripts/test.sh: some step FAILED (see above)"
exit $status
