# Closure-scale benchmark: one derivation whose inputs are `n` small source
# paths (made at evaluation, the same every run for a given n, so only the
# builder's store has to be emptied), and whose output lists them all, so it
# references every one of them (`refs = true`) or just counts them.
{ n, nonce, refs ? true }:
let files = builtins.genList (i: builtins.toFile "closure-bench-${toString i}" "small input ${toString i}\n") n;
in derivation {
  name = "closure-${toString n}";
  inherit nonce files;
  passAsFile = [ "files" ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" (if refs then "cat $filesPath > $out" else "wc -w < $filesPath > $out") ];
}
