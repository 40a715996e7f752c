"""``python -m keye.bench NAME``."""

import sys

from keye.bench import main

sys.exit(main())
