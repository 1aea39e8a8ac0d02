"""Baselines the seed papers compare against, each one module registered by name."""

from . import random  # noqa: F401
