#!/usr/bin/env bash
# Re-records the golden captures in this directory from real Nix (2.8.0 when
# they were committed), using the project's test bed. Run as root:
#   bash remote-lib/tests/golden/record.sh
#
# hello-file.nar  `nix-store --dump` of a file holding "hello\n"
# dir.nar         `nix-store --dump` of: link -> sub/f, sub/f = "hello\n", x = "abc" (executable)
# hook-stdin.bin  everything Nix's worker wrote to the hook's stdin for one accepted
#                 build of `top` (one input, `dep`): 91 settings, one `try`, the
#                 input set and wanted outputs. Recorded by a wrapper hook that
#                 tees stdin into Nix's own /usr/libexec/nix/build-remote.
# serve-s2c.bin   what the builder's `nix-store --serve --write` sent to Nix's
#                 built-in hook for a derivation with no inputs whose output is a
#                 file holding "hello\n": handshake, QueryValidPaths reply,
#                 BuildDerivation result, QueryPathInfos reply, the 120-byte NAR.
#                 Recorded by an `ssh` wrapper first in PATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
source "$repo/tests/lib/testbed.sh"
tb_up 1 >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

printf 'hello\n' > "$work/hello"
nix-store --dump "$work/hello" > "$here/hello-file.nar"
mkdir -p "$work/dir/sub"
printf 'hello\n' > "$work/dir/sub/f"; ln -s sub/f "$work/dir/link"; printf abc > "$work/dir/x"; chmod +x "$work/dir/x"
nix-store --dump "$work/dir" > "$here/dir.nar"

tb_machines_line 1 1 > "$work/machines"
nonce="golden-$(date +%s)-$$"

# hook stdin
cat > "$work/rec-hook" <<HOOK
#!/usr/bin/env bash
tee "$work/stdin.\$\$" | /usr/libexec/nix/build-remote "\$@"
HOOK
chmod +x "$work/rec-hook"
nix-build "$repo/tests/nix/chain.nix" -A top --argstr nonce "$nonce" --max-jobs 0 \
  --builders "@$work/machines" --option build-hook "$work/rec-hook" --no-out-link >/dev/null 2>&1
for f in "$work"/stdin.*; do
  if grep -q -- '-top.drv' "$f"; then cp "$f" "$here/hook-stdin.bin"; fi
done

# serve replies
mkdir -p "$work/bin"
cat > "$work/bin/ssh" <<WRAP
#!/usr/bin/env bash
exec /usr/bin/ssh "\$@" > >(tee "$work/s2c.\$\$")
WRAP
chmod +x "$work/bin/ssh"
cat > "$work/hello.nix" <<NIX
derivation { name = "hello"; nonce = "$nonce"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo hello > \$out" ]; PATH = "/bin:/usr/bin"; }
NIX
PATH="$work/bin:$PATH" nix-build "$work/hello.nix" --max-jobs 0 --builders "@$work/machines" \
  --option build-hook /usr/libexec/nix/build-remote --no-out-link >/dev/null 2>&1
sleep 0.5
cp "$(ls -S "$work"/s2c.* | head -1)" "$here/serve-s2c.bin"
ls -l "$here"
