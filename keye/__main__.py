"""``python -m keye``: the ``keye`` command."""

import sys

from keye.cli import main

sys.exit(main())
