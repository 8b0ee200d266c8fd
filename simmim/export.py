"""`python -m simmim.export`: weights for transformers and timm, from `simmim.eval.export` (an entry point only)."""

from simmim.errors import user_errors_as_messages
from simmim.eval.export import main

if __name__ == "__main__":
    with user_errors_as_messages():  # a bad option or a refused file: one line, no traceback
        main()
