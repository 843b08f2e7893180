#!/usr/bin/env bash
# The e2e scenarios (chain, fan-out, failure, closure copy, log streaming)
# with each Nix version as the client — the host's Nix 2.8, Nix 2.26 in the
# trixie chroot and Nix 2.34 in the sid chroot (tests/lib/chroots.sh) — and
# then chain and fan-out with a builder running Nix 2.34: builder b22's sshd
# is the sid chroot's own, started in b22's network namespace, pivot-rooted
# into the chroot with b22's /nix bind-mounted on /nix. Chain and fan-out
# run over ssh:// and over ssh-ng:// (`nix-daemon --stdio` on the builders,
# as root: trusted) in both parts; last, per client, b22's daemon trusts
# nobody (`--force-untrusted`, as in Nix's own trustless tests): a chain
# whose only outside input is a source is built by path, and an unsigned
# input-addressed input is refused in the daemon's words, with the hook's hint.
#
# Needs root. Usage: bash tests/versions.sh
# Environment:
#   TB                  the test bed's directory (default /tmp/bh-versions)
#   BH_VERSIONS_BUILDERS  the two builder indices to use (default "21 22")
#   BH_VERSIONS_CLIENTS   which clients (default "host trixie sid")
#   BH_VERSIONS_KEEP=1    leave the builders up at the end
#   HOOK                the hook under test (default target/release/build-hook)
# Logs: /tmp/bh-versions-logs/<scenario>@<client>.log
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
export TB=${TB:-/tmp/bh-versions}
source "$REPO/tests/lib/testbed.sh"
source "$REPO/tests/lib/chroots.sh"
T_LOGS=${T_LOGS:-/tmp/bh-versions-logs}
T_NAME=versions
source "$REPO/tests/lib/harness.sh"
HOOK=${HOOK:-$REPO/target/release/build-hook}
read -r B1 B2 <<<"${BH_VERSIONS_BUILDERS:-21 22}"
CLIENTS=${BH_VERSIONS_CLIENTS:-host trixie sid}
NEW_BUILDER_CHROOT=sid   # the chroot whose Nix builder B2 runs in the last part
X=$TB/nix                # the expressions: tests/nix plus those made below
LOAD=/nix/var/nix/current-load
export BUILD_HOOK_CONNECT_TIMEOUT=${BUILD_HOOK_CONNECT_TIMEOUT:-5}
T0=$SECONDS

[ -x "$HOOK" ] || { echo "no hook at $HOOK (cargo build --release)" >&2; exit 2; }

nonce() { echo "$1-$(date +%s%N)-$RANDOM"; }
# machines I:J...: the machines file, builder I with max-jobs J; ssh:// or,
# when NG=1 (set by the ssh-ng scenarios, in their subshell), ssh-ng://: the
# builder runs `nix-daemon --stdio` (as root, so trusted) and the hook speaks
# the daemon protocol through its bridge.
NG=0
scheme() { if [ "$NG" = 1 ]; then echo ssh-ng; else echo ssh; fi; }
machines() {
  : > "$TB/machines"; local spec
  for spec in "$@"; do tb_machines_line ${spec/:/ } | sed "s|^ssh://|$(scheme)://|" >> "$TB/machines"; done
}

# ---- clients -------------------------------------------------------------
# C is the client of the running scenario: host, or a chroot's name.
# cx CMD...: run CMD as the client (on the host, or inside its chroot with
# the hook at /opt/bh/build-hook and $TB at the same path).
cx() {
  if [ "$C" = host ]; then "$@"; return; fi
  ch_run "$C" -b "$HOOK:/opt/bh/build-hook:ro" -b "$TB:$TB" \
    -e "NIX_CONFIG=$NIX_CONFIG" -e "BUILD_HOOK_CONNECT_TIMEOUT=$BUILD_HOOK_CONNECT_TIMEOUT" -- "$@"
}
client_hook() { if [ "$C" = host ]; then echo "$HOOK"; else echo /opt/bh/build-hook; fi; }
# nb ARGS...: nix-build through our hook, the machines file, no local builds.
nb() {
  cx timeout 120 nix-build "$@" --max-jobs 0 --builders "@$TB/machines" \
    --option build-hook "$(client_hook)" --no-out-link
}
client_version() { # e.g. 2.26.3
  if [ "$1" = host ]; then nix-build --version | awk '{print $NF}'; else ch_nix_version "$1"; fi
}
short() { echo "$1" | cut -d. -f1,2; }
# verify_closure OUT: OUT and its closure are valid in the client's store (hashes checked).
verify_closure() {
  cx sh -c 'nix-store --verify-path $(nix-store -qR "$1")' sh "$1" || fail "closure of $1 not valid in the client's store"
}

# ---- expressions ---------------------------------------------------------
make_expressions() {
  rm -rf "$X"; mkdir -p "$X"
  cp "$REPO"/tests/nix/chain.nix "$REPO"/tests/nix/chain-input.txt "$REPO"/tests/nix/fail.nix "$X/"
  # N independent one-second builds, each saying where it ran and in which
  # build directory (Nix >= 2.30 builds in /nix/var/nix/builds, 2.8 in /tmp).
  cat > "$X/fan.nix" <<'EOF'
{ n ? 8, nonce ? "0", events }:
builtins.genList (i: derivation {
  name = "fan${toString i}";
  inherit nonce events;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" ''
    echo "building $name on $(hostname) in $NIX_BUILD_TOP"
    echo "$(hostname) start $(date +%s.%N) $name" >> $events
    sleep 1
    echo "$(hostname) stop $(date +%s.%N) $name" >> $events
    echo "$name $(hostname)" > $out
  '' ];
}) n
EOF
  # A closure to copy both ways: n fresh source paths (the builders lack
  # them) in `groups` groups; each group is a remote build whose output
  # references its sources; the top build references every group's output,
  # so wherever it runs, the groups built on the other builder must be
  # uploaded to it, with their closures.
  cat > "$X/closure.nix" <<'EOF'
{ nonce ? "0", n ? 40, groups ? 4 }:
let
  per = n / groups;
  files = builtins.genList (i: builtins.toFile "bhc${toString i}-${nonce}" "file ${toString i} ${nonce}\n") n;
  mk = name: script: extra: derivation ({
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/bin:/usr/bin";
    args = [ "-c" script ];
  } // extra);
  group = g: mk "closure-mid${toString g}" ''
    echo "building $name on $(hostname)"
    mkdir $out; for f in $files; do cat $f >> $out/all; echo $f >> $out/refs; done
  '' { files = builtins.genList (j: builtins.elemAt files (g * per + j)) per; };
  mids = builtins.genList group groups;
in mk "closure-top" ''
  echo "building $name on $(hostname)"
  mkdir $out; for m in $mids; do cat $m/all >> $out/all; echo $m >> $out/refs; done
'' { inherit mids; }
EOF
  # Log lines two seconds apart, on stdout and stderr.
  cat > "$X/log.nix" <<'EOF'
{ nonce ? "0" }:
derivation {
  name = "logs";
  inherit nonce;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" ''
    echo "BH-MARK-1 $nonce"
    sleep 2
    echo "BH-MARK-2 $nonce" >&2
    echo ok > $out
  '' ];
}
EOF
}

# ---- builders ------------------------------------------------------------
known_hosts() { echo "10.201.$1.2 $(cut -d' ' -f1-2 "$TB/b$1/ssh/host_ed25519.pub")"; }
# on_builder I CMD: run CMD over ssh on builder I (as the hook would).
on_builder() {
  local i=$1; shift
  known_hosts "$i" > "$TB/known_hosts.b$i"
  timeout 30 ssh -i "$TB/client_key" -o UserKnownHostsFile="$TB/known_hosts.b$i" -o StrictHostKeyChecking=yes \
    -o BatchMode=yes -o ControlPath=none "root@10.201.$i.2" "$@"
}

# vs_start_sshd_chroot I NAME: builder I's sshd (and so its nix-store) is
# the chroot NAME's own: in builder I's network namespace and a new UTS
# namespace (hostname bI), ch_run pivot-roots into the chroot with the
# builder's /nix, /etc/nix and /root bind-mounted, and $TB at the same path
# (sshd_config, host key, authorized key, the events files).
vs_start_sshd_chroot() {
  local i=$1 name=$2 d="$TB/b$1"
  ip netns exec "$(tb_ns "$i")" unshare -u -- bash -c 'hostname "b$1"; source "$2"; shift 2; ch_run "$@"' \
    _ "$i" "$REPO/tests/lib/chroots.sh" "$name" \
    -b "$d/nix:/nix" -b "$d/etc-nix:/etc/nix" -b "$d/root:/root" -b "$TB:$TB" -- \
    /bin/sh -c 'mkdir -p /run/sshd && exec /usr/sbin/sshd -D -f "$1" -E "$2"' sh "$d/sshd_config" "$d/sshd.log" \
    </dev/null >"$d/sshd.out" 2>&1 &
  echo $! > "$d/sshd.pid"; disown $! 2>/dev/null
  for _ in $(seq 1 200); do
    if timeout 1 bash -c "exec 3<>/dev/tcp/10.201.$i.2/22" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "versions: sshd of b$i (chroot $name) did not come up; see $d/sshd.log, $d/sshd.out" >&2
  return 1
}

# Forget what the hooks (host's and chroots') learnt about our builders'
# health: a restarted builder must not be in back-off.
forget_health() {
  local dir i
  for dir in "$LOAD" $(for c in $CLIENTS; do [ "$c" = host ] || echo "$(ch_dir "$c")$LOAD"; done); do
    # ssh://, ssh-ng://, and ssh-ng://...?remote-program=... (the untrusting daemon)
    for i in "$B1" "$B2"; do rm -f "$dir/build-hook/health/ssh"*":__root@10.201.$i.2" "$dir/build-hook/health/ssh-ng:__root@10.201.$i.2?"*; done
  done
}

vs_down() {
  local i
  for i in "$B1" "$B2"; do
    tb_kill_all "$i"
    ip netns del "$(tb_ns "$i")" 2>/dev/null
    ip link del "bhv$i" 2>/dev/null
  done
}

# ---- scenarios (C: the client) -------------------------------------------
sc_chain() {
  machines "$B1:2" "$B2:2"
  log=$(mktemp)
  out=$(nb "$X/chain.nix" -A top --argstr nonce "$(nonce chain)" 2>"$log"); rc=$?
  cat "$log"; echo "out: $out"
  [ $rc -eq 0 ] || fail "nix-build failed ($rc)"
  assert_contains "$log" "building dep on b"
  assert_contains "$log" "building top on b"
  [ "$(cx head -1 "$out")" = hello ] || fail "chain content wrong"
  verify_closure "$out"
  # dep's output came back too (top's input, built remotely first)
  depdrv=$(grep -o "/nix/store/[a-z0-9]*-dep.drv" "$log" | head -1)
  dep=$(cx nix-store -q --outputs "$depdrv")
  [ "$(cx cat "$dep/sub/f")" = hello ] || fail "dep's output missing in the client's store"
  verify_closure "$dep"
}

# fan_out N: N one-second builds over both builders, 2 slots each.
fan_out() {
  local n=$1
  machines "$B1:2" "$B2:2"
  log=$(mktemp); ev="$TB/events.fan.$C"; : > "$ev"
  outs=$(nb "$X/fan.nix" --arg n "$n" --argstr events "$ev" --argstr nonce "$(nonce fan)" 2>"$log"); rc=$?
  cat "$log"; echo "outputs:"; echo "$outs"; echo "events:"; cat "$ev"
  [ $rc -eq 0 ] || fail "nix-build failed ($rc)"
  [ "$(echo "$outs" | grep -c '^/nix/store/.*-fan[0-9]*$')" = "$n" ] || fail "expected $n outputs"
  [ "$(grep -c ' start ' "$ev")" = "$n" ] && [ "$(grep -c ' stop ' "$ev")" = "$n" ] || fail "expected $n builds run to the end"
  grep -q "on b$B1 in " "$log" || fail "no build on b$B1"
  grep -q "on b$B2 in " "$log" || fail "no build on b$B2"
  python3 "$REPO/tests/lib/peak.py" "$ev"
  python3 "$REPO/tests/lib/peak.py" "$ev" | awk '$2 > 2 { bad=1 } END { exit bad }' || fail "a builder ran more than 2 builds at once"
  # shellcheck disable=SC2086
  cx nix-store --verify-path $outs || fail "outputs not valid in the client's store"
}
sc_fan_out() {
  fan_out 8
  # every builder is the host's Nix 2.8 here: it builds in /tmp
  assert_not_contains "$log" " in /nix/var/nix/builds/"
}

sc_failure() {
  machines "$B1:2"
  log=$(mktemp)
  nb "$X/fail.nix" --argstr nonce "$(nonce fail)" >"$log" 2>&1; rc=$?
  cat "$log"
  [ $rc -ne 0 ] || fail "nix-build succeeded"
  [ $rc -ne 124 ] || fail "nix-build timed out"
  assert_contains "$log" "intentional failure on b$B1"
  assert_contains "$log" "failed with exit code 3"
  assert_contains "$log" "error: build of '"
}

sc_closure() {
  machines "$B1:2" "$B2:2"
  log=$(mktemp)
  out=$(nb "$X/closure.nix" --argstr nonce "$(nonce clos)" 2>"$log"); rc=$?
  cat "$log"; echo "out: $out"
  [ $rc -eq 0 ] || fail "nix-build failed ($rc)"
  assert_contains "$log" "building closure-top on b"
  grep -Eq "copying [0-9]+ paths to 'ssh://" "$log" || fail "nothing was uploaded"
  [ "$(cx nix-store -qR "$out" | wc -l)" = 45 ] || fail "closure of $out is not 45 paths: $(cx nix-store -qR "$out")"
  [ "$(cx nix-store -q --references "$out" | grep -c -- '-closure-mid[0-3]$')" = 4 ] || fail "references top -> mids not registered"
  for m in $(cx nix-store -q --references "$out"); do
    [ "$(cx nix-store -q --references "$m" | grep -c -- '-bhc[0-9]*-')" = 10 ] || fail "references $m -> sources not registered"
  done
  [ "$(cx sh -c 'wc -l < "$1/all"' sh "$out")" = 40 ] || fail "top's content wrong"
  verify_closure "$out"
}

sc_log() {
  machines "$B1:2"
  log=$(mktemp); n=$(nonce log)
  # each line of nix-build's output with the time it arrived
  nb "$X/log.nix" --argstr nonce "$n" 2>&1 | while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done >"$log"
  rc=${PIPESTATUS[0]}
  cat "$log"
  [ "$rc" -eq 0 ] || fail "nix-build failed ($rc)"
  assert_contains "$log" "BH-MARK-1 $n"
  assert_contains "$log" "BH-MARK-2 $n"
  t1=$(grep -F "BH-MARK-1 $n" "$log" | head -1 | cut -d' ' -f1)
  t2=$(grep -F "BH-MARK-2 $n" "$log" | head -1 | cut -d' ' -f1)
  python3 -c "import sys; sys.exit(0 if $t2 - $t1 >= 1.5 else 1)" || fail "the lines came together ($t1, $t2): not streamed"
  drv=$(grep -o "/nix/store/[a-z0-9]*-logs.drv" "$log" | head -1)
  [ -n "$drv" ] || fail "no drv named"
  # the build log is kept by the client, as for a local build
  cx nix-store --read-log "$drv" >"$log.stored" 2>&1; cat "$log.stored"
  assert_contains "$log.stored" "BH-MARK-1 $n"
  assert_contains "$log.stored" "BH-MARK-2 $n"
  cx nix --extra-experimental-features nix-command log "$drv" >"$log.nixlog" 2>&1; cat "$log.nixlog"
  assert_contains "$log.nixlog" "BH-MARK-2 $n"
}

# ---- ssh-ng:// builders (the same builders, `nix-daemon --stdio` as root) --
sc_ssh_ng_chain() {
  NG=1
  sc_chain
  assert_contains "$log" "on 'ssh-ng://root@10.201."
  assert_not_contains "$log" "on 'ssh://"
}
sc_ssh_ng_fan_out() {
  NG=1
  sc_fan_out
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B1.2'"
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B2.2'"
  assert_not_contains "$log" "on 'ssh://"
}

# ---- with builder B2 running a newer Nix ---------------------------------
sc_builder_is_new() {
  want=$(ch_nix_version "$NEW_BUILDER_CHROOT")
  v2=$(on_builder "$B2" nix-store --version); echo "b$B2: $v2"
  v1=$(on_builder "$B1" nix-store --version); echo "b$B1: $v1"
  [ "$v2" = "nix-store (Nix) $want" ] || fail "b$B2 runs '$v2', not $want"
  [ "$v1" = "nix-store (Nix) $(client_version host)" ] || fail "b$B1 runs '$v1'"
  [ "$(on_builder "$B2" hostname)" = "b$B2" ] || fail "wrong hostname"
}

# dep on the old builder, then top (which needs dep, uploaded) on the new one.
sc_chain_new_builder() {
  n=$(nonce xchain); log=$(mktemp)
  machines "$B1:2"
  nb "$X/chain.nix" -A dep --argstr nonce "$n" 2>"$log" || { cat "$log"; fail "dep failed"; }
  machines "$B2:2"
  out=$(nb "$X/chain.nix" -A top --argstr nonce "$n" 2>>"$log"); rc=$?
  cat "$log"; echo "out: $out"
  [ $rc -eq 0 ] || fail "nix-build failed ($rc)"
  assert_contains "$log" "building dep on b$B1"
  assert_contains "$log" "building top on b$B2"
  assert_contains "$log" "copying 1 paths to '$(scheme)://root@10.201.$B2.2'"
  [ "$(cx cat "$out")" = "$(printf 'hello\nb%s' "$B2")" ] || fail "chain content wrong"
  verify_closure "$out"
}

sc_fan_out_new_builder() {
  fan_out 8
  # b2 is Nix >= 2.30 (builds in /nix/var/nix/builds), b1 the host's 2.8 (/tmp)
  grep -q "on b$B2 in /nix/var/nix/builds/" "$log" || fail "b$B2 did not build as the new Nix does"
  grep -q "on b$B1 in /tmp/nix-build-" "$log" || fail "b$B1 did not build as Nix 2.8 does"
  assert_not_contains "$log" "on b$B2 in /tmp/"
}

sc_ssh_ng_chain_new_builder() {
  NG=1
  sc_chain_new_builder
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B1.2'"
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B2.2'"
}
sc_ssh_ng_fan_out_new_builder() {
  NG=1
  sc_fan_out_new_builder
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B1.2'"
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B2.2'"
}

# ---- an untrusting nix-daemon on the new builder -------------------------
# B2's daemon as Nix 2.34's own trustless remote-build tests run it
# (tests/functional/nix-daemon-untrusting.sh, with the experimental feature
# those tests enable in nix.conf): it trusts nobody, root included. It lives
# in $TB, which B2 sees at the same path.
UNTRUSTING=$TB/nix-daemon-untrusting.sh
make_untrusting() {
  cat > "$UNTRUSTING" <<'EOF'
#!/bin/sh
export NIX_CONFIG='experimental-features = nix-command daemon-trust-override'
exec nix-daemon --force-untrusted "$@"
EOF
  chmod 755 "$UNTRUSTING"
}
# The machines file: only B2, ssh-ng:// with the untrusting daemon as its
# remote program (the hook runs `<remote-program> --stdio`).
untrusting_machines() {
  tb_machines_line "$B2" 2 | sed "s|^ssh://\([^ ]*\)|ssh-ng://\1?remote-program=$UNTRUSTING|" > "$TB/machines"
}

# A chain whose only input from outside is a source (content-addressed, so
# the untrusting daemon takes it unsigned): the hook copies each .drv's
# closure (content-addressed too) and has the daemon build it by path; dep's
# output, made on B2, is there for top.
sc_untrusted_chain() {
  forget_health
  untrusting_machines; cat "$TB/machines"
  log=$(mktemp)
  out=$(nb "$X/chain.nix" -A top --argstr nonce "$(nonce uchain)" -v 2>"$log"); rc=$?
  cat "$log"; echo "out: $out"
  [ $rc -eq 0 ] || fail "nix-build failed ($rc)"
  assert_contains "$log" "does not trust this user: copying the derivation and building it by path"
  [ "$(grep -c "does not trust this user" "$log")" = 2 ] || fail "expected dep and top built by path"
  assert_contains "$log" "on 'ssh-ng://root@10.201.$B2.2?remote-program=$UNTRUSTING'"
  assert_contains "$log" "building dep on b$B2"
  assert_contains "$log" "building top on b$B2"
  [ "$(cx cat "$out")" = "$(printf 'hello\nb%s' "$B2")" ] || fail "chain content wrong"
  verify_closure "$out"
}

# dep is built on B1 (input-addressed, unsigned: no builder has a signing
# key); top needs it uploaded to the untrusting daemon, which refuses.
sc_untrusted_upload() {
  forget_health
  n=$(nonce uup); log=$(mktemp)
  NG=1; machines "$B1:2"
  dep=$(nb "$X/chain.nix" -A dep --argstr nonce "$n" 2>"$log") || { cat "$log"; fail "dep failed"; }
  untrusting_machines; cat "$TB/machines"
  nb "$X/chain.nix" -A top --argstr nonce "$n" >>"$log" 2>&1; rc=$?
  cat "$log"
  [ $rc -ne 0 ] || fail "nix-build succeeded"
  [ $rc -ne 124 ] || fail "nix-build timed out"
  assert_contains "$log" "building dep on b$B1"
  assert_not_contains "$log" "building top on"
  # the daemon's words, and the hook's hint
  grep -E "cannot add path '[^ ]*-dep' because it lacks a signature by a trusted key" "$log" || fail "not refused in the daemon's words"
  grep -q "trusted-users" "$log" || fail "no hint naming trusted-users"
  # nothing of it was registered on B2
  on_builder "$B2" nix-store --check-validity "$dep" 2>/dev/null && fail "$dep is valid on b$B2"
  true
}

# ---- main ----------------------------------------------------------------
if [ "${BH_VERSIONS_KEEP:-0}" != 1 ]; then trap vs_down EXIT; fi
trap 'exit 130' INT TERM

tb_install
declare -A OK_CLIENT=()
for c in $CLIENTS; do
  if [ "$c" = host ]; then OK_CLIENT[$c]=1; continue; fi
  suite=$c   # the chroot is named after its suite: trixie, sid
  if ch_make "$c" "$suite" >&2; then OK_CLIENT[$c]=1; else OK_CLIENT[$c]=0; fi
done
if [[ " $CLIENTS " != *" $NEW_BUILDER_CHROOT "* ]]; then
  ch_make "$NEW_BUILDER_CHROOT" "$NEW_BUILDER_CHROOT" >&2 || true
fi
echo "versions: chroots ready after $((SECONDS - T0))s" >&2
tb_client_key
tb_builder "$B1" || exit 1
tb_builder "$B2" || exit 1
make_expressions
make_untrusting
forget_health

label() { echo "nix-$(short "$(client_version "$1")")"; }
no_chroot() { fail "chroot $C could not be made (see $(ch_dir "$C").*.log)"; }

for C in $CLIENTS; do
  L=$(label "$C" 2>/dev/null); [ -n "${L#nix-}" ] || L=$C
  echo "-- client $L ($C)"
  for sc in chain fan-out failure closure log ssh-ng-chain ssh-ng-fan-out; do
    if [ "${OK_CLIENT[$C]}" = 1 ]; then t_run "$sc@$L" "sc_${sc//-/_}"; else t_run "$sc@$L" no_chroot; fi
  done
done

# Builder B2 runs the newer Nix from here on (empty store, made by it).
tb_kill_all "$B2"
sleep 0.2
find "$TB/b$B2/nix" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
NB=nix-$(short "$(ch_nix_version "$NEW_BUILDER_CHROOT")")
echo "-- builder b$B2 runs $NB ($NEW_BUILDER_CHROOT chroot), b$B1 the host's Nix"
if vs_start_sshd_chroot "$B2" "$NEW_BUILDER_CHROOT"; then
  forget_health
  C=host t_run "builder-b$B2-is-$NB" sc_builder_is_new
  for C in $CLIENTS; do
    [ "${OK_CLIENT[$C]}" = 1 ] || continue
    L=$(label "$C")
    t_run "chain@$L+builder-$NB" sc_chain_new_builder
    t_run "fan-out@$L+builder-$NB" sc_fan_out_new_builder
    t_run "ssh-ng-chain@$L+builder-$NB" sc_ssh_ng_chain_new_builder
    t_run "ssh-ng-fan-out@$L+builder-$NB" sc_ssh_ng_fan_out_new_builder
    t_run "untrusted-chain@$L+builder-$NB" sc_untrusted_chain
    t_run "untrusted-upload@$L+builder-$NB" sc_untrusted_upload
  done
else
  C=host t_run "builder-b$B2-is-$NB" false
fi

echo "versions: took $((SECONDS - T0))s" >&2
t_summary
