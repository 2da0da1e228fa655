"""`python -m idefics ...` is the `idefics` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
