"""`python -m captioner ...`: the command line (captioner/cli.py)."""

import sys

from .cli import main

sys.exit(main())
