"""``python -m flexflash``: the command line (see :mod:`flexflash.cli`)."""

import sys

from .cli import main

sys.exit(main())
