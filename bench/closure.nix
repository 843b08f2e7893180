# The closure-scale benchmark's derivation: N small inputs, the same every
# run for a given N (only the builder's store is emptied), and an output that
# references all of them. See tests/nix/large-closure.nix.
{ n, nonce }: import ../tests/nix/large-closure.nix { inherit n nonce; freshInputs = false; }
