"""`python -m simmim.reconstruct`: the reconstruction viewer of `simmim.pretrain.reconstruct` (an entry point only)."""

from simmim.pretrain.reconstruct import main

if __name__ == "__main__":
    main()
