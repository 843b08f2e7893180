# `k` derivations that all take the same `n` small source paths as inputs
# (new paths for every `nonce`) and list them in their outputs: built at
# once on one builder, their hooks race to upload the same closure. Each is
# large-closure.nix's derivation under another name.
{ n ? 300, k ? 4, nonce ? "0" }:
let base = import ./large-closure.nix { inherit n nonce; freshInputs = true; };
in builtins.genList (j: derivation (base.drvAttrs // { name = "shared-inputs-${toString j}"; })) k
