#!/usr/bin/env bash
# Held sessions, on and off: the warm fan-out (24 x 1 s builds on 3 builders
# x 2 slots) in alternating sets of three runs with build-hook's default and
# with BUILD_HOOK_HELD_SESSIONS=0, each run traced from the builders' own
# start/stop times: makespan, when the first and sixth builds started, the
# median and largest idle time of a slot between two builds, the time from
# the last build's end to nix-build's, and how many builds took a held
# session. The first run of each set starts with what the set before left.
# Usage (root): bash bench/held-sessions.sh [SETS=2]
set -eu
SETS=${1:-2}
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_builders 3
: > "$TB/machines"; for i in 1 2 3; do tb_machines_line "$i" 2 >> "$TB/machines"; done
OURS=$PWD/target/release/build-hook
printf '#!/bin/sh\nexec "%s" "$@"\n' "$OURS" > "$TB/hook-on"
printf '#!/bin/sh\nBUILD_HOOK_HELD_SESSIONS=0 exec "%s" "$@"\n' "$OURS" > "$TB/hook-off"
chmod +x "$TB/hook-on" "$TB/hook-off"
export NIX_CURRENT_LOAD; NIX_CURRENT_LOAD=$(mktemp -d /tmp/bh-held-bench.XXXXXX)
run() {
  local ev="$TB/ev.$1" t0 t1; : > "$ev"; t0=$(date +%s.%N)
  nix-build tests/nix/par.nix --arg n 24 --argstr seconds 1 --argstr events "$ev" --argstr nonce "held-$(date +%s%N)" \
    --max-jobs 0 --builders "@$TB/machines" --option build-hook "$TB/hook-$1" --no-out-link -v >/dev/null 2>"$TB/err.$1" \
    || { tail "$TB/err.$1"; exit 1; }
  t1=$(date +%s.%N)
  python3 - "$ev" "$t0" "$t1" "$1" "$(grep -c 'opened ahead' "$TB/err.$1" || true)" <<'PY'
import sys
from collections import defaultdict
ev, t0, t1, label, held = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = [l.split() for l in open(ev) if len(l.split()) >= 3]
starts = sorted(float(r[2]) for r in rows if r[1] == "start")
stops = sorted(float(r[2]) for r in rows if r[1] == "stop")
by_host = defaultdict(lambda: ([], []))
for host, kind, t, *_ in rows:
    by_host[host][0 if kind == "start" else 1].append(float(t))
gaps = []
for st, sp in by_host.values():
    st.sort(); sp.sort()
    # every start after a host's first two follows the earliest unmatched stop
    gaps += [s - e for s, e in zip(st[2:], sp)]
gaps.sort()
print(f"held {label:3s}  makespan {t1 - t0:.2f} s  first start +{starts[0] - t0:.2f}  sixth +{starts[5] - t0:.2f}"
      f"  slot idle median {gaps[len(gaps) // 2] * 1000:.0f} ms max {gaps[-1] * 1000:.0f}"
      f"  tail {t1 - stops[-1]:.2f} s  builds on a held session {held}")
PY
}
run on >/dev/null  # untimed: connections open
for _ in $(seq 1 "$SETS"); do run on; run on; run on; run off; run off; run off; done
rm -rf "$NIX_CURRENT_LOAD"
