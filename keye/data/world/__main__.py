import sys

from keye.data.world.cli import main

sys.exit(main())
