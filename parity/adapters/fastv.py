"""FastV (ECCV 2024): the authors' repository ``pkunlp-icler/FastV``. It ships three implementations:

1. ``src/transformers/`` (a patched **transformers 4.31.0**: the in-place ``LlamaModel.forward`` "FastV Token Rerank",
   ``config.use_fast_v`` / ``fast_v_*``, attention with ``rotary_emb(..., seq_len=1000)``) run with its own older
   LLaVA tree ``src/LLaVA/`` (``src/FastV/inference/eval/inference_aokvqa.py``);
2. ``src/FastV/llava-hf/transformers/`` (a patched transformers for llava-hf's ``LlavaForConditionalGeneration``);
3. ``src/FastV/lmms-eval/fastv_kvcache.py``: ``FastVLlamaModel``, written for **transformers >= 4.36 and LLaVA's own
   latest tree** (haotian-liu/LLaVA, i.e. llava-torch): its README (``src/FastV/lmms-eval/README.md``) puts the file
   under ``llava/model/language_model/``, makes ``LlavaLlamaModel`` derive from ``FastVLlamaModel`` (step 4), sets K
   and R on "line 119 and 120" of the file, and edits the installed transformers so that the three attention
   classes call ``self.rotary_emb(value_states, seq_len=position_ids.max().item() + 1)`` (step 5).

This adapter runs **3** beside the installed llava-torch (``ROOT`` = ``src/FastV``: no ``llava/`` there, so the
worker keeps llava-torch): it is the one written for this environment, and it is the algorithm our ``fastv`` follows
(pruned once in the prefill, the decode steps on the pruned KV cache, kept tokens keep their positions). 1 needs its
own transformers 4.31 (its ``LlamaModel.forward`` calls ``self._prepare_decoder_attention_mask`` and legacy tuple
caches, its ``LlamaModel.__init__`` reads ``config.use_fast_v``) and ``use_cache=False`` with ``output_attentions=True``
in ``generate`` (it then prunes again at every generated token: another decode algorithm than ours); see the report
in docs/parity.md.

- switch, as the lmms-eval README says, applied to the loaded model at run time (``.venv-official`` is shared and
  not edited): the file is read from the clone and its literals set: **K = 3 kept** (line 119; decoder layer 3
  exists in the tiny 4-layer LLM), ``ratio`` (line 120, the *kept* fraction: ``topk(int(576 * ratio))``) = our
  kept count / N, and the LLaVA-1.5 geometry written into lines 124-126 (``[35:611]``, ``576``, ``+ 35``,
  ``arange(35)``, ``arange(611, ...)``: 35 prompt tokens before the image, 576 image tokens) replaced by the tiny
  prompt's (P tokens before the image, read from the ids, and N = 64 patches); each literal must occur exactly
  once. Then ``model.model``'s class becomes ``LlavaLlamaModel(LlavaMetaModel, FastVLlamaModel)`` (step 4), and each
  layer's ``rotary_emb`` is asked for its whole cache (step 5: the rows for ``position_ids`` are the same values;
  without it the pruned layers index past ``cos_cached[:kv_seq_len]``);
- budget: ours (equivalent tokens per sample, the layer average): n_K = (L*B - K*N) / (L - K), half up, clipped
  (:func:`kept_count`, the rule of ``llava.ops.equivalent_kept_count``, a test checks they agree). At K = 3,
  L = 4, N = 64: **B = 56 keeps 32 (the file's own ratio = 0.5)**, 52 keeps 16, 60 keeps 48;
- kept indices: the file's ``keep_indexs`` become ``position_ids`` of decoder layer K (a forward pre-hook on layer K
  reads them in the prefill; the visual ones, minus P, ascending, as ``("llm3", (1, kept))``);
- ours: ``fastv`` with ``layer=3, scale_layers=False`` and the reference mode (``numerics="official"``), the stage
  read from ``rt.engine.selections[(0, sample)]``.

Each image alone (``OFFICIAL``): the file scores ``self.last_attention.mean(dim=1)[0]`` (the first sample) at fixed
positions for every row of the batch, and its ``lmms-eval`` path runs one sample at a time.

Measured (CPU, budgets 52 / 56 / 60): 24 / 24 identical in fp32 and the official fp16 load. The logits of the
90x140 and 224x200 images are not bit-identical (fp32 up to 1.4e-6, fp16 up to 2.7e-3): the file runs layer K - 1
twice with ``past_key_value=past_key_values, use_cache=use_cache`` (once for ``output_attentions``), so the second
call attends over that layer's keys twice ([KV, KV], top-left causal SDPA); its output differs from a plain causal call
by up to 5.4e-7 for exactly those two images (0 for the others). Ours runs each layer once (docs/methods/fastv.md).
"""

from __future__ import annotations

REPOSITORY = "pkunlp-icler/FastV"
COMMIT = "d1659729b5bf1be225e99ee15783deeea80f63b1"
ROOT = "src/FastV"
PACKAGES = ("lmms-eval",)
INSTALLED = False
#: the budgets compared by default: 56 is the file's own ratio 0.5 (32 of 64 kept); 52 keeps 16, 60 keeps 48
BUDGETS = (52, 56, 60)
OFFICIAL = {"alone": True}

#: decoder layer K of the file (line 119), kept: it exists in the tiny 4-layer LLM
K = 3
FILE = "lmms-eval/fastv_kvcache.py"  # under ROOT


# ---- pure helpers (stdlib; both halves) ----

def kept_count(budget: int, n_visual: int, layer: int, num_layers: int) -> int:
    """Our equivalent-token budget as FastV's kept count after layer K: (L*B - K*N) / (L - K), halves up,
    clipped to 0..N (``llava.ops.equivalent_kept_count``)."""
    num, den = num_layers * int(budget) - layer * n_visual, num_layers - layer
    return max(0, min(n_visual, (2 * num + den) // (2 * den)))


def edit_source(text: str, layer: int, ratio: float, prefix: int, n_visual: int) -> str:
    """``fastv_kvcache.py`` with its switches (K, ratio: the README's "line 119 and 120") and the LLaVA-1.5
    geometry (35 tokens before the image, 576 image tokens) set for this model. Each literal must occur once."""
    edits = [("K = 3\n", f"K = {layer}\n"), ("ratio = 0.5\n", f"ratio = {ratio!r}\n"),
             ("[35:611]", f"[{prefix}:{prefix + n_visual}]"), ("int(576 * ratio)", f"int({n_visual} * ratio)"),
             (".indices + 35", f".indices + {prefix}"), ("torch.arange(35,device=device)",
                                                         f"torch.arange({prefix},device=device)"),
             ("torch.arange(611,seq_length", f"torch.arange({prefix + n_visual},seq_length")]
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"{REPOSITORY}: {FILE} holds {text.count(old)} copies of {old!r}, not one")
        text = text.replace(old, new)
    return text


# ---- the official side (runs in .venv-official) ----

def _file() -> str:
    import os
    import sys

    for p in sys.path:  # the worker puts the clone's ROOT first on the path
        if p and os.path.isfile(os.path.join(p, FILE)):
            return os.path.join(p, FILE)
    raise RuntimeError(f"{REPOSITORY}: no {FILE} on the path (the clone's {ROOT})")


def _install(model, prefix: int) -> None:
    """Build ``FastVLlamaModel`` from the clone's file for this prompt geometry and make it ``model.model``'s base
    (README step 4)."""
    import types

    from llava.model.language_model.llava_llama import LlavaConfig, LlavaMetaModel

    inner = model.get_model()
    state = inner._parity_fastv
    key = (prefix, state["ratio"])
    if state.get("key") == key:
        return
    path = _file()
    with open(path) as f:
        text = edit_source(f.read(), K, state["ratio"], prefix, state["n_visual"])
    mod = types.ModuleType("fastv_kvcache")
    mod.__file__ = path
    exec(compile(text, path, "exec"), mod.__dict__)
    cls = type("LlavaLlamaModel", (LlavaMetaModel, mod.FastVLlamaModel), {"config_class": LlavaConfig})
    inner.__class__ = cls
    inner.last_attention = None
    state.update(key=key, prefix=prefix)


def enable(model, method: dict) -> None:
    inner = model.get_model()
    n = model.get_vision_tower().num_patches
    layers = model.config.num_hidden_layers
    k = kept_count(method["budget"], n, K, layers)
    ratio = k / n
    if int(n * ratio) != k:
        raise RuntimeError(f"{REPOSITORY}: no ratio r with int({n} * r) = {k}")
    inner._parity_fastv = {"ratio": ratio, "n_visual": n, "kept": k}
    # README step 5 (an edit of the installed transformers there): the rotary tables for every position id, not only
    # the first kv_seq_len rows; asking for the whole cache gives the same rows for position_ids
    for layer in inner.layers:
        rope = layer.self_attn.rotary_emb
        if "forward" in rope.__dict__:
            continue

        def forward(x, seq_len=None, rope=rope, fwd=type(rope).forward):
            return fwd(rope, x, seq_len=max(seq_len or 0, rope.max_seq_len_cached))

        rope.forward = forward


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    """The prompt geometry (P tokens before the image) is the batch's: the file is set for it here."""
    rows = (input_ids == -200).nonzero()
    if input_ids.shape[0] != 1 or rows.shape[0] != 1:
        raise RuntimeError(f"{REPOSITORY}: one sample with one image at a time")
    _install(model, int(rows[0, 1]))
    return {}


def record(model, store: list) -> list:
    """A pre-hook on decoder layer K: in the prefill its ``position_ids`` are the file's ``keep_indexs``."""
    inner = model.get_model()
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1 or seen:
            return
        seen.append(1)
        state = inner._parity_fastv
        pos = kwargs["position_ids"][0]
        p, n = state["prefix"], state["n_visual"]
        vis = pos[(pos >= p) & (pos < p + n)] - p
        store.append((f"llm{K}", vis.sort().values[None].cpu()))

    class Handle:
        def __init__(self, h):
            self.h = h

        def remove(self):
            self.h.remove()
            seen.clear()

    # the worker's forward and generate() each run a prefill: the first one is recorded
    return [Handle(inner.layers[K].register_forward_pre_hook(hook, with_kwargs=True))]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "fastv", {"layer": K, "scale_layers": False, "numerics": "official"}


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, 0, n_samples)
        if kept is not None:
            store.append((f"llm{K}", kept))

    return finish
