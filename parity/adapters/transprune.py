"""TransPrune (CVPR 2026): the authors' repository ``liaolea/TransPrune``, a PyramidDrop-based copy of LLaVA's with a
patched ``llava/`` tree (``llava/model/modeling_llama_transprune.py``: ``LlamaDecoderLayer_TransPrune`` /
``compute_transf_weight``, ``LlamaModel.transprune_forward`` / ``transprune_rank_drop``;
``llava/model/language_model/llava_llama_transprune.py``: ``LlavaLlamaForCausalLM_TransPrune``).

- switch, as its eval scripts (``scripts/transprune/v1_5_test/*.sh`` -> ``llava/eval/model_vqa_loader.py --method
  transprune``) do: the builder is called with ``method="transprune"`` (``load_pretrained_model(path, base, name,
  method)``, which then loads ``LlavaLlamaForCausalLM_TransPrune``; here :func:`before_load` makes that the builder's
  default, since the worker calls it without), then ``model.model.accmulating_layer_list``, ``pruning_layer_list``
  and ``image_token_ratio_list`` with ``insert(0, 1.0)``. Every script passes ``--accmulating_layer_list
  '[7,8,9,10,11,12]' --pruning_layer_list '[7,9,12]' --image_token_ratio_list "[0.875,0.625,0.125]"``; on the tiny
  4-layer LLM the pruning layers become **1 / 2 / 3** (``round(7 * 4 / 32)`` etc., clipped and made increasing as
  ``llava.ops.scale_layers`` does) and the accumulating layers **1 / 2 / 3** (1-based: from the first pruning layer
  to the last, as 7..12 with 7 / 9 / 12), our 0-based 0 / 1 / 2;
- budgets: **236** = the scripts' lists exactly (ours without a budget: E = 236.25 on 32 layers; on the tiny model's
  64 visual tokens 56 / 40 / 8); 200 and 220 = our scaled official shape (docs/methods/transprune.md: the ratios
  ``alpha * [0.875, 0.625, 0.125]``, alpha solved for the budget on the model's depth; the same float expression on
  both sides, :func:`official_switches`; 64 -> 13 / 9 / 1 and 18 / 12 / 2);
- shims, official side only (the CPU run): ``transprune_forward`` times every prefill with ``torch.cuda.Event`` and
  ``torch.cuda.synchronize`` (lines 1297-1302, 1396-1401) and prints the total; without CUDA :func:`before_load` puts
  CPU stand-ins there (``record`` does nothing, ``elapsed_time`` is 0). ``modeling_llama_transprune.py`` imports
  ``sklearn.cluster.DBSCAN`` and never uses it; :func:`before_import` registers an empty stand-in module when
  scikit-learn is not installed (the official environment has none). Nothing else of the official code is changed;
- kept indices: ``transprune_rank_drop`` keeps ``top_rank_index`` in a local; the adapter wraps the method on the
  instance and reads them off the rows it returns, which copy the kept input rows verbatim (each kept row matched to
  the one candidate row it equals bit for bit; refused unless exactly one matches). Recorded as ``("llm<l>",
  (samples, kept))``, indices into the stage's candidates, ascending, prefill only;
- ours: ``transprune`` in its reference mode (``numerics="official"``), default stage and accumulating layers
  (scaled to the depth); the stages read from ``rt.engine.selections[(stage, sample)]``.

Each image alone (``OFFICIAL``): ``transprune_rank_drop`` refuses any padding side but "right", the loader asserts
``batch_size == 1``, the transition weights are normalised over the whole batch (``exp_cosine.sum()``) and the weight
lists are gathered for sample 0 only ("Only available when batch_size is 1"), and after a drop the 4-D mask is
rebuilt for the *original* length (works only without padding).
"""

from __future__ import annotations

REPOSITORY = "liaolea/TransPrune"
COMMIT = "c9e8284f5808f7692c40590ffc99537e9220a01d"
PACKAGES = ("llava",)
INSTALLED = False
#: 236 = the eval scripts' lists (no budget on our side); 200 / 220 = the official shape scaled to the budget
BUDGETS = (200, 220, 236)
OFFICIAL = {"alone": True, "padding_side": "right"}

#: the eval scripts' switches (scripts/transprune/v1_5_test/*.sh), 1-based, stated for a 32-layer LLM
SCRIPT_PRUNING = (7, 9, 12)
SCRIPT_RATIOS = (0.875, 0.625, 0.125)
#: the budget that stands for the scripts' lists (their equivalent tokens on 32 layers: 236.25)
SCRIPT_BUDGET = 236
REFERENCE_TOKENS = 576


# ---- pure helpers (stdlib; both halves) ----

def scale_layers(layers, num_layers: int, reference: int = 32) -> tuple:
    """The scripts' layers on a ``num_layers``-layer LLM: round(k * L / 32), clipped to 1..L-1, strictly increasing
    (the rule of ``llava.ops.scale_layers``)."""
    out: list = []
    for k in layers:
        v = min(max(1, round(k * num_layers / reference)), num_layers - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        if v > num_layers - 1:
            raise ValueError(f"cannot place {len(layers)} stages in a {num_layers}-layer LLM")
        out.append(v)
    return tuple(out)


def official_switches(budget: int, num_layers: int) -> tuple[list, list, list]:
    """``(accmulating_layer_list, pruning_layer_list, image_token_ratio_list)`` as an eval script would pass them
    (before ``insert(0, 1.0)``) for our ``budget`` on a ``num_layers``-layer LLM: the scripts' ratios for
    :data:`SCRIPT_BUDGET`, else ``alpha * ratios`` with alpha = (B / 576 * L - K_1) / sum_s len_s * ratio_s (the
    expression of ``baselines.transprune.scale_ratios``)."""
    layers = scale_layers(SCRIPT_PRUNING, num_layers)
    accumulate = list(range(layers[0], layers[-1] + 1))  # 1-based, first pruning layer .. last
    if int(budget) == SCRIPT_BUDGET:
        return accumulate, list(layers), list(SCRIPT_RATIOS)
    bounds = [*layers, num_layers]
    spans = [bounds[s + 1] - bounds[s] for s in range(len(layers))]
    alpha = (budget / REFERENCE_TOKENS * num_layers - layers[0]) / sum(sp * r for sp, r in zip(spans, SCRIPT_RATIOS))
    return accumulate, list(layers), [alpha * r for r in SCRIPT_RATIOS]


# ---- the official side (runs in .venv-official) ----

def before_import() -> None:
    """``modeling_llama_transprune.py`` line 55 imports ``sklearn.cluster.DBSCAN``, which it never uses: an empty
    stand-in module when scikit-learn is absent (the official environment is LLaVA's, without it)."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    import transformers.utils.import_utils  # noqa: F401  (it records "no scikit-learn" before the stand-in exists)

    if "sklearn" not in sys.modules and importlib.util.find_spec("sklearn") is None:  # called once per budget
        sk, cluster = types.ModuleType("sklearn"), types.ModuleType("sklearn.cluster")
        sk.__spec__ = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
        cluster.__spec__ = importlib.machinery.ModuleSpec("sklearn.cluster", None)
        cluster.DBSCAN = None  # imported, never used
        sk.cluster = cluster
        sys.modules.setdefault("sklearn", sk)
        sys.modules.setdefault("sklearn.cluster", cluster)


def before_load(method: dict) -> None:
    """``model_vqa_loader.py`` calls ``load_pretrained_model(model_path, model_base, model_name, args.method)``; the
    worker calls it without, so the default of ``method`` becomes "transprune". Without CUDA, the forward's
    ``torch.cuda.Event`` / ``torch.cuda.synchronize`` become CPU no-ops."""
    from llava.model import builder

    fn = builder.load_pretrained_model
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    if "method" not in names:
        raise RuntimeError(f"{REPOSITORY}: load_pretrained_model has no method argument ({names})")
    defaults = list(fn.__defaults__)
    defaults[names.index("method") - (len(names) - len(defaults))] = "transprune"
    fn.__defaults__ = tuple(defaults)
    from . import _official

    _official.cpu_cuda_timing()
    # with --official-path the unpruned model runs in this process too, before enable(): without switches the
    # TransPrune class has no lists at all (AttributeError); no stages = its transprune_forward without a drop
    from llava.model.modeling_llama_transprune import LlamaModel

    LlamaModel.accmulating_layer_list = []
    LlamaModel.pruning_layer_list = []
    LlamaModel.image_token_ratio_list = [1.0]


def enable(model, method: dict) -> None:
    if type(model).__name__ != "LlavaLlamaForCausalLM_TransPrune":
        raise RuntimeError(f"{REPOSITORY}: the builder loaded {type(model).__name__}, not "
                           "LlavaLlamaForCausalLM_TransPrune (method='transprune')")
    acc, layers, ratios = official_switches(method["budget"], model.config.num_hidden_layers)
    # llava/eval/model_vqa_loader.py 93-97
    model.model.accmulating_layer_list = acc
    model.model.pruning_layer_list = layers
    model.model.image_token_ratio_list = ratios
    model.model.image_token_ratio_list.insert(0, 1.0)


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    """Wrap ``transprune_rank_drop`` on the instance (``transprune_forward`` calls ``self.transprune_rank_drop(...)``
    with keywords): after each call, the kept candidates of every sample, read off the rows it returns."""
    import torch

    inner = model.get_model()
    rank_drop = inner.transprune_rank_drop

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

    inner.transprune_rank_drop = wrapped
    return [_Restore(inner, "transprune_rank_drop")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    if int(budget) == SCRIPT_BUDGET:  # the scripts' lists: our method without a budget
        return "transprune", {"budget": None, "numerics": "official"}
    return "transprune", {"numerics": "official"}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)
