"""``python -m bench.loadtool``: see ``bench/loadtool/__init__.py``."""

import sys

from bench.loadtool.cli import main

if __name__ == "__main__":
    sys.exit(main())
