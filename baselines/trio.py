"""TRIO, "Token Reduction via Inference-Objective Guidance" (arXiv 2602.04657; v1/v2 titled PIO-FVLM), issue 32.

Official code: ocy1/TRIO @ ec85d99 (the core ``layer_prune`` was filled in by 77f024a, LLaVA, and 0fab4b8,
Qwen2.5-VL). LLaVA path: ``llava/model/modeling_llama_x.py`` ``LlamaModel.forward_x`` (1246-1262: after decoder
layer ``l - 1`` for each ``l`` in ``layer_list``, prefill only) calls ``layer_prune`` (1334-1804). Study:
docs/methods/studies-2026-leaders.md section 2; our notes: docs/methods/trio.md.

Algorithm (prefill only), per sample, at each stage s before decoder layer K = ``layer_list[s]``::

    x   = the hidden states entering layer K (after layer K-1), N = the current visual tokens, k = the stage count
    L   = mean over the proxy rows r of CE(z_r, argmax z_r),  z = lm_head(norm(layer_K(x)))     [fp32 CE]
          proxy rows: the K_pos = 4 rows before the last prompt row (official ``logits[:, :-1]`` shift, 1459-1481)
    g   = dL/dx (S, D), through layer K only (x detached);  sal_i = ||g_i||_2 for the visual rows i
    NMS : order the visual tokens by sal, descending; walk the order: skip a suppressed token, else keep it and
          suppress every token whose cosine with it (current hidden states, L2-normalised, fp32) is >= tau = 0.8;
          stop at k kept; if fewer than k, fill with the unkept tokens in saliency order
    out = the kept tokens in ascending (original) order; no merge; positions re-indexed (PyramidDrop style)

:func:`trio_nms` is the selection step (saliency + features -> kept indices); the gradient is the engine's
:meth:`llava.signals.LLMSignals.grad_saliency` (one extra forward + backward of one decoder layer per stage).

Schedules (official scripts; E = layer average over 32 layers, LLaVA-1.5's 576 visual tokens):

* budget 128 (default): ``layer_list`` [1, 10, 15], counts [218, 128, 54] (``v1_5/eval/{mme,pope,sqa,textvqa,
  vqav2,mmbench,mmvet}.sh``), E = 128.0;
* budget 64: [1, 10, 15], [92, 54, 22] (``textvqa_set1.sh:10-12``; comment at ``modeling_llama_x.py:1333``), E = 64.0;
* budget 192: not released; [344, 202, 86] (ours: the 64 / 128 ratios b / a = 0.587, E = 192.0 exactly);
* any other budget B: the 128 counts scaled by one factor so that E = B (ours).

Counts are stated per 576 candidates (one LLaVA-1.5 image) and, by default, scaled to the sample's visual count
(``floor(N c / 576)``, as PyramidDrop's table; option ``counts="absolute"``: the official ``min(c, N)`` per
sample, e.g. the official NeXT list [436, 255, 173] over the whole image block). ``ratios`` (Qwen2.5-VL
official: [0.333] at layer 14 of 28, ``int(r * current)``) replaces the counts. Stage layers are stated for 32
layers and mapped with :func:`llava.ops.scale_layers`; the counts are then refitted to the same layer average
(:func:`llava.ops.fit_stage_counts`).

"w/ VE" (option ``encoder="vscan"``; default None = "w/o VE", the schedules above): the official README's default
command (README.md:524-544: ``--visual_token_num 96 --layer_list '[16]' --image_token_list '[32]'``) runs VScan's
stage 1 in the vision encoder (``llava/model/llava_arch.py`` ``encode_images`` 254-293: [CLS] rows of
``attentions[5]`` / ``attentions[-2]``, ``window_cls_selection`` on 6 x 6 windows for ``int(T * 0.5)`` tokens,
``topk`` of the rest, every other token merged into its most similar pick by ``token_merging`` 142-197), then the
gradient + NMS stage above at layer 16 keeping 32. Here: :func:`llava.ops.vscan_stage1` (VScan's stage 1, shared
with baselines/vscan.py) per unit (image / NeXT crop / video frame) with ``visual_token_num`` T (official 96), then
TRIO's LLM stage at ``layer_list`` (16,) keeping ``image_token_list`` (32,) per unit. ``budget`` B = the layer
average per unit (README.md:544: "an average of 64 visual tokens across all 32 layers"): T = 2B - B // 2, 32-layer
stage at 16 keeping B // 2 (64 -> 96 / 32 official; 128 -> 192 / 64, 192 -> 288 / 96 ours, VScan's split). CLIP
towers only (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA: the scans read [CLS] rows).

Reference mode (``numerics="official"``; default ``"ours"``): the saliency norm taken in the model dtype (the
official ``grad.to(features.dtype).norm()``: fp16 on LLaVA, so ties appear) and ``torch.argsort`` (official tie
order, unstable) instead of the fp32 norm with ties to the lower index; with ``encoder="vscan"`` also VScan's stage 1
in its reference mode (fp16 scans, the official ``topk`` calls and ``F.cosine_similarity``; the same code). The
gradient itself is the same in both modes (model-dtype layer and backward, fp32 logits and CE). Eager only (a
backward pass inside the prefill).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import (REFERENCE_DEPTH, REFERENCE_TOKENS, check_numerics, fit_stage_counts, local_layer_for,
                       scale_layers, scaled_count, split_budget, vscan_stage1)
from llava.options import Option
from llava.proxy_grad import PROXY_ROWS
from llava.selection import Selection

#: ``--layer_list '[1,10,15]'`` of every LLaVA-1.5 w/o VE script (e.g. ``llava/model/scripts/v1_5/eval/mme.sh:13``)
OFFICIAL_LAYERS = (1, 10, 15)
#: kept visual tokens (of 576) after each stage, per budget (E over 32 layers); 192 is ours (not released)
SCHEDULES = {
    64: (92, 54, 22),  # textvqa_set1.sh:12, textvqa_set2.sh; modeling_llama_x.py:1333
    128: (218, 128, 54),  # mme.sh:14, pope.sh:12, textvqa.sh:13, sqa / vqav2 / mmbench / mmvet
    192: (344, 202, 86),  # ours: b / a = 0.587 as 64 / 128, E = 192.0
}
DEFAULT_BUDGET = 128
#: NMS cosine threshold (``modeling_llama_x.py:1649``, ``qwen2_5_vl_custom.py:1144``): suppress if sim >= tau
OFFICIAL_TAU = 0.8
#: proxy rows ``K_pos`` (``modeling_llama_x.py:1437``)
OFFICIAL_PROXY_ROWS = 4
#: Qwen2.5-VL official (README.md:565-567): stage at layer 14 of 28 keeping int(0.333 * current)
QWEN_LAYERS, QWEN_RATIOS = (14,), (0.333,)
COUNT_MODES = ("scaled", "absolute")
#: families whose decoder layers the proxy loss re-runs as the stock model does (tests/test_trio.py)
FAMILIES = registry.where(deepstack=False)
#: the "w/ VE" option: the encoder stage before the LLM (None = "w/o VE")
ENCODERS = (None, "vscan")
#: w/ VE, the README's default command (README.md:524-544): ``--visual_token_num 96``, ``--layer_list '[16]'``,
#: ``--image_token_list '[32]'`` (per image; per unit here)
VE_VISUAL_TOKEN_NUM, VE_LAYERS, VE_COUNTS = 96, (16,), (32,)
#: VScan's stage 1 reads the [CLS] query rows of two CLIP layers
VE_FAMILIES = registry.where(tower="clip")
VE_REASON = ("trio encoder='vscan' runs VScan's stage 1, which reads the [CLS] query rows of two CLIP layers (local / "
             "global scans): CLIP towers with a [CLS] token only (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA)")


def layer_average(n: int, layers, counts, depth: int = REFERENCE_DEPTH) -> float:
    """E = the layer-average visual count of a schedule: n before ``layers[0]``, ``counts[s]`` from ``layers[s]``."""
    bounds = [*layers, depth]
    cur, total = int(n), bounds[0] * int(n)
    for s, c in enumerate(counts):
        cur = min(cur, int(c))
        total += (bounds[s + 1] - bounds[s]) * cur
    return total / depth


def budget_counts(budget: int, layers=OFFICIAL_LAYERS) -> tuple[int, ...]:
    """Counts (of 576) after each stage for a layer-average ``budget`` on 32 layers: the table for the official
    layers, else the 128 schedule times one factor a = (32 B - l_1 576) / sum_s len_s c_s (halves up; ours)."""
    layers = tuple(int(k) for k in layers)
    if layers == OFFICIAL_LAYERS and budget in SCHEDULES:
        return SCHEDULES[budget]
    base = SCHEDULES[DEFAULT_BUDGET]
    if len(layers) != len(base):
        raise ValueError(f"trio: a budget with {len(layers)} stage layers needs explicit image_token_list= or ratios=")
    bounds = [*layers, REFERENCE_DEPTH]
    num = REFERENCE_DEPTH * int(budget) - layers[0] * REFERENCE_TOKENS
    den = sum((bounds[s + 1] - bounds[s]) * c for s, c in enumerate(base))
    if num <= 0:
        floor = layers[0] * REFERENCE_TOKENS / REFERENCE_DEPTH
        raise ValueError(f"trio: budget {budget} is below the {floor:g} tokens "
                         f"the layers before the first stage (layer {layers[0]}) already average")
    out, prev = [], REFERENCE_TOKENS
    for c in base:
        prev = min(prev, math.floor(num * c / den + 0.5))
        out.append(prev)
    return tuple(out)


def trio_nms(saliency: torch.Tensor, features: torch.Tensor, k: int, tau: float = OFFICIAL_TAU,
             numerics: str = "ours") -> torch.Tensor:
    """TRIO's selection for one stage: (k,) indices of the kept visual tokens, ascending.

    saliency (N,): gradient saliency; features (N, D): the visual tokens' current hidden states. Greedy NMS in
    saliency order: a token is kept unless a kept token has cosine >= ``tau`` with it (then it is suppressed);
    stops at k kept; if fewer than k survive, the unkept tokens fill in in saliency order (official second
    round). ``tau`` None: plain top-k by saliency (official ``enable_nms=False``).
    ``numerics="ours"``: ties to the lower index (stable sort); "official": ``torch.argsort(descending=True)``.
    The loop runs k device steps of 4 ops (no host read)."""
    check_numerics("trio", numerics)
    n = saliency.numel()
    k = max(0, min(int(k), n))
    dev = saliency.device
    if numerics == "official":
        order = torch.argsort(saliency, descending=True)
    else:
        order = torch.sort(saliency.float(), descending=True, stable=True).indices
    if k == 0:
        return order[:0]
    if tau is None:
        return order[:k].sort().values
    rank = torch.empty(n, dtype=torch.long, device=dev)
    rank[order] = torch.arange(n, device=dev)
    v = F.normalize(features.float(), dim=-1)
    # one state per token, whose minimum is the next pick: its rank while free, n + rank once suppressed (the fill
    # round takes those in saliency order when no free token is left), 3n once kept; ranks are distinct, so the
    # argmin is the greedy walk's token. A pick raises its neighbours (cosine >= tau, the official
    # sim_matrix >= tau) to at least n + rank: row i of `raise_to`
    raise_to = torch.where((v @ v.T) >= tau, rank + n, 0)  # (N, N)
    state = rank.clone()
    picks = []
    for _ in range(k):  # 4 device ops per kept token, every index a (1,) tensor (a 0-d one is read to the host)
        i = state.argmin(0, keepdim=True)
        picks.append(i)
        state = torch.maximum(state, raise_to.index_select(0, i)[0]).index_fill_(0, i, 3 * n)
    return torch.cat(picks).sort().values


@register
class TRIO(Method):
    """TRIO (PIO-FVLM): before LLM layers 1, 10 and 15 (of 32) the visual tokens are ranked by the gradient of a
    layer-local proxy loss (the next layer, the final norm and the LM head on the last prompt rows, CE against
    their own argmax) and kept greedily with a feature-space NMS (cosine >= 0.8 suppressed).

    ``budget``: layer-average visual tokens per 576 candidates on a 32-layer LLM (128 -> 218 / 128 / 54, 64 ->
    92 / 54 / 22 official; 192 -> 344 / 202 / 86 ours). Without a budget: the 128 schedule.

    ``encoder="vscan"`` ("w/ VE", the official README's default): VScan's stage 1 keeps ``visual_token_num`` (96)
    per unit before the LLM, then one stage before layer 16 keeps ``image_token_list`` (32) per unit; ``budget`` is
    then the layer average per unit (64 -> 96 / 32)."""

    name = "trio"
    position_mode = "reindex"
    llm_grad = True  # refused at attach on a tensor-parallel model (PruningEngine._check_grad)
    llm_reads = ("next",)  # the proxy loss runs decoder layer K (option probe_layer="prev": layer K-1)
    capturable = None
    capture_reason = ("trio: its llm stages take a gradient (a backward pass through one decoder layer inside the "
                      "prefill), which a captured graph does not hold")
    families = FAMILIES
    unsupported_reason = ("the proxy loss re-runs a stock decoder layer; Qwen3-VL adds DeepStack rows after its first "
                          "layers, which that re-run would miss (not built)")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # stage layers, stated for a 32-layer LLM (official [1, 10, 15]; Qwen2.5-VL [14] of 28)
            "layer_list": OFFICIAL_LAYERS,
            # kept visual tokens after each stage, per 576 candidates (or absolute, see counts); None = from the
            # budget (module doc). Excludes ratios.
            "image_token_list": None,
            # Qwen2.5-VL's ratio schedule: after stage s keep int(r_s * current) (official [0.333] at layer 14)
            "ratios": None,
            "counts": Option("scaled", COUNT_MODES,
                             doc="scaled: floor(N c / 576) for a sample with N visual tokens (ours, PyramidDrop's "
                                 "convention); absolute: min(c, N) (official image_token_list)"),
            "scale_layers": True,
            # NMS threshold on the cosine of the current hidden states (official 0.8); None = plain top-k
            "tau": OFFICIAL_TAU,
            "proxy_rows": Option("shifted", PROXY_ROWS,
                                 doc="shifted (official: the K_pos rows before the last prompt row) or last"),
            "num_proxy_rows": OFFICIAL_PROXY_ROWS,
            # the decoder layer the proxy loss runs on the hidden states entering layer K: "next" (layer K,
            # official LLaVA) or "prev" (layer K-1 again on its own output, the official Qwen2.5-VL code)
            "probe_layer": "next",
            # "ours" (fp32 saliency norm, ties to the lower index) or "official" (model-dtype norm, torch.argsort;
            # with encoder="vscan" also VScan's stage-1 reference mode)
            "numerics": NUMERICS_OPTION,
            "encoder": Option(None, ENCODERS,
                              doc="w/ VE: None (w/o VE, default) or vscan (VScan's stage 1 before the LLM, "
                                  "README.md:524-544); then layer_list defaults to (16,), image_token_list to (32,) "
                                  "per unit, counts scaled = per unit"),
            # w/ VE: tokens per unit after the encoder stage (official --visual_token_num 96); None = from the
            # budget (2B - B // 2) or 96
            "visual_token_num": None,
        }

    def __init__(self, budget=None, **options):
        explicit = ("image_token_list", "ratios", "visual_token_num")
        if budget is not None and any(options.get(k) is not None for k in explicit):
            raise ValueError("trio: give either a budget or image_token_list= / ratios= / visual_token_num=, not both")
        super().__init__(budget, **options)
        if self.image_token_list is not None and self.ratios is not None:
            raise ValueError("trio: give image_token_list= or ratios=, not both")
        if self.encoder is None and self.visual_token_num is not None:
            raise ValueError("trio: visual_token_num (tokens per unit after the encoder stage) needs encoder='vscan'")
        if self.encoder is not None and "layer_list" not in options:
            self.layer_list = VE_LAYERS
        layers = tuple(self.layer_list)
        if not layers or any(isinstance(k, bool) or int(k) != k or not 1 <= int(k) < REFERENCE_DEPTH for k in layers) \
                or list(layers) != sorted(set(layers)):
            raise ValueError(f"trio: layer_list must be strictly increasing decoder layers in 1..31 (of 32), "
                             f"got {list(layers)}")
        self.layer_list = tuple(int(k) for k in layers)
        if self.ratios is not None:
            self.ratios = tuple(float(r) for r in self.ratios)
            if len(self.ratios) != len(self.layer_list) or any(not 0.0 <= r <= 1.0 for r in self.ratios):
                raise ValueError("trio: ratios must be values in [0, 1], one per stage layer")
            self._counts = None
        else:
            counts = self.image_token_list
            if counts is None and self.encoder is not None:
                counts = VE_COUNTS if self.budget is None else self._ve_budget()[1:]
            elif counts is None:
                counts = budget_counts(DEFAULT_BUDGET if self.budget is None else self.budget, self.layer_list)
            counts = tuple(counts)
            if len(counts) != len(self.layer_list) or any(isinstance(c, bool) or int(c) != c or c < 0 for c in counts):
                raise ValueError("trio: image_token_list needs one whole count >= 0 per stage layer, got "
                                 f"{list(counts)}")
            self._counts = tuple(int(c) for c in counts)
        if self.tau is not None and not isinstance(self.tau, (int, float)):
            raise ValueError(f"trio: tau must be a number or None, got {self.tau!r}")
        if isinstance(self.num_proxy_rows, bool) or int(self.num_proxy_rows) != self.num_proxy_rows \
                or self.num_proxy_rows < 1:
            raise ValueError(f"trio: num_proxy_rows must be a whole number >= 1, got {self.num_proxy_rows!r}")
        if self.probe_layer not in ("next", "prev"):
            raise ValueError(f"trio: probe_layer must be 'next' or 'prev', got {self.probe_layer!r}")
        self.llm_reads = (self.probe_layer,)  # the hybrid check reads the instance's
        if self.encoder is not None:
            t = self.visual_token_num
            if t is None:
                t = VE_VISUAL_TOKEN_NUM if self.budget is None else self._ve_budget()[0]
            if isinstance(t, bool) or int(t) != t or t < 1:
                raise ValueError(f"trio: visual_token_num must be a whole number >= 1, got {t!r}")
            self.visual_token_num = int(t)
            # the instance runs a vision stage and narrows the families to the CLIP towers (the class keeps w/o VE's;
            # the engine asks the instance: Method.runs_on)
            self.vision_stage = True
            self.families, self.unsupported_reason = VE_FAMILIES, VE_REASON
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=24, family="llava")

    def _ve_budget(self) -> tuple[int, int]:
        """w/ VE: (tokens per unit after the encoder, after the LLM stage) for the layer-average ``budget`` per unit
        with the one stage at half depth (README.md:544, 96 / 32 -> 64): VScan's split, 2B - B // 2 and B // 2."""
        if self.layer_list != VE_LAYERS:
            raise ValueError(f"trio: a w/ VE budget is the layer average with one stage at layer {VE_LAYERS[0]} of 32; "
                             f"with layer_list {list(self.layer_list)} give visual_token_num= and image_token_list=")
        if self.budget < 2:
            raise ValueError("trio: a w/ VE budget must be >= 2 (the LLM stage keeps budget // 2 per unit)")
        return split_budget(self.budget)

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        self._layers = (scale_layers(self.layer_list, num_layers) if self.scale_layers else self.layer_list)
        if self._layers[-1] >= num_layers:
            raise ValueError(f"trio: stage layers {list(self._layers)} do not fit a {num_layers}-layer LLM")
        if self.encoder is not None:  # VScan's layers: official attentions[5] and [-2] of 24 (docs/methods/vscan.md)
            n = int(num_vision_layers)
            self._local, self._global = local_layer_for(n), n - 2
            # hidden_states[v] is produced by encoder layer v - 1
            self.vision_cls_layers = tuple(sorted({self._local + 1, self._global + 1}))

    @property
    def llm_layers(self):
        return self._layers

    def stage_counts(self, n_visual: int, num_units: int = 1) -> tuple[int, ...]:
        """Visual tokens kept after each stage for a sample entering the LLM with ``n_visual`` (w/ VE: in
        ``num_units`` units, counts ``"scaled"`` per unit)."""
        n = int(n_visual)
        if self._counts is None:  # the official Qwen rule: int(r * current), chained
            out, cur = [], n
            for r in self.ratios:
                cur = max(0, min(cur, int(r * cur)))
                out.append(cur)
            return tuple(out)
        if self.counts == "absolute":
            counts = [min(n, c) for c in self._counts]
        elif self.encoder is not None:  # per unit (VScan's convention; official: per image, LLaVA-1.5)
            counts = [min(n, c * int(num_units)) for c in self._counts]
        else:
            counts = [scaled_count(n, c) for c in self._counts]
        return fit_stage_counts(n, counts, self.layer_list, self._layers, self.num_layers)

    def layer_counts(self, n_visual: int, num_units: int = 1) -> list[int]:
        """Predicted visual tokens per decoder layer."""
        bounds, cur = [*self._layers, self.num_layers], int(n_visual)
        out = [cur] * bounds[0]
        for s, k in enumerate(self.stage_counts(n_visual, num_units)):
            cur = min(cur, k)
            out += [cur] * (bounds[s + 1] - bounds[s])
        return out

    def select_vision(self, sig):
        """w/ VE: VScan's stage 1 with ``visual_token_num`` per unit (official settings: windows of a quarter side,
        half local, the local remainder dropped)."""
        if self.encoder is None:
            return super().select_vision(sig)
        return vscan_stage1(sig.cls_attn_layers[self._local + 1], sig.cls_attn_layers[self._global + 1], sig.features,
                            sig.unit, sig.patch, sig.grid, self.visual_token_num, unit_host=sig._unit_host,
                            numerics=self.numerics, official_dtype=sig.features.dtype)  # as VScan's method

    def select_llm(self, stage, sig):
        units = sig.vision.num_units if self.encoder is not None else 1
        k = self.stage_counts(sig.num_visual_entry, units)[stage]
        dev = sig.visual.device
        if k >= sig.num_visual:  # the official skip (k_keep >= img_len): no gradient taken
            return Selection(keep=torch.arange(sig.num_visual, device=dev))
        if k == 0:
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=dev))
        dtype = sig.hidden.dtype if self.numerics == "official" else torch.float32
        sal = sig.grad_saliency(rows=self.proxy_rows, num_rows=int(self.num_proxy_rows), layer=self.probe_layer,
                                dtype=dtype)
        return Selection(keep=trio_nms(sal, sig.hidden[sig.visual], k, self.tau, self.numerics))
