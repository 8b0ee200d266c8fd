"""`python -m simmim.probe`: the linear probe of `simmim.eval.probe` (an entry point only)."""

from simmim.eval.probe import main

if __name__ == "__main__":
    main()
