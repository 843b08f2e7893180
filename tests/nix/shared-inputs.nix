# `k` derivations that all take the same `n` small source paths as inputs
# (new paths for every `nonce`) and list them in their outputs: built at
# once on one builder, their hooks race to upload the same closure.
{ n ? 300, k ? 4, nonce ? "0" }:
let
  files = builtins.genList (i: builtins.toFile "si${toString i}-${nonce}" "${toString i}-${nonce}\n") n;
in builtins.genList (j: derivation {
  name = "shared-inputs-${toString j}";
  inherit files nonce;
  passAsFile = [ "files" ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "cat $filesPath > $out" ];
}) k
