# The closure-scale benchmark's derivation: N small inputs and an output that
# references all of them. With `fresh`, the inputs' names carry the nonce
# (new paths every run); without, they are the same every run for a given N
# (the builder's store is emptied instead). See tests/nix/large-closure.nix.
{ n, nonce, fresh ? false }: import ../tests/nix/large-closure.nix { inherit n nonce; freshInputs = fresh; }
