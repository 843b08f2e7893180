# A chain: `dep` (which has a local source file as input, so the hook must
# upload it) feeds `top`. `nonce` makes every test run build fresh paths.
{ nonce ? "0" }:
let
  mk = name: script: extra: derivation ({
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/bin:/usr/bin";
  } // extra);
  dep = mk "dep" ''
    echo "building dep on $(hostname)"
    mkdir -p $out/sub; cat $input > $out/sub/f; ln -s sub/f $out/link
    printf '#!/bin/sh\necho hi\n' > $out/x; chmod +x $out/x
  '' { input = ./chain-input.txt; };
  top = mk "top" ''
    echo "building top on $(hostname)"
    cat ${dep}/sub/f > $out; echo "$(hostname)" >> $out
  '' {};
in { inherit dep top; }
