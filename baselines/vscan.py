"""VScan (TMLR 2026, arXiv 2505.22654), docs/methods/vscan.md.

Official code: Tencent/SelfEvolvingAgent, folder ``VScan/`` (commit a82450e):
``llava/model/llava_arch.py`` (``encode_images``, ``window_cls_selection``, ``token_merging``) for stage 1
and ``llava/model/modeling_llama_x.py`` (``layer_prune``, PyramidDrop's, called after layer 15) for stage 2.

Stage 1, pre-LLM, per unit (LLaVA-1.5 image / LLaVA-NeXT crop / Video-LLaVA frame) with budget T:

1. A_loc, A_glob = head-mean [CLS] query rows (fp32) of a shallow and a deep CLIP layer (official
   ``attentions[5]`` and ``attentions[-2]`` = layer 22 of 24, the layer producing the select features);
2. local scan: the unit's patch grid is cut into non-overlapping s x s windows (official 6 x 6 on 24 x 24
   = 16 windows); the top-k patches of each window by A_loc, k = int(T * 0.5) // (number of windows);
3. global scan: the top-(T - int(T * 0.5)) tokens by A_glob among those not picked locally (official:
   local picks zeroed in A_glob);
4. the picked tokens are the merge targets: every other token of the unit joins its most similar picked
   token (cosine on the **projected** features, ties to the lowest), merged = (x_keep + sum x_assigned) /
   (1 + count) (rule ``mean``); the outputs keep ascending spatial order (LLaVA-NeXT: the stock packing
   order, newlines kept as layout).

Stage 2, before decoder layer K (official 16 of 32): layer K's ``input_layernorm`` + q/k + RoPE on the
hidden states after layer K-1, query = the last prompt token, causal softmax (fp32), head mean, visual
columns; keep the top-K1 visual tokens, ascending; positions re-indexed (decode positions shifted).
Same as PyramidDrop's stage (:func:`llava.ops.last_row_topk`).

Everything is vectorised on the device (the official local scan is a Python loop with ``.item()`` per
token); ties go to the lower index; the only host read the method adds is one per sample for LLaVA-NeXT
'spatial_unpad' crops whose windows are partly cut away (their local count depends on the layout).
See docs/methods/vscan.md for budgets, layer mappings and deviations.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics of both stages.
The official tower runs in fp32 (``load_pretrained_model``'s default ``device_map='auto'`` leaves it uncast),
but ``CLIPVisionTower.forward`` casts its features *and* attentions ``.to(images.dtype)`` (fp16 under its eval
scripts; in an fp32 run fp32: ours takes the run's own dtype, the projected features', so the parity harness's fp32
rows match the official fp32 run), the projector and the LLM run in fp16. Stage 1: the [CLS] rows cast to fp16, head
mean in fp16, the local scan
``torch.topk`` per window (row-major window vector), the global scan ``torch.topk`` of the unit's patch row
with the local picks set to **0** (not excluded: a local pick can be picked again where fewer non-local
patches are positive in fp16, and the unit then keeps fewer targets; one host read per sample for the
count), the assignment ``F.cosine_similarity`` of the fp16 projected features, ``argmax``. The merge
itself (rule ``mean``) is the engine's fp32 merge (the official one sums in fp16). Stage 2: PyramidDrop's
official numerics (``last_row_topk(..., numerics="official")``: fp16 probabilities and means,
``torch.topk``), which VScan's ``layer_prune`` shares.
"""

from __future__ import annotations

import torch

from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import last_row_topk, scale_layers
# stage 1 is shared with TRIO's "w/ VE" option: it lives in llava/ops/ (re-imported under its names here)
from llava.ops import (REFERENCE_TOWER, local_counts, local_layer_for, split_budget, vscan_stage1,  # noqa: F401
                       window_side)
from llava.ops import VSCAN_COSINE_CHUNK as COSINE_CHUNK  # noqa: F401
from llava.ops import VSCAN_LOCAL_LAYER as OFFICIAL_LOCAL_LAYER  # noqa: F401
from llava.ops import VSCAN_OFFICIAL_DTYPE as OFFICIAL_DTYPE  # noqa: F401
from llava.ops import VSCAN_REMAINDERS as REMAINDERS
from llava.ops import VSCAN_WINDOWS_PER_SIDE as OFFICIAL_WINDOWS_PER_SIDE  # noqa: F401
from llava.ops import _vscan_official_assign as _official_assign  # noqa: F401
from llava.ops import _vscan_official_scans as _official_scans  # noqa: F401
from llava.options import Option
from llava.selection import Selection

OFFICIAL_STAGE1 = 96  # visual_token_num (README, all scripts)
OFFICIAL_STAGE2 = 32  # image_token_list [32]
OFFICIAL_LAYER = 16  # layer_list [16] of 32
REFERENCE_DEPTH = 32


@register
class VScan(Method):
    """VScan: per image / crop / frame, complementary local (windowed, shallow layer) and global (deep
    layer) [CLS]-attention scans pick T tokens and every other token is merged into its most similar pick;
    before the middle LLM layer the last prompt token's attention keeps K1 of them per unit.

    ``budget``: equivalent visual tokens per unit (layer average, stage at half depth): stage 1 =
    2B - B//2, stage 2 = B//2 per unit (64 -> 96 / 32, official). Or ``stage1`` / ``stage2`` explicitly
    (per unit); neither: the official 96 / 32."""

    name = "vscan"
    llm_reads = ("next",)  # layer K's attention row of the last prompt token
    #: stage 1 with the planned layout and local counts (no host read), stage 2 per segment (llava.fast.llm);
    #: the reference mode (its overlapping official picks need a nonzero) runs eagerly
    capturable = "full"
    vision_stage = True
    position_mode = "reindex"
    families = registry.where(tower="clip")
    unsupported_reason = ("vscan reads the [CLS] query rows of two CLIP layers (local / global scans): "
                          "CLIP towers with a [CLS] token only (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA)")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # tokens per unit after the vision stage / after the LLM stage; None = from the budget, or
            # the official 96 / 32
            "stage1": None,
            "stage2": None,
            # LLM stage: before this decoder layer, stated for 32 layers (official 16)
            "layer": OFFICIAL_LAYER,
            "scale_layers": True,
            # encoder layers (0-based, as attentions[i]) of the scans; None = floor(5 * n / 24) (official
            # 5 of 24) and n - 2 (official attentions[-2], the layer producing the select features)
            "local_layer": None,
            "global_layer": None,
            # local window side in patches; None = 4 windows per side where windows keep >= 2 x 2 patches
            # (official 6 x 6 on 24 x 24; 2 x 2 on the tiny 4 x 4 grid)
            "window": None,
            # share of stage 1 from the local scan (official hard-coded 0.5)
            "local_ratio": 0.5,
            "remainder": Option("drop", REMAINDERS,
                                doc="local quota not divisible by the window count: drop (official) or global"),
            # "ours" (fp32, ties to the lower index) or "official" (reference mode: fp16 scans and cosine,
            # the official torch.topk calls; stage 2 as PyramidDrop's reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and (options.get("stage1") is not None or options.get("stage2") is not None):
            raise ValueError("vscan: give either a budget or stage1= / stage2=, not both")
        super().__init__(budget, **options)
        if self.budget is not None:
            if self.budget < 2:
                raise ValueError("vscan: budget must be >= 2 (stage 2 keeps budget // 2 per unit)")
            self.stage1, self.stage2 = split_budget(self.budget)
        else:
            self.stage1 = OFFICIAL_STAGE1 if self.stage1 is None else self.stage1
            self.stage2 = OFFICIAL_STAGE2 if self.stage2 is None else self.stage2
        for k in ("stage1", "stage2"):
            v = getattr(self, k)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"vscan: {k} must be a whole number >= 1, got {v!r}")
            setattr(self, k, int(v))
        if not 0.0 <= float(self.local_ratio) <= 1.0:
            raise ValueError("vscan: local_ratio must be in [0, 1]")
        if self.window is not None and (isinstance(self.window, bool) or int(self.window) < 1):
            raise ValueError("vscan: window must be >= 1 patch")
        if self.numerics == "official":  # the [CLS] rows as the official eager tower computes them, in its dtype
            self.vision_attention_logits = "model"
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=REFERENCE_TOWER, family="llava")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        n = int(num_vision_layers)
        self._local = local_layer_for(n) if self.local_layer is None else int(self.local_layer) % n
        self._global = n - 2 if self.global_layer is None else int(self.global_layer) % n
        # hidden_states[v] is produced by encoder layer v - 1
        self.vision_cls_layers = tuple(sorted({self._local + 1, self._global + 1}))
        self._layers = (scale_layers((int(self.layer),), num_layers) if self.scale_layers
                        else (int(self.layer),))

    @property
    def llm_layers(self):
        return self._layers

    def stage2_count(self, num_units: int) -> int:
        """Visual tokens kept at the LLM stage for a sample of ``num_units`` units (K1 per unit, over the
        whole visual block)."""
        return self.stage2 * int(num_units)

    def plan_static(self, sig):
        return local_counts(sig.unit, sig.patch, sig.grid, self.stage1, window=self.window,
                            local_ratio=float(self.local_ratio))

    def select_vision(self, sig):
        planned = sig.captured and sig.static is not None
        return vscan_stage1(sig.cls_attn_layers[self._local + 1], sig.cls_attn_layers[self._global + 1],
                            sig.features, sig.unit, sig.patch, sig.grid, self.stage1, window=self.window,
                            local_ratio=float(self.local_ratio), remainder=self.remainder,
                            unit_host=sig._unit_host, numerics=self.numerics,
                            layout=sig.unit_layout() if planned else None,
                            local_host=sig.static if planned else None,
                            # reference mode: the official .to(images.dtype), the run's own dtype (fp16 under the
                            # official eval scripts, fp32 in an fp32 run; parity/adapters/vscan.py)
                            official_dtype=sig.features.dtype)

    def select_llm(self, stage, sig):
        k = self.stage2_count(sig.vision.num_units)
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=sig.visual.device))
        # (H, S): layer K's q/k, last prompt token; reference mode: the official eager attention's fp16 logits
        row = sig.attention("last", layer="next", logits="model" if self.numerics == "official" else "fp32")[:, 0]
        return Selection(keep=last_row_topk(row, sig.visual, k, self.numerics, method="vscan",
                                          dtype=sig.hidden.dtype))
