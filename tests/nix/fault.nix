# Derivations for the fault suite. `input` (a store path made by the test) is
# uploaded; `seconds` of sleep make a build phase long enough to hit; `outMB`
# of random output make a download long enough to hit; `events` records when
# and where the build ran (the builders share /tmp with the test host).
{ nonce ? "0", input ? null, seconds ? "0", outMB ? "0", events ? "/dev/null", chatty ? "0" }:
derivation ({
  name = "fault";
  inherit nonce seconds outMB events chatty;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" ''
    echo "$(hostname) start $(date +%s.%N) $name" >> $events
    i=0; while [ $i -lt $seconds ]; do
      [ "$chatty" = 1 ] && echo "still building ($i s)"
      sleep 1; i=$((i+1))
    done
    head -c $((outMB * 1000000)) /dev/urandom > $out
    [ -n "''${input:-}" ] && head -c 100 $input >> $out
    echo "$(hostname) stop $(date +%s.%N) $name" >> $events
  '' ];
} // (if input == null then {} else { inherit input; }))
