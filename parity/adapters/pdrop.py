"""PyramidDrop (CVPR 2025): the authors' repository ``Cooperx521/PyramidDrop``, a copy of LLaVA's with a patched
``llava/`` tree (``llava/model/modeling_llama_pdrop.py``: ``LlamaModel.pdrop_forward`` / ``pdrop_rank_drop``;
``llava/model/language_model/llava_llama_pdrop.py``: ``LlavaLlamaForCausalLM_PDrop``).

- switch, as its eval scripts (``scripts/v1_5/pdrop_eval/*.sh`` -> ``llava/eval/model_vqa_loader.py``) do: the
  builder is called with ``pdrop_infer=True`` (``load_pretrained_model(path, base, name, pdrop_infer)``, which loads
  ``LlavaLlamaForCausalLM_PDrop``; here :func:`before_load` makes that the builder's default, since the worker calls
  the builder without it), then ``model.model.layer_list = [...]``, ``model.model.image_token_ratio_list = [...]``
  and ``image_token_ratio_list.insert(0, 1.0)``. Every eval script passes ``--layer_list '[8,16,24]'
  --image_token_ratio_list "[0.5,0.25,0.125]"``; on the tiny 4-layer LLM the layers become **1 / 2 / 3**
  (``round(8 * 4 / 32)`` etc., our ``llava.ops.scale_layers``: pruned before decoder layers 1, 2 and 3 on both
  sides; ``pdrop_forward`` ranks after layer ``l - 1`` with layer ``l``'s own norm + q / k + RoPE);
- budget: ours (equivalent tokens for 576 candidates, our design: docs/methods/pdrop.md). The official code has no
  budget; its ratios are the geometric ``[lam, lam^2, lam^3]``, and the adapter gives it the lam our method solves
  for the budget on the model's depth (:func:`solve_lambda`, the same bisection as ``baselines.pdrop.solve_lambda``,
  a test checks they agree). **Budget 270 is the eval scripts' schedule exactly** (lam = 0.5: ratios 0.5 / 0.25 /
  0.125, 64 -> 32 / 16 / 8 on the tiny model's 64 visual tokens); budgets below 144 cannot be reached with the
  first stage before layer 1 of 4 (both sides refuse);
- kept indices: ``pdrop_rank_drop`` keeps ``top_rank_index`` in a local; the adapter wraps the method on the
  instance and reads them off its output, which copies the kept rows of the input verbatim
  (``features[i][top_rank_index, :]``): each kept row is matched to the one candidate row (of the stage's current
  visual run, ``image_token_posi[i]`` on) it equals bit for bit (refused unless exactly one matches). Recorded as
  ``("llm<l>", (samples, kept))``, indices into the stage's candidates, ascending, prefill only (the decode steps
  do not rank);
- ours: ``pdrop`` in its reference mode (``numerics="official"``), default stage layers (8 / 16 / 24 scaled to
  the model's depth); the stages read from ``rt.engine.selections[(stage, sample)]``.

Each image alone (``OFFICIAL``): ``pdrop_rank_drop`` refuses any padding side but "right" (``raise ValueError(
"Unexpected tokenizer_padding_side")``), ``model_vqa_loader.py`` runs batch 1 (``assert batch_size == 1``), and after
a drop ``pdrop_forward`` rebuilds the 4-D mask for the *original* ``seq_length`` from the shortened 2-D mask, which
only works when no mask is needed (one unpadded sample).

Measured (CPU, budgets 216 / 270 / 324, each image alone): the official fp16 load 12 / 12 identical (logits
bit-identical); fp32 11 / 12: for the 160x96 image at 270 stage llm3 keeps candidate 7 there, 8 here. The official
code casts the probabilities to ``query_states.dtype`` (fp32 in this fp32 run; ``pdrop_rank_drop``: ``softmax(...,
dtype=torch.float32).to(query_states.dtype)``), our reference mode always to fp16 (``llava/ops/schedules.py``
``last_row_topk``: ``last_row_attn.to(torch.float16)``), the dtype of the only load the official builder makes; the
two candidates are 2.50427e-3 and 2.50354e-3 in fp32 and the same fp16 value, so ``topk`` breaks the tie the other way.
"""

from __future__ import annotations

REPOSITORY = "Cooperx521/PyramidDrop"
COMMIT = "6444f304aee4b7edcb022839fb9e8cd07859704a"
PACKAGES = ("llava",)
INSTALLED = False
#: the budgets compared by default (``python -m parity llava15 --method pdrop``): 270 is the scripts' [0.5, 0.25, 0.125]; below 144 is unreachable
BUDGETS = (216, 270, 324)
OFFICIAL = {"alone": True, "padding_side": "right"}

#: the eval scripts' switches (scripts/v1_5/pdrop_eval/*.sh), stated for a 32-layer LLM
SCRIPT_LAYERS = (8, 16, 24)
SCRIPT_LAM = 0.5
#: the budgets of our grammar are stated for 576 candidates
REFERENCE_TOKENS = 576


# ---- pure helpers (stdlib; both halves) ----

def scale_layers(layers, num_layers: int, reference: int = 32) -> tuple:
    """The eval scripts' layers on a ``num_layers``-layer LLM: round(k * L / 32), clipped to 1..L-1, strictly
    increasing (the rule of ``llava.ops.scale_layers``; a test checks they agree)."""
    out: list = []
    for k in layers:
        v = min(max(1, round(k * num_layers / reference)), num_layers - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        if v > num_layers - 1:
            raise ValueError(f"cannot place {len(layers)} stages in a {num_layers}-layer LLM")
        out.append(v)
    return tuple(out)


def solve_lambda(layers, num_layers: int, retention: float) -> float:
    """PyramidDrop's lam for a layer-average retention B / 576 on ``num_layers`` layers with stages before
    ``layers``: the bisection of ``baselines.pdrop.solve_lambda`` (our design; the official code takes the ratios)."""
    bounds = [0, *layers, num_layers]
    spans = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    if retention >= 1.0:
        return 1.0
    if retention < spans[0] / num_layers:
        raise ValueError(f"pdrop: a layer average of {retention:.4f} of the visual tokens is unreachable with the "
                         f"first stage before layer {layers[0]} of {num_layers} (minimum {spans[0] / num_layers:.4f})")

    def avg(lam: float) -> float:
        return sum(sp * lam ** s for s, sp in enumerate(spans)) / num_layers

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < retention else (lo, mid)
    return (lo + hi) / 2


def official_switches(budget: int, num_layers: int) -> tuple[list, list]:
    """``(layer_list, image_token_ratio_list)`` as an eval script would pass them (before ``insert(0, 1.0)``) for our
    ``budget`` on a ``num_layers``-layer LLM: the ratios lam^s written as decimals (12 significant digits, as on a
    command line: ``"[0.5,0.25,0.125]"``). Not the raw floats: for budget 270 the bisection returns
    lam = 0.4999999999999999, and the official ``int(N * ratio)`` would keep 31 of 64 where the scripts' 0.5 keeps
    32 (our ``stage_counts`` absorbs that binary error with ``floor(N * ratio + 1e-9)``)."""
    layers = scale_layers(SCRIPT_LAYERS, num_layers)
    lam = solve_lambda(layers, num_layers, budget / REFERENCE_TOKENS)
    return list(layers), [float(f"{lam ** (s + 1):.12g}") for s in range(len(layers))]


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    """``model_vqa_loader.py`` calls ``load_pretrained_model(model_path, model_base, model_name, pdrop_infer)`` with
    ``pdrop_infer = True`` when ``--layer_list`` is given; the worker calls it without, so its default becomes True."""
    from llava.model import builder

    fn = builder.load_pretrained_model
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    if "pdrop_infer" not in names:
        raise RuntimeError(f"{REPOSITORY}: load_pretrained_model has no pdrop_infer argument ({names})")
    defaults = list(fn.__defaults__)
    defaults[names.index("pdrop_infer") - (len(names) - len(defaults))] = True
    fn.__defaults__ = tuple(defaults)
    # with --official-path the unpruned model runs in this process too, before enable(): without switches the
    # PDrop class has no layer_list at all (AttributeError); no stages = its pdrop_forward without a drop
    from llava.model.modeling_llama_pdrop import LlamaModel

    LlamaModel.layer_list = []
    LlamaModel.image_token_ratio_list = [1.0]


def enable(model, method: dict) -> None:
    if type(model).__name__ != "LlavaLlamaForCausalLM_PDrop":
        raise RuntimeError(f"{REPOSITORY}: the builder loaded {type(model).__name__}, not LlavaLlamaForCausalLM_PDrop "
                           "(pdrop_infer)")
    layers, ratios = official_switches(method["budget"], model.config.num_hidden_layers)
    # llava/eval/model_vqa_loader.py
    model.model.layer_list = layers
    model.model.image_token_ratio_list = ratios
    model.model.image_token_ratio_list.insert(0, 1.0)


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    """Wrap ``pdrop_rank_drop`` on the instance (``pdrop_forward`` calls ``self.pdrop_rank_drop(...)``): after each
    call, the kept candidates of every sample, read off the rows it returns."""
    import torch

    inner = model.get_model()
    rank_drop = inner.pdrop_rank_drop

    def wrapped(**kw):
        out = rank_drop(**kw)
        features, new = kw["features"], out[2]
        stage, ratios = kw["cur_num"], inner.image_token_ratio_list
        rows = []
        for i in range(features.shape[0]):
            pos, n_img = inner.image_token_posi[i], inner.image_tokens[i]
            if pos == -1:
                continue
            n_cur, k = int(n_img * ratios[stage]), int(n_img * ratios[stage + 1])
            cand, kept = features[i, pos:pos + n_cur], new[i, pos:pos + k]
            eq = (kept[:, None, :] == cand[None, :, :]).all(-1)  # (k, n_cur)
            if not bool((eq.sum(1) == 1).all()):
                raise RuntimeError(f"{REPOSITORY} adapter: a kept row of stage llm{kw['rank_layer']} matches "
                                   f"{eq.sum(1).tolist()} candidate rows, not one")
            rows.append(eq.to(torch.int64).argmax(1))
        store.append((f"llm{kw['rank_layer']}", torch.stack(rows).cpu()))
        return out

    inner.pdrop_rank_drop = wrapped
    return [_Restore(inner, "pdrop_rank_drop")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "pdrop", {"numerics": "official"}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)
