#!/usr/bin/env bash
# The test bed: local SSH builders, each a network namespace (veth pair,
# 10.201.<i>.2 inside, 10.201.<i>.1 on the host side) plus a mount+UTS
# namespace in which a builder-owned directory is bind-mounted on /nix and
# another on /etc/nix, running a real sshd. Traffic only ever goes to these
# hosts. Source this file; every function is idempotent enough to re-run.
#
#   tb_install            apt-get what the bed needs (nix-bin, openssh-server, ...)
#   tb_up N               bring up builders b1..bN (fresh stores)
#   tb_machines_line I J  the machines-file line for builder I with max-jobs J
#   tb_stop_sshd I / tb_start_sshd I   stop/start a builder's sshd listener
#   tb_shape I RATE       shape the link to builder I (tc tbf), e.g. 100mbit
#   tb_drop_held [I]      end the sessions build-hook holds open for builder I
#   tb_down               remove everything
set -u

TB=${TB:-/tmp/bh-testbed}
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsubstituters =\nsandbox = false'

tb_install() {
  local need=()
  command -v nix-build >/dev/null || need+=(nix-bin)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null || need+=(openssh-client)
  command -v ip >/dev/null || need+=(iproute2)
  command -v tc >/dev/null || need+=(iproute2)
  command -v unshare >/dev/null || need+=(util-linux)
  command -v zstd >/dev/null || need+=(zstd)
  command -v python3 >/dev/null || need+=(python3)
  command -v flock >/dev/null || need+=(util-linux)
  [ -x /usr/bin/time ] || need+=(time)
  if [ ${#need[@]} -gt 0 ]; then
    echo "testbed: installing ${need[*]}" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  fi
  mkdir -p /run/sshd /nix/var/nix
  # Create the store's database once, now: Nix's first run creates it, and
  # tests that start several Nix commands at once must not race to do so.
  [ -e /nix/var/nix/db/schema ] || nix-store -q --hash /nonexistent >/dev/null 2>&1 || true
}

tb_ns() { echo "bhb$1"; }

tb_client_key() {
  mkdir -p "$TB"
  [ -f "$TB/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$TB/client_key" -C build-hook-test
}

tb_start_sshd() {
  local i=$1 d="$TB/b$1"
  ip netns exec "$(tb_ns "$i")" unshare -m -u --propagation private sh -c "
    hostname b$i
    mount --bind '$d/nix' /nix
    mount --bind '$d/etc-nix' /etc/nix
    mount --bind '$d/root' /root
    exec /usr/sbin/sshd -D -f '$d/sshd_config' -E '$d/sshd.log'
  " </dev/null >/dev/null 2>&1 &
  echo $! > "$d/sshd.pid"; disown $! 2>/dev/null
  for _ in $(seq 1 100); do
    if timeout 1 bash -c "exec 3<>/dev/tcp/10.201.$i.2/22" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "testbed: sshd of b$i did not come up; see $d/sshd.log" >&2
  return 1
}

tb_stop_sshd() {
  local d="$TB/b$1"
  [ -f "$d/sshd.pid" ] || return 0
  local pid; pid=$(cat "$d/sshd.pid")
  # The listener is the sshd exec'd by the unshare'd shell: kill the process tree's root.
  pkill -TERM -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  rm -f "$d/sshd.pid"
}

# (Each builder also gets its own /root, as a separate host would: the test
# machine's own root dotfiles must not slow down or change every ssh session.)

# Kill every process running inside builder I's namespace (sessions too).
# Ends the sessions build-hook holds open for builder I's next build (all
# builders' without I): a held session's nix-store runs on the builder with
# the store and nix.conf it started with, so a test or benchmark that wipes
# the store or changes the configuration under a running builder drops them
# first, as it stops the builder's other Nix processes.
tb_drop_held() {
  # pkill exits 1 when nothing matched: not an error, also under `set -e`.
  if [ -n "${1:-}" ]; then pkill -f "build-hook __hold .* root@10\.201\.$1\.2 " 2>/dev/null || true
  else pkill -f "build-hook __hold " 2>/dev/null || true; fi
}

tb_kill_all() {
  tb_drop_held "$1"
  local pids; pids=$(ip netns pids "$(tb_ns "$1")" 2>/dev/null)
  if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
  rm -f "$TB/b$1/sshd.pid"
}

tb_builder() {
  local i=$1 ns d="$TB/b$1"
  ns=$(tb_ns "$i")
  tb_kill_all "$i"
  ip netns del "$ns" 2>/dev/null
  ip link del "bhv$i" 2>/dev/null
  rm -rf "$d"; mkdir -p "$d/nix" "$d/etc-nix" "$d/ssh" "$d/root"
  printf 'build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\n' > "$d/etc-nix/nix.conf"
  ssh-keygen -q -t ed25519 -N '' -f "$d/ssh/host_ed25519" -C "b$i"
  cat > "$d/sshd_config" <<CFG
ListenAddress 10.201.$i.2
Port 22
HostKey $d/ssh/host_ed25519
PidFile none
PermitRootLogin prohibit-password
AuthorizedKeysFile $TB/client_key.pub
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
PrintMotd no
StrictModes no
AcceptEnv LANG
# DEBUG1 logs each new connection's negotiated cipher (tests check it).
LogLevel DEBUG1
CFG
  ip netns add "$ns"
  ip link add "bhv$i" type veth peer name "bhp$i"
  ip link set "bhp$i" netns "$ns"
  ip addr add "10.201.$i.1/24" dev "bhv$i"
  ip link set "bhv$i" up
  ip netns exec "$ns" ip addr add "10.201.$i.2/24" dev "bhp$i"
  ip netns exec "$ns" ip link set "bhp$i" up
  ip netns exec "$ns" ip link set lo up
  tb_start_sshd "$i"
}

tb_up() {
  tb_install
  tb_client_key
  local n=$1 i
  for i in $(seq 1 "$n"); do tb_builder "$i" || return 1; done
  echo "$n" > "$TB/count"
}

tb_hostkey_b64() { base64 -w0 < "$TB/b$1/ssh/host_ed25519.pub"; }

# Machines-file line for builder I: max jobs J (default 2), speed S (default 1).
tb_machines_line() {
  echo "ssh://root@10.201.$1.2 x86_64-linux $TB/client_key ${2:-2} ${3:-1} - - $(tb_hostkey_b64 "$1")"
}

tb_shape() {
  local i=$1 rate=$2
  tc qdisc replace dev "bhv$i" root tbf rate "$rate" burst 64kb latency 50ms
  ip netns exec "$(tb_ns "$i")" tc qdisc replace dev "bhp$i" root tbf rate "$rate" burst 64kb latency 50ms
}

tb_unshape() {
  tc qdisc del dev "bhv$1" root 2>/dev/null || true
  ip netns exec "$(tb_ns "$1")" tc qdisc del dev "bhp$1" root 2>/dev/null || true
  true
}

# Fresh store on builder I (stop, wipe, start).
tb_wipe_store() {
  local i=$1 d="$TB/b$1"
  tb_kill_all "$i"
  rm -rf "$d/nix"; mkdir -p "$d/nix"
  tb_start_sshd "$i"
}

tb_pids_named() { # tb_pids_named I NAME...: the processes with one of these names in builder I's namespace
  local p i=$1 c n; shift
  for p in $(ip netns pids "$(tb_ns "$i")" 2>/dev/null); do
    c=$(cat "/proc/$p/comm" 2>/dev/null) || continue
    for n in "$@"; do [ "$c" = "$n" ] && echo "$p"; done
  done
  return 0
}
tb_nix_pids() { tb_pids_named "$1" nix-store nix-daemon nix; } # the Nix processes running in builder I's namespace

# Empty builder I's store but keep its sshd and open ssh sessions (as a
# builder that is up and reachable but lacks the closure): only Nix
# processes are stopped.
tb_empty_store() {
  local pids
  tb_drop_held "$1"
  pids=$(tb_nix_pids "$1")
  if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
  for _ in $(seq 1 50); do
    [ -z "$(tb_nix_pids "$1")" ] && break
    sleep 0.02
  done
  # The directory itself stays: it is bind-mounted on the builder's /nix.
  find "$TB/b$1/nix" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
}

tb_down() {
  local n i
  n=$(cat "$TB/count" 2>/dev/null || echo 0)
  for i in $(seq 1 "$n"); do
    tb_kill_all "$i"
    ip netns del "$(tb_ns "$i")" 2>/dev/null
    ip link del "bhv$i" 2>/dev/null
  done
  rm -f "$TB/count"
}
