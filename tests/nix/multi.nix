# One derivation with three outputs that reference each other.
{ nonce ? "0" }:
let d = derivation {
  name = "multi";
  inherit nonce;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  outputs = [ "out" "dev" "doc" ];
  PATH = "/bin:/usr/bin";
  args = [ "-c" ''
    mkdir -p $out/lib $dev/include $doc
    echo "lib on $(hostname)" > $out/lib/libm.txt
    echo "$out" > $dev/include/where-is-out
    echo "docs for $dev" > $doc/README
  '' ];
}; in { all = [ d.out d.dev d.doc ]; }
