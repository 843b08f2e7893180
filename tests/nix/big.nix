# A build with a 4 MB input (made by the test) and a 4 MB output, to corrupt.
{ nonce ? "0", input }:
derivation {
  name = "big";
  inherit nonce input;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "cat $input > $out; head -c 4000000 /dev/urandom >> $out" ];
}
