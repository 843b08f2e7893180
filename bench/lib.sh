#!/usr/bin/env bash
# Shared set-up of the benchmarks (source it from the repository's root):
# installs what they need, builds the hook and brings up test builders (torn
# down on exit): bench_builders N; bench_one_builder also writes a machines
# file for one builder with max-jobs 4 and sets OURS, BUILTIN and DATA.
bench_builders() { # N: what every benchmark needs, and N test builders
  bash scripts/install-deps.sh
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release --locked --bin build-hook 2>&1 | tail -1
  source tests/lib/testbed.sh
  tb_up "$1" >/dev/null
  trap tb_down EXIT
}

bench_one_builder() {
  bench_builders 1
  # BH_BENCH_SCHEME=ssh-ng: the builder is reached as ssh-ng:// (its
  # nix-daemon), by both hooks.
  tb_machines_line 1 4 | sed "s|^ssh://|${BH_BENCH_SCHEME:-ssh}://|" > "$TB/machines"
  OURS=$PWD/target/release/build-hook
  BUILTIN=/usr/libexec/nix/build-remote
  DATA=${BH_BENCH_DATA:-/tmp/bh-bench-data}
  mkdir -p "$DATA"
}
