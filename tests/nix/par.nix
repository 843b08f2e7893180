# N independent derivations that each sleep and record when they ran, on
# which builder, into `events` (the builders share /tmp with the test host;
# the sandbox is off on the test bed).
{ n ? 12, seconds ? "1", nonce ? "0", events ? "/tmp/bh-testbed/events", tag ? "p" }:
builtins.genList (i: derivation {
  name = "${tag}${toString i}";
  inherit nonce events seconds;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" ''
    echo "$(hostname) start $(date +%s.%N) $name" >> $events
    sleep $seconds
    echo "$(hostname) stop $(date +%s.%N) $name" >> $events
    echo done > $out
  '' ];
}) n
