"""ApET (CVPR 2026): the authors' repository ``MaQianKun0/ApET`` (a copy of LLaVA's repository; also ``qwen/`` and
``video-llava/`` trees, not used here), its ``llava/`` tree replacing llava-torch on the official side.

- switch, as ``llava/eval/model_vqa_loader.py`` does it: ``load_pretrained_model(..., llm_pruning=True)`` (the
  eval script passes it whenever ``--layer_list`` is given: the builder loads ``LlavaLlamaForCausalLM_X``;
  ``before_load`` sets that default of the builder's signature, since the worker calls the builder without it),
  then ``model.visual_token_num = T1`` (the builder's ``visual_token_num=`` keyword), ``model.model.basis_token_num
  = k``, ``layer_list = [K]``, ``image_token_list = [T1, K1]`` (``visual_token_num`` inserted first),
  ``visual_id = 0``. Budget B: T1 = 2B - B // 2, K1 = B // 2, our method's split (the README's 96 / 32 is B = 64).
- positions mapped onto the tiny model, both sides: the LLM stage after decoder layer 1 (official ``--layer_list
  '[16]'`` of 32 -> ``[2]`` of 4; ours ``layer=2, scale_layers=False``); the basis: k = 3 (official
  ``--basis_token_num 10`` against 96 / 32 tokens; the official stage 2 needs k < K1, else ``errors_indices[:-k]``
  is empty and ``token_merging`` fails: K1 = 4 at B = 8; ours ``basis=3``).
- the FPS start: the official ``fps`` (``llava/model/utils.py``) starts at an unseeded ``torch.randint(0, N)``; ours
  draws it per sample from ``seed`` and the sample's key. Both are pinned here to the same start, ``DRAWS[0] % N``
  before the LLM and ``DRAWS[1] % N`` at the LLM stage: ``enable`` wraps the ``fps`` that ``llava_arch`` and
  ``modeling_llama_x`` call so that its ``torch.randint`` returns that start (``fps`` itself runs unchanged),
  ``record_ours`` has the method's ``_draws`` return the same draws.
- ``process_images`` in this tree returns ``(tensor, PIL images)`` (its eval script unpacks it); the worker
  expects the tensor, so ``before_load`` makes the function return element 0, what the eval script keeps.
- kept indices, read where the official code holds them (``record``: the picks the wrapped ``fps`` returns, and a
  ``TorchFunctionMode`` on ``encode_images`` / ``layer_prune`` keeping the results of their ``torch.topk`` (the error
  ranking E) and ``Tensor.argmax`` (``token_merging``'s nearest target)); per stage (suffix 1: before the LLM, in
  the patches; 2: at the LLM stage, in the visual tokens entering it): ``basis`` (the FPS picks, pick order),
  ``targets`` (E[:T - k], error order), ``tail`` (E[T - k:], whose places the basis tokens take; ascending),
  ``vision`` / ``llm2`` (E, the kept places, ascending), ``merge`` (for every token outside E, ascending, the
  target its ``argmax`` joins: the basis tokens among them, as the official code merges them too).
- ``OFFICIAL = {"alone": True, "padding_side": "right"}``: ``layer_prune`` raises on anything but right padding
  and takes the last prompt token at its unpadded index, so each image runs alone (no padding either way).
- fp32 cannot run officially: ``encode_images`` casts the features to fp16 (``image_features.half()``,
  ``llava_arch.py``) before the projector, whose fp32 weights then refuse them; compare the official fp16 load.
- ``llava/model/llava_arch.py:24-25`` imports ``matplotlib.pyplot`` / ``matplotlib.colors`` (never used; the
  repository's requirements.txt pins matplotlib 3.10.3): the official side needs matplotlib importable, which
  ``.venv-official`` does not hold; tests/test_parity_apet.py then runs a copy of the clone's ``llava/`` beside
  empty ``matplotlib`` modules.
- ours: ``apet`` in its reference mode (``numerics="official"``: ``merge_seeds`` and ``seed_slots="replace"``,
  ``space="vision"``) with the mappings above; recorded by wrapping ``baselines.apet.apet_units`` during the
  prefill (its seeds, targets, slots and assignment).
"""

from __future__ import annotations

REPOSITORY = "MaQianKun0/ApET"
COMMIT = "70cc01b215f4d74c5661c699919fe3aeda48bed0"
PACKAGES = ("llava",)
INSTALLED = False
#: the precisions the official code runs in (fp32 raises in its encode_images: docstring)
DTYPES = ("fp16",)
OFFICIAL = {"alone": True, "padding_side": "right"}

#: the LLM stage (official layer_list [16] of 32 -> 2 of the tiny model's 4)
LAYER = 2
#: basis tokens per unit (official 10; below K1 = 4, the smallest stage-2 count here)
BASIS = 3
#: the FPS start draws (before the LLM, at the LLM stage): start = draw % N on both sides
DRAWS = (37, 5)


def split(budget: int) -> tuple[int, int]:
    """(T1, K1): tokens per image after the vision stage and after the LLM stage (our ``split_budget``)."""
    k1 = int(budget) // 2
    return 2 * int(budget) - k1, k1


# ---- the official side (runs in .venv-official) ----

def _tensor_only(images, image_processor, model_cfg):
    # becomes the code of this tree's llava.mm_utils.process_images (its globals: that module's), see before_load
    return _parity_official_process_images(images, image_processor, model_cfg)[0]  # noqa: F821


def before_load(method: dict) -> None:
    import types

    import llava.mm_utils as mu
    from llava.model import builder

    # the eval script's llm_pruning=True (its --layer_list): the builder loads LlavaLlamaForCausalLM_X
    code = builder.load_pretrained_model.__code__
    names = code.co_varnames[:code.co_argcount]
    defaults = list(builder.load_pretrained_model.__defaults__)
    defaults[names.index("llm_pruning") - (len(names) - len(defaults))] = True
    builder.load_pretrained_model.__defaults__ = tuple(defaults)
    f = mu.process_images
    if "_parity_official_process_images" not in mu.__dict__:
        mu._parity_official_process_images = types.FunctionType(f.__code__, f.__globals__, f.__name__,
                                                                f.__defaults__, f.__closure__)
        f.__code__ = _tensor_only.__code__


#: the picks of the last fps call per module (filled by the pinned fps, read by record's wrappers)
_PICKS: dict = {}


def _pinned_fps(module, draw: int):
    """The module's ``fps`` with its ``torch.randint(0, N, (B,))`` start returning ``draw % N``."""
    import torch

    official = module.fps if not hasattr(module.fps, "_parity_official") else module.fps._parity_official

    def fps(x, K):
        real = torch.randint

        def randint(low, high, size, **kw):
            return torch.full(tuple(size), draw % int(high), dtype=torch.long, device=kw.get("device"))

        torch.randint = randint
        try:
            picks = official(x, K)
        finally:
            torch.randint = real
        _PICKS[module.__name__] = picks.detach().cpu().clone()
        return picks

    fps._parity_official = official
    return fps


def enable(model, method: dict) -> None:
    from llava.model import llava_arch, modeling_llama_x

    t1, k1 = split(method["budget"])
    if type(model).__name__ != "LlavaLlamaForCausalLM_X":
        raise RuntimeError(f"apet: the builder loaded {type(model).__name__}, not LlavaLlamaForCausalLM_X")
    model.visual_token_num = t1
    inner = model.model
    inner.basis_token_num = BASIS
    inner.layer_list = [LAYER]
    inner.image_token_list = [t1, k1]
    inner.visual_id = 0
    llava_arch.fps = _pinned_fps(llava_arch, DRAWS[0])
    modeling_llama_x.fps = _pinned_fps(modeling_llama_x, DRAWS[1])


class _Handle:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def _capture():
    """A TorchFunctionMode that keeps the results of ``torch.topk`` / ``Tensor.topk`` (the error ranking) and
    ``Tensor.argmax`` (``token_merging``'s nearest target)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Capture(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.topk, self.argmax = [], []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.topk, torch.Tensor.topk):
                self.topk.append(out[1].detach().cpu().clone())
            elif func is torch.Tensor.argmax:
                self.argmax.append(out.detach().cpu().clone())
            return out

    return Capture()


def _entries(stage: str, basis, ranking, nearest, n: int, k: int) -> list:
    """The recorded entries of one stage for B rows: ``basis`` (B, k), ``ranking`` (B, T) E in error order,
    ``nearest`` (B, n - T) the slot in E[:T - k] of every token outside E (ascending), n tokens."""
    import torch

    rows = {"basis": [], "targets": [], "tail": [], "kept": [], "merge": []}
    for b in range(ranking.shape[0]):
        e = ranking[b]
        outside = torch.ones(n, dtype=torch.bool)
        outside[e] = False
        rows["basis"].append(basis[b])
        rows["targets"].append(e[:-k])
        rows["tail"].append(e[-k:].sort().values)
        rows["kept"].append(e.sort().values)
        rows["merge"].append(e[:-k][nearest[b]] if nearest is not None else outside.nonzero().flatten()[:0])
    kept = "vision" if stage == "1" else f"llm{stage}"
    return [(f"basis{stage}", torch.stack(rows["basis"])), (f"targets{stage}", torch.stack(rows["targets"])),
            (f"tail{stage}", torch.stack(rows["tail"])), (kept, torch.stack(rows["kept"])),
            (f"merge{stage}", torch.stack(rows["merge"]))]


def record(model, store: list) -> list:
    from llava.model import llava_arch, modeling_llama_x

    encode = model.encode_images
    inner = model.model
    prune = inner.layer_prune

    def encode_images(images, *args, **kwargs):
        _PICKS.pop(llava_arch.__name__, None)
        with _capture() as cap:
            feats, index_mask = encode(images, *args, **kwargs)
        picks = _PICKS.pop(llava_arch.__name__, None)
        if picks is not None and cap.topk:
            n = index_mask.shape[1]
            store.extend(_entries("1", picks, cap.topk[-1], cap.argmax[-1] if cap.argmax else None, n,
                                  inner.basis_token_num))
        return feats, index_mask

    def layer_prune(*args, **kwargs):
        _PICKS.pop(modeling_llama_x.__name__, None)
        with _capture() as cap:
            out = prune(*args, **kwargs)
        picks = _PICKS.pop(modeling_llama_x.__name__, None)
        if picks is not None and cap.topk:
            stage = str(kwargs.get("rank_layer"))
            n = min(int(inner.image_token_list[kwargs.get("cur_num", 0)]), inner.image_tokens[0])
            store.extend(_entries(stage, picks, cap.topk[-1][None], cap.argmax[-1][None] if cap.argmax else None,
                                  n, inner.basis_token_num))
        return out

    model.encode_images = encode_images
    inner.layer_prune = layer_prune
    return [_Handle(model, "encode_images"), _Handle(inner, "layer_prune")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "apet", {"numerics": "official", "basis": BASIS, "layer": LAYER, "scale_layers": False}


def record_ours(rt, store: list):
    import torch

    import baselines.apet as apet_mod

    method = rt.engine.method
    method._draws = lambda sig, num_units: torch.tensor([DRAWS[0]] * num_units + [DRAWS[1]] * num_units,
                                                         device=sig.unit.device)
    real = apet_mod.apet_units
    layer = method.llm_layers[0] if method.llm_layers else None

    def apet_units(x, out, k, start, **kw):
        r = real(x, out, k, start, **kw)
        stage = "1" if kw.get("stage", "vision") == "vision" else str(layer)
        seeds, targets, slots, assign = (r[name].cpu() for name in ("seeds", "targets", "slots", "assign"))
        kept = "vision" if stage == "1" else f"llm{stage}"
        merge = [targets[b][assign[b][assign[b] >= 0]] for b in range(assign.shape[0])]
        store.extend([(f"basis{stage}", seeds), (f"targets{stage}", targets),
                      (f"tail{stage}", slots.sort(dim=1).values),
                      (kept, torch.cat([targets, slots], 1).sort(dim=1).values),
                      (f"merge{stage}", torch.stack(merge))])
        return r

    apet_mod.apet_units = apet_units

    def finish(n_samples: int):
        apet_mod.apet_units = real

    return finish
