"""``python -m zeroload``: the command line (see :mod:`zeroload.cli`)."""

import sys

from zeroload.cli import main

if __name__ == "__main__":
    sys.exit(main())
