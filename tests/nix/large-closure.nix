# A derivation whose input closure is `n` small source paths (made at
# evaluation) and whose output lists them, so it references them all. With
# `freshInputs` the inputs' names carry `nonce` (new paths every run, so the
# builder lacks all of them); without, they are the same every run for a
# given n (the closure benchmark empties the builder's store instead).
{ n ? 5000, nonce ? "0", freshInputs ? true }:
let
  tag = if freshInputs then "-${nonce}" else "";
  files = builtins.genList (i: builtins.toFile "lc${toString i}${tag}" "${toString i}${tag}\n") n;
in derivation {
  name = "large-closure-${toString n}";
  inherit files nonce;
  passAsFile = [ "files" ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "cat $filesPath > $out" ];
}
