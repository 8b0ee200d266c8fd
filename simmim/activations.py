"""`python -m simmim.activations`: the activation study of `simmim.eval.activations` (an entry point only)."""

from simmim.eval.activations import main

if __name__ == "__main__":
    main()
