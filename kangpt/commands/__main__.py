"""``python -m kangpt.commands COMMAND ...``: the ``kangpt`` console script."""

import sys

from . import main

sys.exit(main())
