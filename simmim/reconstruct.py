"""`python -m simmim.reconstruct`: the reconstruction viewer of `simmim.pretrain.reconstruct` (an entry point only)."""

from simmim.errors import user_errors_as_messages
from simmim.pretrain.reconstruct import main

if __name__ == "__main__":
    with user_errors_as_messages():  # a bad option or a refused file: one line, no traceback
        main()
