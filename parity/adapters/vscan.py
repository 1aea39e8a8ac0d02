"""VScan (TMLR 2026): the authors' code in ``Tencent/SelfEvolvingAgent``, folder ``VScan/`` (a copy of LLaVA's
repository: ``ROOT``), its ``llava/`` tree replacing llava-torch on the official side.

- switch, as ``VScan/llava/eval/model_vqa_loader.py`` does it: ``load_pretrained_model(..., llm_pruning=True)``
  (the eval script passes it whenever ``--layer_list`` is given, so the builder loads ``LlavaLlamaForCausalLM_X``;
  ``before_load`` sets that default of the builder's signature, since the worker calls the builder without it),
  then ``model.visual_token_num = T1`` (the builder's ``visual_token_num=`` keyword, read by
  ``get_visual_token_num``), ``model.model.layer_list = [K]``, ``model.model.image_token_list = [T1, K1]``
  (``image_token_list`` with ``visual_token_num`` inserted first). Budget B: T1 = 2B - B // 2, K1 = B // 2, our
  method's split (``split_budget``; the official README's 96 / 32 is B = 64).
- positions mapped onto the tiny model, both sides: the LLM stage after decoder layer 1, ranked with layer 2's
  attention (official ``--layer_list '[16]'`` of 32 -> ``[2]`` of 4; ours ``layer=2, scale_layers=False``); the
  local scan's CLIP layer stays the official ``attentions[5]`` (it exists in the 8-layer tower; ours
  ``local_layer=5``), the global one is the official ``attentions[-2]`` (layer 6 = ours n - 2, the default).
  Windows: 2 x 2 windows of 4 x 4 patches on the 8 x 8 grid, both sides (ours ``window=4``; the official 4 x 4
  windows of 6 x 6 on 24 x 24 would be 2 x 2 patches here, but the official local scan needs at least one pick
  per window: with k = int(T1 / 2) // 16 = 0, at T1 = 12 and 24 (B = 8, 16), ``window_cls_selection`` returns
  ``torch.tensor([[]])``, a float tensor, and ``encode_images`` fails indexing with it; with 4 windows
  k = 1 / 3 / 6 at B = 8 / 16 / 32). ``window_cls_selection`` asserts a 24 x 24 map (``N == 24 * 24``,
  ``H = W = 24``), so ``enable`` hands it the 8 x 8 map in the top-left corner of a 24 x 24 one (-inf elsewhere),
  called with ``window_size=4``: its windows 0, 1, 6 and 7 of 6 x 6 are then exactly our four 4 x 4 windows, and
  the official per-window ``torch.topk`` ranks each one's 16 patches in their row-major order, as ours does; the
  count it is given is scaled by 36 / 4 (its ``k = visual_token_num // 36`` is then our k per window), the picks
  of the 32 windows beyond the tiny grid (all -inf) are dropped and the others mapped back. Everything else
  (``encode_images``'s scans, ``token_merging``, ``forward_x`` / ``layer_prune``) runs unchanged. (Until
  2026-11-26 each of our windows sat in the corner of a 12 x 12 official window, ``window_size=12``: ``torch.topk``
  then ranked 144 entries, 128 of them -inf, and CPU ``topk`` breaks an exact tie by the vector's length: on
  seed 3, fp16, B = 16, the third image, patches 22 and 23 tie at layer 5's fp16 head mean (0.017669677734375)
  for a window's third pick, and the 144-entry call kept 22 where a 16-entry one (ours, and the official code
  on its own 4 x 4 windows) keeps 23. On the real 24 x 24 grid both codes rank 36-entry windows.)
- ``process_images`` in this tree returns ``(tensor, PIL images)`` (its eval script unpacks it); the worker
  expects the tensor, so ``before_load`` makes the function return element 0, what the eval script keeps.
- kept indices, read where the official code holds them: ``"vision"``: the ``index_mask`` ``encode_images``
  returns (the local and global picks, ascending patch indices; the official code may pick a token twice, then
  keeps fewer than T1); ``"merge"``: for every other patch (ascending), the patch its ``token_merging``
  ``argmax`` joins (captured with a ``TorchFunctionMode``); ``"llm2"``: the ``top_rank_index`` ``layer_prune``
  ranks (its ``Tensor.topk`` result, indices into the visual span, sorted).
- ``OFFICIAL = {"alone": True, "padding_side": "right"}``: ``layer_prune`` raises on anything but right padding
  (``Unexpected tokenizer_padding_side``) and takes the last prompt token at its unpadded index, so each image
  runs alone (no padding either way); a right-padded batch would not compare with our left-padded one.
- measured (CPU, seed 0, B = 8 / 16 / 32, each image alone): the official fp16 load 12 / 12 identical (kept sets,
  merges, tokens); fp32 11 / 12: at B = 8 on the fourth image one merged patch joins another target. Traced: in an
  fp32 run the official ``CLIPVisionTower.forward`` (``clip_encoder.py:77``) casts features and attentions
  ``.to(images.dtype)`` = fp32, so the scans and ``token_merging``'s ``F.cosine_similarity``
  (``llava_arch.py:178``) run in fp32; our reference mode casts them to fp16 whatever the run's dtype
  (``llava/ops/vscan.py:178`` ``sdt = VSCAN_OFFICIAL_DTYPE``, ``:97`` ``features.to(VSCAN_OFFICIAL_DTYPE)``: the
  official eval scripts' dtype). With that dtype set to fp32 for the fp32 run, the case is identical (logits 2.7e-6).
  Then (the full run of 2026-11-25) the fp16 load was 11 / 12: at B = 32 on the first image stage 2 kept another
  token (a near-tie of fp16 attention), because our merge summed in fp32 and rounded once, the official
  ``scatter_add_`` (CPU: fp32 accumulation) rounds the sum to fp16 and then divides in fp16. The reference mode now
  merges that way (``Selection(arithmetic="sequential")``): 12 / 12 in fp32 and in fp16, logits bit-identical in both.
- ours: ``vscan`` in its reference mode (``numerics="official"``) with the mappings above; recorded by wrapping the
  method's ``select_vision`` (its ``Selection``'s targets and assignment, by ``sig.patch``) and from
  ``rt.engine.selections[(0, b)]`` (the first LLM stage, before decoder layer 2).
"""

from __future__ import annotations

REPOSITORY = "Tencent/SelfEvolvingAgent"
COMMIT = "a82450e1b5e15070bee79ee8b79f8d9a97cb85f7"
PACKAGES = ("llava",)
INSTALLED = False
ROOT = "VScan"
OFFICIAL = {"alone": True, "padding_side": "right"}

#: the LLM stage (official layer_list [16] of 32 -> 2 of the tiny model's 4)
LAYER = 2
#: the local scan's CLIP layer: the official attentions[5], present in the 8-layer tower
LOCAL_LAYER = 5
#: the tiny tower's patch grid side and the window side there: 2 x 2 windows of 4 x 4 patches (module doc: the
#: official code needs at least one local pick per window)
GRID = 8
WINDOW = 4
#: the map window_cls_selection asserts, and its windows per side at window_size 6
OFFICIAL_GRID = 24


def split(budget: int) -> tuple[int, int]:
    """(T1, K1): tokens per image after the vision stage and after the LLM stage (our ``split_budget``)."""
    k1 = int(budget) // 2
    return 2 * int(budget) - k1, k1


def embed_index(p: int, grid: int = GRID, window: int = WINDOW, big: int = OFFICIAL_GRID) -> int:
    """Patch ``p`` of the ``grid`` x ``grid`` map -> its cell in the ``big`` x ``big`` map handed to the official
    ``window_cls_selection`` with ``window_size=window``: the map in the top-left corner, so that our window
    (i, j) of side ``window`` is the official window (i, j), the same patches in the same row-major order."""
    if big % window or grid % window:
        raise ValueError(f"vscan adapter: windows of {window} must tile the {grid} and the {big} grids")
    y, x = divmod(int(p), grid)
    return y * big + x


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
    # process_images returns (tensor, PIL images) here; the worker (as the eval script) keeps the tensor
    f = mu.process_images
    if "_parity_official_process_images" not in mu.__dict__:
        mu._parity_official_process_images = types.FunctionType(f.__code__, f.__globals__, f.__name__,
                                                                f.__defaults__, f.__closure__)
        f.__code__ = _tensor_only.__code__


def _embedded_windows(model, grid: int = GRID, window: int = WINDOW):
    """``window_cls_selection`` for the ``grid`` x ``grid`` map: the official function on the map laid into its
    24 x 24 one (module doc), its indices mapped back."""
    import torch

    official = type(model).window_cls_selection
    n_side = grid // window
    scale = (OFFICIAL_GRID // window) ** 2 // (n_side * n_side)  # the official windows per window of ours (9)
    cells = torch.tensor([embed_index(p, grid, window) for p in range(grid * grid)])
    back = torch.full((OFFICIAL_GRID * OFFICIAL_GRID,), -1, dtype=torch.long)
    back[cells] = torch.arange(grid * grid)

    def window_cls_selection(image_attentions, visual_token_num, window_size=6):
        B, N = image_attentions.shape
        assert N == grid * grid and window_size == 6, (N, window_size)
        k = visual_token_num // (n_side * n_side)
        if not 0 < k <= window * window:
            # k = 0: the official function returns torch.tensor([[]]) (float), which encode_images cannot index with
            raise ValueError(f"vscan adapter: {k} local picks per window (the official code needs 1 to {window ** 2})")
        big = torch.full((B, OFFICIAL_GRID * OFFICIAL_GRID), float("-inf"), dtype=image_attentions.dtype,
                         device=image_attentions.device)
        big[:, cells.to(big.device)] = image_attentions
        # k = (visual_token_num * 9) // 36 = our k per window; the official windows beyond the tiny grid are -inf
        idx = official(model, big, visual_token_num * scale, window_size=window)
        out = back.to(idx.device)[idx]
        out = out[out >= 0].view(B, -1)  # the picks of the -inf windows dropped
        assert out.shape[1] == k * n_side * n_side, "vscan adapter: not k picks in each window of the tiny grid"
        return out

    return window_cls_selection


def enable(model, method: dict) -> None:
    t1, k1 = split(method["budget"])
    if type(model).__name__ != "LlavaLlamaForCausalLM_X":
        raise RuntimeError(f"vscan: the builder loaded {type(model).__name__}, not LlavaLlamaForCausalLM_X")
    model.visual_token_num = t1
    model.model.layer_list = [LAYER]
    model.model.image_token_list = [t1, k1]
    model.window_cls_selection = _embedded_windows(model)


class _Handle:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def _capture(kind: str):
    """A TorchFunctionMode that keeps the last result of ``Tensor.<kind>`` (``argmax``: token_merging's nearest
    retained token; ``topk``: layer_prune's ranking)."""
    import torch
    from torch.overrides import TorchFunctionMode

    target = getattr(torch.Tensor, kind)

    class Capture(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.results = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is target:
                self.results.append(out)
            return out

    return Capture()


def record(model, store: list) -> list:
    import torch

    encode = model.encode_images  # bound method of the class

    def encode_images(images):
        with _capture("argmax") as cap:
            feats, index_mask, attns = encode(images)
        mask = index_mask.detach().cpu()
        store.append(("vision", torch.stack([m.nonzero().flatten() for m in mask])))
        if cap.results and not bool(mask.all()):
            near = cap.results[-1].detach().cpu()  # (B, N - T): into each image's retained patches, ascending
            store.append(("merge", torch.stack([m.nonzero().flatten()[n] for m, n in zip(mask, near)])))
        return feats, index_mask, attns

    inner = model.model
    prune = inner.layer_prune

    def layer_prune(*args, **kwargs):
        with _capture("topk") as cap:
            out = prune(*args, **kwargs)
        rank_layer = kwargs.get("rank_layer")
        store.append((f"llm{rank_layer}", torch.stack([r.indices.detach().cpu().sort().values
                                                       for r in cap.results])))
        return out

    model.encode_images = encode_images
    inner.layer_prune = layer_prune
    return [_Handle(model, "encode_images"), _Handle(inner, "layer_prune")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "vscan", {"numerics": "official", "layer": LAYER, "scale_layers": False, "local_layer": LOCAL_LAYER,
                     "window": WINDOW}


def record_ours(rt, store: list):
    from ._ours import selections

    method = rt.engine.method
    inner = method.select_vision

    def select_vision(sig):
        sel = inner(sig)
        if sel is not None and sel.targets is not None and sel.targets.numel():
            patch = sig.patch
            store.append(("vision", patch[sel.targets].sort().values[None].cpu()))
            others = (sel.assign >= 0).nonzero().flatten()
            store.append(("merge", patch[sel.targets[sel.assign[others]]][None].cpu()))
        return sel

    method.select_vision = select_vision

    def finish(n_samples: int):
        for stage, layer in enumerate(method.llm_layers):  # the engine keys an llm stage by its ordinal
            kept = selections(rt, stage, n_samples)
            if kept is not None:
                store.append((f"llm{layer}", kept))

    return finish
