"""``python -m vpfast``: the same as the ``vpfast`` command."""

import sys

from vpfast.cli import main

sys.exit(main())
