"""`python -m idefics.demo`: rebuild the demo model (see `idefics.demo.build`)."""

import sys

from .build import main

if __name__ == "__main__":
    sys.exit(main())
