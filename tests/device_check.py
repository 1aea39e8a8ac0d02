"""The device-placement checker (a fake accelerator on the CPU: host and device tensors mixed, a Selection built on
the host) is library code, :mod:`llava.check.placement`, shared with ``python -m llava.check``; the tests import it
from here as before."""

from llava.check.placement import DeviceMixError, DevicePlacementCheck, check_method, host_tag  # noqa: F401
