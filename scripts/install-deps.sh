#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine (as root):
# Nix 2.x (nix-bin), OpenSSH, iproute2, util-linux, zstd, python3, and a Rust
# toolchain if cargo is missing.
set -eu
source "$(dirname "$0")/../tests/lib/testbed.sh"
tb_install
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"
  else apt-get install -y -qq cargo rustc >&2; fi
fi
