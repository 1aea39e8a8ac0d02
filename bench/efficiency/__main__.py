"""``python -m bench.efficiency``: the command line of :func:`bench.efficiency.main`."""

import sys

from bench.efficiency import main

sys.exit(main())
