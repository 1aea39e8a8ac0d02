"""SparseVLM / SparseVLM+ (ICML 2025; "v2.0"): the authors' repository ``Gumpest/SparseVLMs`` (a LLaVA tree whose
``llava/model/language_model/`` holds the method: ``modelling_sparse_llama.py``, ``score.py``, ``utils.py``).

Version: the commit below is ``main`` at "Update README.md" (2025-12-13), the SparseVLM+ release: its ``llava/``
is identical to tag ``v2.0`` (72cd202, 8 README commits earlier); the SparseVLM v1.5 release (tag / branch
``v1.5``) differs in 4 files of ``llava/model`` and is not what this adapter runs. It ships both versions behind
``USE_VERSION``: ``1_0`` (the default: SparseVLM v1, with token recycling) and
``2_0`` (SparseVLM+: gravity correction, priority heads, original position
ids, no recycling). Both sides read the same switch: ``USE_VERSION=2_0 python -m parity llava15 --method
sparsevlm ...`` runs the official v2 (its ``score.py`` reads the variable at import; the worker inherits the
environment) and ours with ``version="v2"``; without it, v1 on both sides.

- switch (README, ``scripts/v1_5/eval/*.sh``): ``RETAIN_TOKN=<192|128|96|64> USE_VERSION=<1_0|2_0>``; the builder
  loads ``LlavaLlamaDynamicForCausalLM`` (``dynamic_sparse=True``, its default). ``enable`` sets ``RETAIN_TOKN`` for
  each budget (``score.RETAIN_TOKN``, which ``attn_postprocess_topk`` reads at each call) and, as the README says to
  do for other counts ("modify ``score.py``"), the budget's entry of ``score.sparse_token_dict`` and
  ``score.layer_dict``, and the model's ``pruning_loc``.
- the tiny model (4 decoder layers, 64 visual tokens): the official sparse layers 2 / 6 / 15 of 32 do not exist.
  Ours maps them with ``llava.ops.scale_layers`` (engine stages 3 / 7 / 16 -> 1 / 2 / 3: the outputs of layers
  0 / 1 / 2 are pruned) and rescales the counts to N = 64 and the depth (``SparseVLM.stage_counts``); the official
  side gets the same: ``pruning_loc = [0, 1, 2]`` and the counts of :data:`TINY_COUNTS` (tested equal to ours).
  On 64 tokens and 4 layers the 128 / 96 / 64 schedules fit to 0 retained tokens per stage (our
  ``fit_stage_counts``: the first layer alone already exceeds their layer average), 192 to 12 / 8 / 5 (v1) and
  13 / 9 / 5 (v2).
- v2's ``select_attn_head_by_sum`` takes ``topk(14)`` heads; the tiny LLM has 4, where ``topk(14)`` raises. Ours
  clips ``heads`` to the model's heads; the official function is run unchanged on a tensor whose ``topk`` clips
  ``k`` to the same (a ``torch.Tensor`` subclass), so it keeps all 4 heads in its order of mass.
- kept indices: ``attn_postprocess_topk``'s mask (called once per sparse layer in the prefill), its ``True``
  places: ``("llm<l+1>", (1, kept))`` for sparse layer ``l``, indices into that stage's visual tokens (kept
  ones ascending, then v1's merged clusters). v1 recycling: the rows ``cluster_and_merge`` receives matched
  (bit-exact copies) against the sparse layer's output to their visual indices, the centres ``index_points``
  is handed, and each recycled token's cluster (the first minimum of the distance rows ``index_points``
  returns, centres to themselves: the official next two lines): ``("llm<s> recycled", ascending)``,
  ``("llm<s> centres", in cluster order)``, ``("llm<s> clusters", the cluster of each recycled token)``. Ours:
  ``engine.selections`` (``keep``, ``targets``, ``assign``; keyed ``(stage index, sample)``) of the stages
  before layers 1 / 2 / 3 in the same form.
- ours: ``sparsevlm`` with ``version`` from ``USE_VERSION`` and its reference mode ``numerics="official"``.
- runs each image alone (``OFFICIAL["alone"]``): the official sparse layers are batch-1 code
  (``pre_prompt_length_list[0]``, ``mask[0][indices] = 1``, ``torch.where(policy == 0)[1].unsqueeze(0)``).
- running the official code on this CPU under transformers 4.36.2 (workarounds, nothing of the method):
  ``before_import`` aliases the 4.37 names ``Generate*Output`` that ``modelling_sparse_llama.py`` imports to their
  4.36 names (``GreedySearch*Output``, ``BeamSearch*Output``; 4.37 made the old names aliases of the new ones);
  ``before_load`` runs the builder's ``for i in range(32)`` (a copy of each layer's attention as an unused
  ``flash_attn`` submodule) over the model's own layers, and stubs the CUDA timing (``torch.cuda.Event`` /
  ``synchronize``) and ``Tensor.cuda()`` (v1's decode position) on a CPU-only build; ``enable`` gives the model's
  output tuple ``(prev_decision, out_pred_prob, CausalLMOutputWithPast)`` a ``logits`` attribute (the third
  element's) for the worker, unchanged for the official ``greedy_search`` (``outputs[2]``), and calls the decoder
  layers with ``hidden_states`` positional (the official sparse layers pass it by keyword; the worker's length
  hook reads the first positional argument).
- ``before_import`` must run before the worker imports the clone's ``llava`` (``import llava`` already imports
  ``modelling_sparse_llama.py``): ``official_worker.main`` calls each job adapter's ``before_import()`` there.

Update (the full run of 2026-11-25 on rebuilt weights): the fp16 v1 rows of the first image differed in their
greedy tokens at 128 / 96 / 64 (kept sets identical; the official first-token logits have their top two one fp16
ulp apart) with logits 1e-2 apart. Two causes, both now reproduced: every prefill layer's attention is the fork's
Python SDPA (``OURS_LOAD``: ``attn_implementation="python_sdpa"``, :mod:`llava.python_sdpa`), and the recycled
clusters' merge is the CPU ``index_add_`` of fp16 ``x * fl(1 / (n + 1e-6))`` rows, summed in fp32 in the topk order
and rounded once (``Selection(rule="weighted_mean", arithmetic="sequential")``). With both: fp16 16 / 16 and fp32
v1 at 128 / 96 / 64 with logits bit-identical (v1 at 192 in fp32 still differs: the density noise, below).
Earlier measurement (same day, CPU, budgets 192 / 128 / 96 / 64, each image alone): the official fp16 load, v1 and v2:
32 of 32 identical (kept sets, v1's recycled tokens, centres and clusters, greedy tokens; logits up to 1.2e-2
apart: the official "sdpa" of every prefill layer is a Python softmax of fp16 logits, ``utils.
scaled_dot_product_attention``). fp32: v2 16 of 16 (logits within 6.3e-6); v1 12 of 16: at 192 the four images
differ from their first clustering on (the kept and recycled sets of stage 1 identical), because the official
``cluster_and_merge`` adds ``torch.rand(...) * 1e-6`` to the densities (``utils.py:191``): with
``cluster_num = 2`` (16 recycled tokens) the density is exp(-d(nearest)^2 / 2), so two mutual nearest neighbours
tie exactly, and in fp32 the noise (far above the fp32 ulp) picks the denser one at random (20 seeds on 16 random
points: 6 different centre pairs in fp32, 1 in fp16, where the noise is below half an ulp).
With that noise removed from the official
``utils.py`` (a diagnostic run, ``torch.rand`` -> zeros; not how the adapter runs), fp32 v1 at 192 is 4 of 4
identical (logits within 3.6e-6). Our reference mode reproduces the fp16 official run (strict ``>``, no noise); no
mode can reproduce a random draw.
"""

from __future__ import annotations

import functools
import os

REPOSITORY = "Gumpest/SparseVLMs"
COMMIT = "26a5f48813c46cd1c7364160354e7fdd3febaa67"
PACKAGES = ("llava",)
INSTALLED = False
#: batch-1 code (see above): each image alone, on both sides
#: the budgets compared by default: the eval scripts' RETAIN_TOKN values (on the tiny LLM only 192 keeps visual
#: tokens past the first stage; 128 / 96 / 64 fit to 0 / 0 / 0 and test recycling and empty stages)
BUDGETS = (192, 128, 96, 64)
OFFICIAL = {"alone": True}
#: the fork's attention in every decoder layer is the Python reference of SDPA (``utils.scaled_dot_product_attention``:
#: fp16 ``q @ k^T``, ``* 1 / sqrt(d)``, ``torch.softmax`` in fp16); ours loads the same (:mod:`llava.python_sdpa`)
OURS_LOAD = {"fp16": {"attn_implementation": "python_sdpa"}, "fp32": {"attn_implementation": "python_sdpa"}}

#: the official sparse layers (``pruning_loc``) on the tiny 4-layer LLM: ours maps the 32-layer 2 / 6 / 15 with
#: ``scale_layers`` (engine stages 3 / 7 / 16 -> 1 / 2 / 3, i.e. the outputs of layers 0 / 1 / 2 pruned)
TINY_LAYERS = (0, 1, 2)
#: visual tokens of the tiny LLaVA-1.5 (112 px / patch 14)
TINY_VISUAL = 64
#: retained visual tokens after each tiny sparse layer per budget: ours ``SparseVLM(budget, version=v)
#: .stage_counts(64)`` on 4 layers (``fit_stage_counts``; tests/test_parity_sparsevlm.py checks the table)
TINY_COUNTS = {
    "v1": {192: (12, 8, 5), 128: (0, 0, 0), 96: (0, 0, 0), 64: (0, 0, 0)},
    "v2": {192: (13, 9, 5), 128: (0, 0, 0), 96: (0, 0, 0), 64: (0, 0, 0)},
}


def version() -> str:
    """The official switch, read by both sides: ``USE_VERSION=2_0`` is SparseVLM+ (score.py: ``VERSION ==
    "2_0"``), anything else v1."""
    return "v2" if os.environ.get("USE_VERSION", "1_0") == "2_0" else "v1"


def stage_name(stage: int, what: str = "") -> str:
    """The record's stage key: ``llm<s>`` for the stage before decoder layer ``s`` (= the output of official
    sparse layer ``s - 1``), with ``what`` (``recycled`` / ``centres`` / ``clusters``) after a space."""
    return f"llm{stage}" + (f" {what}" if what else "")


def recycling_record(stage: int, recycled, centres, slots) -> list:
    """The three records of one stage's v1 recycling, from ``recycled`` (the recycled tokens' visual indices, any
    order), ``slots`` (each one's cluster, same order) and ``centres`` (the centres' visual indices, in cluster
    order): recycled ascending, centres, and the clusters of the recycled tokens in ascending order (none when
    nothing was recycled)."""
    recycled, slots = recycled.flatten().long(), slots.flatten().long()
    order = recycled.argsort()
    if not recycled.numel():
        return []
    return [(stage_name(stage, "recycled"), recycled[order][None].cpu()),
            (stage_name(stage, "centres"), centres.flatten().long()[None].cpu()),
            (stage_name(stage, "clusters"), slots[order][None].cpu())]


# ---- the official side (runs in .venv-official) ----

def before_import(method: dict | None = None) -> None:
    """Before the worker imports the clone's ``llava``: ``modelling_sparse_llama.py`` imports
    ``GenerateDecoderOnlyOutput`` & co. from ``transformers.generation.utils``, names of transformers 4.37 (the
    repository pins 4.37.2); 4.36.2 has the same classes as ``GreedySearchDecoderOnlyOutput`` /
    ``GreedySearchEncoderDecoderOutput`` / ``BeamSearchDecoderOnlyOutput`` / ``BeamSearchEncoderDecoderOutput``
    (4.37 renamed them and kept the old names as aliases). Used only as return types of ``return_dict_in_generate``
    (not used here). Its ``generate`` (copied from 4.37) also calls ``config._has_non_default_generation_parameters()``,
    added in 4.37: given to 4.36.2's ``PretrainedConfig`` as 4.37 defines it."""
    import transformers.generation.utils as gu
    from transformers import PretrainedConfig

    for new, old in (("GenerateDecoderOnlyOutput", "GreedySearchDecoderOnlyOutput"),
                     ("GenerateEncoderDecoderOutput", "GreedySearchEncoderDecoderOutput"),
                     ("GenerateBeamDecoderOnlyOutput", "BeamSearchDecoderOnlyOutput"),
                     ("GenerateBeamEncoderDecoderOutput", "BeamSearchEncoderDecoderOutput")):
        if not hasattr(gu, new):
            setattr(gu, new, getattr(gu, old))
    if not hasattr(PretrainedConfig, "_has_non_default_generation_parameters"):
        PretrainedConfig._has_non_default_generation_parameters = _has_non_default_generation_parameters


#: transformers 4.37's ``PretrainedConfig._get_generation_defaults()``
GENERATION_DEFAULTS_437 = {
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
}


def _has_non_default_generation_parameters(self) -> bool:
    """transformers 4.37's ``PretrainedConfig._has_non_default_generation_parameters`` (the official ``generate``,
    copied from 4.37, calls it; 4.36.2 has no such method)."""
    return any(hasattr(self, name) and getattr(self, name) != default
               for name, default in GENERATION_DEFAULTS_437.items())


def before_load(method: dict) -> None:
    """The builder's ``for i in range(32)`` (``llava/model/builder.py``: a ``flash_attn`` copy of each layer's
    attention, never called at inference) over the loaded model's layers, and the CUDA-only calls of
    ``modelling_sparse_llama.py`` on a CPU-only build: the timing (``torch.cuda.Event``, ``synchronize``) as
    no-ops and ``Tensor.cuda()`` (v1's decode position, ``LlamaDynamicvitSdpaAttention.forward``) as the
    identity (the model is on the CPU)."""
    import builtins

    import torch
    from llava.model import builder

    if getattr(builder, "_parity_sparsevlm", False):
        return
    real = builder.LlavaLlamaDynamicForCausalLM
    layers: dict = {}

    class _Loader:  # the builder's only use of the class: from_pretrained
        @staticmethod
        def from_pretrained(*args, **kwargs):
            model = real.from_pretrained(*args, **kwargs)
            layers["n"] = len(model.model.layers)
            return model

    def _range(*args):
        if args == (32,) and "n" in layers:  # the 32 layers of LLaVA-1.5-7B: the model's own
            return builtins.range(layers["n"])
        return builtins.range(*args)

    builder.LlavaLlamaDynamicForCausalLM = _Loader
    builder.range = _range
    builder._parity_sparsevlm = True
    if not torch.cuda.is_available():
        from . import _official

        _official.cpu_cuda_timing()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self


def enable(model, method: dict) -> None:
    import torch
    from llava.model.language_model import modelling_sparse_llama as msl
    from llava.model.language_model import score

    budget = int(method["budget"])
    ver = "v2" if msl.V2_0 else "v1"
    if ver != version():
        raise RuntimeError(f"sparsevlm: the official code imported as {ver} but USE_VERSION says {version()}")
    counts = TINY_COUNTS[ver].get(budget)
    if counts is None:
        raise ValueError(f"sparsevlm: no official schedule for budget {budget} (192 / 128 / 96 / 64)")
    # RETAIN_TOKN, as the eval scripts set it (score.py reads it at import; attn_postprocess_topk at each call)
    os.environ["RETAIN_TOKN"] = str(budget)
    score.RETAIN_TOKN = budget
    # the README's "modify score.py" for other counts: the budget's counts and the sparse layers of this depth
    score.sparse_token_dict[budget] = list(counts)
    score.layer_dict.clear()
    score.layer_dict.update({layer: i for i, layer in enumerate(TINY_LAYERS)})
    model.get_model().pruning_loc = list(TINY_LAYERS)
    if getattr(model, "_parity_sparsevlm", False):
        return
    model._parity_sparsevlm = True

    # the forward returns (prev_decision, out_pred_prob, CausalLMOutputWithPast); the worker reads ``.logits``,
    # the official greedy_search ``outputs[2]``
    class _Out(tuple):
        @property
        def logits(self):
            return self[2].logits

    forward = model.forward

    @functools.wraps(forward)  # its signature: generate() validates its keyword arguments against it
    def forward_with_logits(*args, **kwargs):
        out = forward(*args, **kwargs)
        return _Out(out) if isinstance(out, tuple) and len(out) == 3 else out

    model.forward = forward_with_logits

    # the sparse layers are called with ``hidden_states=`` as a keyword (LlamaDynamicvitModel.forward); the worker's
    # length hook reads the first positional argument: the same call with it positional
    for layer in model.get_model().layers:
        cls = type(layer)

        def __call__(self, *args, _call=cls.__call__, **kwargs):
            if not args and "hidden_states" in kwargs:
                args = (kwargs.pop("hidden_states"),)
            return _call(self, *args, **kwargs)

        layer.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})

    # v2's topk(14) heads on a model with fewer heads: the official function unchanged, its topk's k clipped to
    # the heads there are (ours clips ``heads`` the same way)
    class _ClipTopk(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in (torch.Tensor.topk, torch.topk):
                t, k = args[0], (args[1] if len(args) > 1 else kwargs.pop("k"))
                dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
                args = (t, min(int(k), t.shape[dim])) + tuple(args[2:])
            return super().__torch_function__(func, types, args, kwargs)

    select = msl.select_attn_head_by_sum

    def select_attn_head_by_sum(self_attn_weights, *args, **kwargs):
        out = select(self_attn_weights.as_subclass(_ClipTopk), *args, **kwargs)
        return out.as_subclass(torch.Tensor)

    msl.select_attn_head_by_sum = select_attn_head_by_sum


class _Restore:
    """A handle that puts a module attribute back (the worker calls ``remove()`` after each run)."""

    def __init__(self, module, name, original):
        self.module, self.name, self.original = module, name, original

    def remove(self):
        setattr(self.module, self.name, self.original)


def record(model, store: list) -> list:
    """Wrap ``attn_postprocess_topk`` (the kept mask of each sparse layer), ``cluster_and_merge`` and
    ``utils.index_points`` (v1 recycling), and hook the sparse layers (their output, where the recycled rows are
    found)."""
    import torch
    from llava.model.language_model import modelling_sparse_llama as msl
    from llava.model.language_model import utils

    state: dict = {}
    inner = model.get_model()

    post = msl.attn_postprocess_topk

    def attn_postprocess_topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx,
                              layer_idx):
        mask, s_flag, relation = post(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx,
                                      layer_idx)
        if mask.shape[0] != 1:
            raise RuntimeError("sparsevlm: the official sparse layers are batch-1 code")
        stage = int(layer_idx) + 1
        store.append((stage_name(stage), torch.nonzero(mask[0]).flatten()[None].cpu()))
        state.update(stage=stage, v_start=int(v_token_start), v_num=int(mask.shape[1]), mask=mask[0].clone())
        return mask, s_flag, relation

    def layer_hook(module, args, kwargs, output):
        state["out"] = output[0].detach()

    index_points = utils.index_points

    def index_points_rec(points, idx):
        res = index_points(points, idx)
        state["centres"], state["rows"] = idx.detach().clone(), res.detach().clone()
        return res

    merge = msl.cluster_and_merge

    def cluster_and_merge(x, cluster_num):
        state.pop("centres", None)
        merged = merge(x, cluster_num)
        out = state["out"][0, state["v_start"]:state["v_start"] + state["v_num"]]  # the sparse layer's visual rows
        eq = (x[0][:, None, :] == out[None, :, :]).all(-1)  # (m, v): the recycled rows are copies of these
        if not bool((eq.sum(1) == 1).all()):
            raise RuntimeError("sparsevlm: a recycled row matches no visual row (or several)")
        recycled = eq.float().argmax(1)  # visual index of each recycled row, in the official (topk) order
        centres = state["centres"][0]
        slots = state["rows"][0].argmin(dim=0)  # dist_matrix.argmin(dim=1) of the (1, c, m) rows
        slots[centres] = torch.arange(centres.numel())  # idx_cluster[..., index_down] = arange(cluster_num)
        store.extend(recycling_record(state["stage"], recycled, recycled[centres], slots))
        return merged

    msl.attn_postprocess_topk = attn_postprocess_topk
    msl.cluster_and_merge = cluster_and_merge
    utils.index_points = index_points_rec
    handles = [_Restore(msl, "attn_postprocess_topk", post), _Restore(msl, "cluster_and_merge", merge),
               _Restore(utils, "index_points", index_points)]
    for layer in TINY_LAYERS:
        handles.append(inner.layers[layer].register_forward_hook(layer_hook, with_kwargs=True))
    return handles


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "sparsevlm", {"version": version(), "numerics": "official"}


def record_ours(rt, store: list):
    """After the prefill: each stage's selection (``engine.selections[(i, 0)]``, ``i`` the stage's index) as the
    official records: the kept visual tokens ascending and, where v1 recycled,
    the recycled tokens, the centres (``targets``) and
    the cluster of each recycled token (``assign``)."""
    import torch

    def finish(n_samples: int) -> None:
        if n_samples != 1:
            raise RuntimeError("sparsevlm parity runs each image alone")
        for i, stage in enumerate(rt.engine.method.llm_layers):
            sel = rt.engine.selections.get((i, 0))  # keyed by the stage's index
            if sel is None:  # no visual token left at this stage (the engine asks nothing): nothing kept, as
                # the official attn_postprocess_topk's all-ones mask of width 0 (``v_token_num == 0``)
                store.append((stage_name(stage), torch.zeros(1, 0, dtype=torch.long)))
                continue
            store.append((stage_name(stage), sel.keep.flatten().sort().values[None].cpu()))
            if sel.assign is not None:
                assign = sel.assign.flatten().cpu()
                recycled = torch.nonzero(assign >= 0).flatten()
                store.extend(recycling_record(stage, recycled, sel.targets.flatten().cpu(), assign[recycled]))

    return finish
