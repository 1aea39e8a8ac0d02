"""``python -m bench.deepspeed_check``: the command line of :func:`bench.deepspeed_check.main`."""

import sys

from bench.deepspeed_check import main

sys.exit(main())
