# A fixed-output derivation: the builder must produce exactly "hello\n".
# `nonce` goes into the name, so every test run has a fresh output path.
{ nonce ? "0", content ? "hello" }:
derivation {
  name = "fixed-${builtins.replaceStrings ["." ":"] ["-" "-"] nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "echo ${content} > $out" ];
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
}
