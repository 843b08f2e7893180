# A derivation whose input closure is `n` small source paths (made at
# evaluation; `nonce` in their names makes them new every run, so the builder
# lacks all of them) and whose output lists them, so it references them all.
{ n ? 5000, nonce ? "0" }:
let files = builtins.genList (i: builtins.toFile "lc${toString i}-${nonce}" "${toString i} ${nonce}\n") n;
in derivation {
  name = "large-closure";
  inherit files nonce;
  passAsFile = [ "files" ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "cat $filesPath > $out" ];
}
