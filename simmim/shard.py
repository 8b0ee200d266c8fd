"""`python -m simmim.shard SRC OUT`: a folder of images packed into shards, `simmim.data.convert` (an entry point
only)."""

from simmim.data.convert import main
from simmim.errors import user_errors_as_messages

if __name__ == "__main__":
    with user_errors_as_messages():  # a bad option or a refused folder: one line, no traceback
        main()
