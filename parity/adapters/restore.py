"""RESTORE (ICML 2026, arXiv 2606.01711): the authors' repository ``cvlab-yonsei/RESTORE`` (GPL-3.0; imported and
patched at run time only, none of its code is copied here): its own LLaVA tree (``llava/``) and the package ``tore``
(``tokenreduction/tore``: the three bases, ``merge.py``'s ``distinctive_anchor_merging``). This adapter is RESTORE over
HoloV (the README's example and our default base); ``restore_divprune`` / ``restore_vispruner`` are the same adapter
over the other two bases (``BASE``), importing this module.

- load: the fork's ``load_pretrained_model`` always builds ``LlavaLlamaForCausalLM_restore``, whose ``forward`` runs
  ``LlamaModel.forward_restore`` (``llava/model/modeling_llama_restore.py``). Its rotary class
  ``LlamaRotaryEmbeddingFloat`` recomputes its tables from ``inv_freq`` on each call and has no cache, which the
  worker's fp32 rebuild (``_fp32``: ``rope._set_cos_sin_cache(rope.max_seq_len_cached, ...)``) expects:
  ``before_load`` gives the class a no-op ``_set_cos_sin_cache`` and ``max_seq_len_cached = 0`` (the worker sets
  ``inv_freq`` in fp32 from the same formula; nothing of the official arithmetic changes).
- switch (``enable``), as ``llava/eval/model_vqa_loader.py`` 86-101 with ``--base <B> --n_vis n --restore``:
  ``tore.load_reduction_base(model, B, n, True)`` (it binds the base's ``prepare_inputs_labels_for_multimodal``, and
  for VisPruner its ``encode_images``, on the instance), then ``model.model.n_vis = n``, ``model.model.restore =
  True``. ``tore`` is the clone's ``tokenreduction/`` folder, put on the path (``pip install -e tokenreduction``).
- geometry: ``forward_restore`` hard-codes two facts of LLaVA-1.5-7B, replaced in a recompile of the clone's own
  source (``_official.install``, each literal refused unless found exactly once): ``self.N_sys = 35`` (the prompt
  tokens before ``<image>`` under ``vicuna_v1`` and LLaMA's tokenizer) becomes ``self.parity_n_sys``, which
  ``inputs`` sets to the image placeholder's index in the prompt's ids; ``dim, base, max_pos = 128, 10000, 4096``
  (the distance term's rotary frequencies: the 7B decoder's head dim and theta) becomes the tiny decoder's head dim
  and ``rope_theta`` (``max_pos`` stays). Nothing else is changed.
- each image alone (``OFFICIAL["alone"]``): ``forward_restore`` serves batch 1 only (``position_ids.squeeze(0)``, one
  ``N_sys``, ``merging_pattern_list[-1][0]``); its eval loader asserts batch size 1.
- recorded (``record``, after the prefill's ``forward_restore``; ours in the same layout): ``"vision"`` the base's kept
  patches (``model.model.retained_indices``), ascending; ``"rows"`` (1, N) the LLM row each patch ends in (a kept
  patch its own row, a dropped one its cluster's), from the final ``merging_pattern_list[-1]`` (the rows in the order
  the LLM gets them, after ``reorder_vis_position_ids``); ``"positions"`` (1, n) each visual row's position minus the
  image's start, read from the ``position_ids`` decoder layer 0 receives (ours: the same from our decoder's layer 0).
- ours: ``restore`` with ``base=<B>``, ``numerics="official"`` and the base in its parity reference mode
  (``base_options``: the base adapter's ``ours`` options; RESTORE's own recipe for the base, VisPruner's
  ``important_ratio=0.5`` and [CLS] attentions in the images' dtype (``official_attention="images"``: the fork's
  ``clip_encoder.py`` casts them) and HoloV's ``overflow="redistribute"``, is applied by ``restore`` itself).
"""

from __future__ import annotations

REPOSITORY = "cvlab-yonsei/RESTORE"
COMMIT = "9b27e687a2b877d6facacae093b8d9686afa5c6f"
PACKAGES = ("llava", "tokenreduction")
INSTALLED = False
OFFICIAL = {"alone": True}
#: n of 64 patches: the base keeps n / 2, the other n / 2 are clusters of the rest
BUDGETS = (16, 32)

#: the base: our registry name, the official ``--base`` word
BASE = "holov"
OFFICIAL_BASE = "HoloV"

#: the literals of ``forward_restore`` that encode LLaVA-1.5-7B, and what they become on the tiny weights
N_SYS_LITERAL = "self.N_sys = 35"
N_SYS_REPLACEMENT = "self.N_sys = self.parity_n_sys"
ROPE_LITERAL = "dim, base, max_pos = 128, 10000, 4096"
ROPE_REPLACEMENT = ("dim, base, max_pos = self.config.hidden_size // self.config.num_attention_heads, "
                    "self.config.rope_theta, 4096")


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    from llava.model.modeling_llama_restore import LlamaRotaryEmbeddingFloat

    if not hasattr(LlamaRotaryEmbeddingFloat, "_set_cos_sin_cache"):
        LlamaRotaryEmbeddingFloat.max_seq_len_cached = 0
        LlamaRotaryEmbeddingFloat._set_cos_sin_cache = lambda self, seq_len, device, dtype: None


def _tore_on_path() -> None:
    import os
    import sys

    import llava

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(llava.__file__))), "tokenreduction")
    if not os.path.isdir(os.path.join(folder, "tore")):
        raise RuntimeError(f"restore parity: no tokenreduction/tore beside {llava.__file__}")
    if folder not in sys.path:
        sys.path.insert(1, folder)


def enable_base(model, method: dict, official_base: str) -> None:
    from llava.model.modeling_llama_restore import LlamaModel

    from . import _official

    _tore_on_path()
    from tore import load_reduction_base

    n = int(method["budget"])
    load_reduction_base(model, official_base, n, True)
    if type(model).__name__ == "LlavaLlamaForCausalLM_restore":  # model_vqa_loader.py, "# Decoder"
        model.model.n_vis = n
        model.model.restore = True
    if not getattr(LlamaModel, "_parity_restore", False):
        _official.install(LlamaModel, "forward_restore",
                          [(N_SYS_LITERAL, N_SYS_REPLACEMENT), (ROPE_LITERAL, ROPE_REPLACEMENT)], literal=True)
        LlamaModel._parity_restore = True


def enable(model, method: dict) -> None:
    enable_base(model, method, OFFICIAL_BASE)


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    from llava.constants import IMAGE_TOKEN_INDEX

    # each image alone: row 0 is the prompt, unpadded; the tokens before the image (35 on LLaVA-1.5)
    pos = (input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()
    model.get_model().parity_n_sys = int(pos[0, 0])
    return {}


def record(model, store: list) -> list:
    inner_model = model.get_model()
    seen: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != 1 and "positions" not in seen:
            seen["positions"] = kwargs["position_ids"].detach().clone()

    hook = inner_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    official = type(inner_model).forward_restore

    def forward_restore(*args, **kwargs):
        seen.clear()
        out = official(inner_model, *args, **kwargs)
        if "positions" in seen:  # a prefill
            m = inner_model
            pattern = m.merging_pattern_list[-1][0]  # (n, N), the rows in the LLM's order
            n_sys, n = int(m.N_sys), int(m.n_vis)
            rows = pattern.argmax(0)
            if not bool((pattern.sum(0) == 1).all()):
                raise RuntimeError("restore parity: a patch in no LLM row, or in several")
            kept = m.retained_indices[0].sort().values
            pos = seen["positions"].reshape(-1)[n_sys:n_sys + n] - n_sys
            store.extend([("vision", kept[None].cpu()), ("rows", rows[None].long().cpu()),
                          ("positions", pos[None].long().cpu())])
        return out

    inner_model.forward_restore = forward_restore

    class Handle:
        def remove(self):
            hook.remove()
            if "forward_restore" in inner_model.__dict__:
                del inner_model.forward_restore

    return [Handle()]


# ---- our side ----

def base_options(base: str) -> dict:
    """The base's options in its parity reference mode (its own adapter's ``ours``)."""
    import importlib

    method, options = importlib.import_module(f"{__package__}.{base}").ours(16)
    assert method == base, (method, base)
    options = dict(options)
    options.pop("important_ratio", None)  # VisPruner's: RESTORE's recipe sets it (0.5)
    return options


def ours_base(base: str) -> tuple[str, dict]:
    return "restore", {"base": base, "numerics": "official", "base_options": base_options(base)}


def ours(budget: int) -> tuple[str, dict]:
    return ours_base(BASE)


def record_ours(rt, store: list):
    import torch

    seen: dict = {}

    def grab_ids(module, args, kwargs):
        if "ids" not in seen and kwargs.get("input_ids") is not None:
            seen["ids"] = kwargs["input_ids"].detach().clone()

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != 1 and "positions" not in seen:
            seen["positions"] = kwargs["position_ids"].detach().clone()

    hooks = [rt.model.register_forward_pre_hook(grab_ids, with_kwargs=True),
             _our_decoder(rt).layers[0].register_forward_pre_hook(grab, with_kwargs=True)]

    def finish(n_samples: int) -> None:
        for h in hooks:
            h.remove()
        if n_samples != 1:
            raise RuntimeError("restore parity: each image alone (OFFICIAL['alone'])")
        sel = rt.engine.selections.get(("vision", 0))
        if sel is None or "positions" not in seen or "ids" not in seen:
            return
        keep, tg, assign = sel.keep.cpu(), sel.targets.cpu(), sel.assign.cpu()
        src = torch.cat([keep, tg])
        order = sel.order.cpu() if sel.order is not None else torch.arange(src.numel())
        row_of = torch.empty_like(order)
        row_of[order] = torch.arange(order.numel())  # the LLM row of [keep..., targets...][j]
        rows = torch.full((assign.numel(),), -1, dtype=torch.long)
        merged = assign >= 0
        rows[merged] = row_of[keep.numel() + assign[merged]]
        rows[keep] = row_of[: keep.numel()]
        # the unpruned prompt's image start = the first visual row (each image alone: no padding)
        start = int((seen["ids"][0] == rt.model.config.image_token_id).nonzero()[0, 0])
        pos = seen["positions"].reshape(-1).cpu()[start:start + src.numel()] - start
        store.extend([("vision", keep.sort().values[None]), ("rows", rows[None]), ("positions", pos[None].long())])

    return finish


def _our_decoder(rt):
    m = rt.model.model
    return getattr(m, "language_model", m)
