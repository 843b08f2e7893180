#!/usr/bin/env bash
# Makes the transfer benchmark's inputs and adds them to the local store:
# N files of SIZE MB, the first half text-like (C headers and Python sources
# from this machine, never repeated), the second half random. Prints a Nix
# list of the store paths. Usage: make-data.sh DIR N SIZE_MB [text|random|mixed]
set -eu
dir=$1; n=$2; mb=$3; kind=${4:-mixed}
mkdir -p "$dir"
bytes=$((mb * 1000000))
half=$((n / 2))
textsrc="$dir/corpus"
if [ "$kind" != random ] && [ ! -s "$textsrc" ]; then
  find /usr/include /usr/lib/python3* /usr/share/perl* -type f \( -name '*.h' -o -name '*.py' -o -name '*.pm' -o -name '*.pl' \) 2>/dev/null \
    | sort | xargs cat 2>/dev/null | head -c $((half * bytes)) > "$textsrc"
fi
echo "["
for i in $(seq 0 $((n - 1))); do
  f="$dir/$kind-$n-$mb-$i"
  if [ ! -s "$f" ]; then
    if [ "$kind" = mixed ] && [ "$i" -lt "$half" ] || [ "$kind" = text ]; then
      tail -c +$((i % half * bytes + 1)) "$textsrc" | head -c "$bytes" > "$f"
    else
      head -c "$bytes" /dev/urandom > "$f"
    fi
  fi
  echo "  (builtins.storePath \"$(nix-store --add "$f")\")"
done
echo "]"
