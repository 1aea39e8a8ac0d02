"""Baselines the seed papers compare against, each one module registered by name."""

from . import random  # noqa: F401
from . import visionzip, fastervlm, divprune  # noqa: F401,E401
from . import fastv, pdrop, sparsevlm, dart  # noqa: F401,E401
from . import apet, cdpruner, clse, downsample, duet, flowcut, hiprune, holov, ivcprune, mmtok, otprune, priortr, prumerge, transprune, trio, v2drop, visiontrim, vispruner, vlmpruner, vscan  # noqa: F401,E401  (2025-26 baselines, downsample control)
from . import pixelprune  # noqa: F401  (a pre-tower stage)
from . import restore  # noqa: F401  (an add-on over DivPrune / VisPruner / HoloV)
