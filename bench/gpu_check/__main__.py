"""``python -m bench.gpu_check``: the command line of :func:`bench.gpu_check.main`."""

import sys

from bench.gpu_check import main

sys.exit(main())
