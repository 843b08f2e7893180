# A build that fails on the builder with a recognisable message.
{ nonce ? "0" }:
derivation {
  name = "fails";
  inherit nonce;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "echo 'intentional failure on '$(hostname) >&2; exit 3" ];
}
