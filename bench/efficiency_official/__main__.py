"""``python -m bench.efficiency_official``: the command line of :func:`bench.efficiency_official.main`."""

import sys

from bench.efficiency_official import main

sys.exit(main())
