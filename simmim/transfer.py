"""`python -m simmim.transfer`: the window and resolution transfer study of `simmim.eval.transfer` (an entry point
only)."""

from simmim.eval.transfer import main

if __name__ == "__main__":
    main()
