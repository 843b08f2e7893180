#!/usr/bin/env bash
# Closure-scale benchmark: copy time and hook peak memory against the number
# of paths (N small inputs, missing on the builder, and an output that
# references all of them) and against bytes (one path of 10 MB, 100 MB, 1 GB,
# up and back), our hook and Nix's built-in hook in the same run (the builder
# stays up, so build-hook's shared connection is reused, as in repeated use).
# Prints the per-path cost.
# The N inputs are new paths every run (made untimed, by evaluation), so the
# builder lacks them without its store being emptied. Deleting thousands of
# store paths right before a run makes ext4 scan past every recently freed
# inode when it creates the next ones (`recently_deleted`, seen with perf):
# up to ~1.5 ms per path, for both hooks, for minutes; that measures the
# disk's recent past, not the copy. BH_BENCH_WIPE=1 empties the builder's
# store before every run instead (the same inputs every run, as before).
# Every row is warm state: build-hook's shared connection is open and its
# compression level learned (one untimed build first); the median of ROUNDS
# runs, alternating the hooks (the builder's disk makes single runs noisy).
# Usage (root): bash bench/closure.sh [COUNTS="100 1000 5000 20000"] [SIZES_MB="10 100 1000"] [ROUNDS=1]
# ("-" for COUNTS or SIZES_MB skips that part.)
set -eu
COUNTS=${1:-100 1000 5000 20000}; SIZES=${2:-10 100 1000}; ROUNDS=${3:-1}
[ "$COUNTS" = - ] && COUNTS=""; [ "$SIZES" = - ] && SIZES=""
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_one_builder
# A hook wrapped to record two peaks (KiB): the hook's own (VmHWM, sampled
# every 20 ms by a watcher that holds none of Nix's pipes), and GNU time's
# %M, the largest of the hook and the processes it waited for. For
# build-hook the second is the local `nix-store --load-db` it starts to
# register the outputs (≈25 MB at any size, 32-35 MB at 20,000 paths), not
# build-hook itself; Nix's hook does that work in its own process.
wrap() { # wrap NAME HOOK
  cat > "$TB/own-$1" <<W
#!/bin/bash
( exec </dev/null >/dev/null 2>&1 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-
  while grep -q '^State:[[:space:]]*[RSD]' /proc/\$\$/status 2>/dev/null; do
    awk '/VmHWM/ { print \$2 }' /proc/\$\$/status >> "$TB/hwm-$1.txt"; sleep 0.02
  done ) &
exec "$2" "\$@"
W
  printf '#!/bin/sh\nexec /usr/bin/time -f "%%M" -a -o "%s" "%s" "$@"\n' "$TB/rss-$1.txt" "$TB/own-$1" > "$TB/hook-$1"
  chmod +x "$TB/hook-$1" "$TB/own-$1"
}
wrap ours "$OURS"; wrap nix "$BUILTIN"

# run NAME DRV | run NAME EXPR ARGS... -> "seconds own/with-helpers" (peak
# RSS in KiB, see wrap) for one
# build whose inputs the builder lacks: a .drv made by `closure`, or an
# expression whose inputs are the same every run (the builder's store is
# emptied first, and a nonce makes the output new).
run() {
  local name=$1; shift
  local more=()
  case $1 in
    *.drv) ;;
    *) tb_empty_store 1 >/dev/null; more=(--argstr nonce "c$(date +%s%N)") ;;
  esac
  : > "$TB/rss-$name.txt"; : > "$TB/hwm-$name.txt"
  local t0; t0=$(date +%s.%N)
  nix-build "$@" "${more[@]}" --max-jobs 0 --builders "@$TB/machines" \
    --option build-hook "$TB/hook-$name" --no-out-link >/dev/null 2>"$TB/closure.err" \
    || { tail -5 "$TB/closure.err"; echo "build failed with $name"; exit 1; }
  local secs; secs=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')")
  sleep 0.05 # the watcher's last sample
  local hwm rss; hwm=$(sort -n "$TB/hwm-$name.txt" | tail -1); rss=$(sort -n "$TB/rss-$name.txt" | tail -1)
  echo "$secs ${hwm:-0}/${rss:-0}"
}

# closure N -> what `run` builds for N small inputs the builder lacks: a new
# .drv whose inputs have fresh names (evaluated now, untimed, so they are in
# the local store), or with BH_BENCH_WIPE=1 the fixed inputs' expression.
closure() {
  if [ "${BH_BENCH_WIPE:-0}" = 1 ]; then echo bench/closure.nix --arg n "$1"; return; fi
  nix-instantiate bench/closure.nix --arg n "$1" --arg fresh true --argstr nonce "f$(date +%s%N)" 2>/dev/null
}

# runs MAKE ARGS... -> "ours_median ours_rss nix_median nix_rss" over ROUNDS
# runs, alternating the hooks (RSS: the largest of each seen); every run builds what
# `MAKE ARGS...` prints, called anew for each run.
runs() {
  local r a b ot=() nt=() orss=0/0 nrss=0/0
  maxpair() { echo "$(( ${1%/*} > ${2%/*} ? ${1%/*} : ${2%/*} ))/$(( ${1#*/} > ${2#*/} ? ${1#*/} : ${2#*/} ))"; }
  for r in $(seq 1 "$ROUNDS"); do
    read -r a b < <(run ours $("$@")); ot+=("$a"); orss=$(maxpair "$orss" "$b")
    read -r a b < <(run nix $("$@")); nt+=("$a"); nrss=$(maxpair "$nrss" "$b")
  done
  python3 -c "import statistics,sys; o=[float(x) for x in sys.argv[1].split()]; n=[float(x) for x in sys.argv[2].split()]; print(f'{statistics.median(o):.2f} $orss {statistics.median(n):.2f} $nrss')" "${ot[*]}" "${nt[*]}"
}

# One untimed build each first: the ssh connection, the builder's capability
# probe and a first learned level exist in real use after the first build.
run ours $(closure 10) >/dev/null; run nix $(closure 10) >/dev/null

echo "== warm (connection open); median of $ROUNDS run(s) per hook"
[ -n "$COUNTS" ] && echo "== paths: N small inputs missing on the builder; the output references all N"
[ -n "$COUNTS" ] && printf '%8s %12s %12s %8s %20s %20s\n' paths build-hook nix ratio "hook RSS own/all" "nix hook own/all"
declare -A T
for n in $COUNTS; do
  # with BH_BENCH_WIPE=1: evaluate once, untimed, so the fixed inputs exist
  # locally in every timed run
  [ "${BH_BENCH_WIPE:-0}" = 1 ] && nix-instantiate bench/closure.nix --arg n "$n" --argstr nonce warm >/dev/null 2>&1
  read -r to ro tn rn < <(runs closure "$n")
  T[$n]=$to
  printf '%8s %10.2f s %10.2f s %7.2fx %16s KiB %16s KiB\n' "$n" "$to" "$tn" "$(python3 -c "print($tn/$to)")" "$ro" "$rn"
done
# The floor under both hooks: the same N paths imported by Nix itself
# (`nix-store --import`, one process, no network) into a fresh store on the
# same disk as the builder's, right after: per path, Nix writes the files, a
# lock file, and a database row (slow on some virtual disks).
for n in $COUNTS; do :; done
if [ -n "$COUNTS" ]; then
  drv=$(nix-instantiate bench/closure.nix --arg n "$n" --argstr nonce warm 2>/dev/null)
  nix-store -q --references "$drv" | grep -v '\.drv$' > "$TB/floor.paths"
  nix-store --export $(cat "$TB/floor.paths") > "$TB/floor.nar"
  rm -rf "$TB/floor"; mkdir -p "$TB/floor"
  nix-store --store "local?root=$TB/floor" --import < /dev/null >/dev/null 2>&1 || true
  t0=$(date +%s.%N)
  nix-store --store "local?root=$TB/floor" --import < "$TB/floor.nar" >/dev/null
  python3 -c "import sys; t=$(date +%s.%N)-$t0; print(f'floor: Nix imports the {$n} paths into a fresh store on this disk in {t:.2f} s ({t/$n*1e6:.0f} us per path)')"
  # deleted at the end, not now: deleting its paths would slow the next runs
  rm -f "$TB/floor.nar"; trap 'rm -rf "$TB/floor"; tb_down' EXIT
fi

# First contact: the builder restarted, an empty load directory.
if [ -n "$COUNTS" ] && [ "${BH_BENCH_FIRST:-1}" = 1 ]; then
  set -- $COUNTS; n=$1; [ $# -ge 2 ] && n=$2
  restart() { # builder 1 restarted (no connection, no Nix process left)
    if [ "${BH_BENCH_WIPE:-0}" = 1 ]; then tb_wipe_store 1 >/dev/null; return; fi
    tb_kill_all 1; tb_start_sshd 1
  }
  restart
  export NIX_CURRENT_LOAD; NIX_CURRENT_LOAD=$(mktemp -d /tmp/bh-bench-load.XXXXXX)
  read -r to ro < <(run ours $(closure "$n"))
  rm -rf "$NIX_CURRENT_LOAD"; unset NIX_CURRENT_LOAD
  restart
  read -r tn rn < <(run nix $(closure "$n"))
  printf 'first contact, %s paths: build-hook %.2f s (RSS %s KiB), nix %.2f s (RSS %s KiB), ratio %.2fx\n' "$n" "$to" "$ro" "$tn" "$rn" "$(python3 -c "print($tn/$to)")"
fi

set -- $COUNTS
if [ $# -ge 2 ]; then
  first=$1; last=${!#}
  python3 -c "print(f'per-path cost of build-hook between {$first} and {$last} paths: {(${T[$last]}-${T[$first]})/($last-$first)*1e6:.0f} us')"
fi

[ -n "$SIZES" ] && echo "== bytes: one random path of S MB up, the same bytes back down"
[ -n "$SIZES" ] && printf '%8s %12s %12s %8s %20s %20s\n' MB build-hook nix ratio "hook RSS own/all" "nix hook own/all"
for mb in $SIZES; do
  bash bench/make-data.sh "$DATA" 1 "$mb" random > "$DATA/size-$mb.nix"
  read -r to ro tn rn < <(runs echo bench/transfer.nix --arg inputsFile "$DATA/size-$mb.nix")
  printf '%8s %10.2f s %10.2f s %7.2fx %16s KiB %16s KiB\n' "$mb" "$to" "$tn" "$(python3 -c "print($tn/$to)")" "$ro" "$rn"
done
