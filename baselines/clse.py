"""CLSE: cross-layer spectral evolution (ECCV 2026, arXiv 2606.24165), docs/methods/clse.md.

Official code: zjubinchen/CLSE at cfc9710abe4a1bd5480e521f3acd86ded4855ff3 - ``CLSELlamaModel.forward`` in
``LLaVA1.5/llava/model/language_model/clse_model.py`` and the scores in ``LLaVA1.5/llava/model/language_model/
tools.py`` (``spatial_spectral_score_2d``, ``get_evolution_factor``, ``calculate_evolution_score``).

Algorithm (prefill only; three stages before decoder layers K = 1, 11, 21 of a 32-layer LLM):

1. a = the last prompt token's attention in layer K-1 (the last layer that ran on the longer sequence), mean
   over heads, visual columns;
2. stage 1 only: the high-pass spectral energy of each visual token on the image's h x w grid, before decoder
   layer 0 (s_L, the projected features) and before layer K (s_K): s(x) = channel mean of
   |IFFT2(H * FFT2(x))|, H = 1 - exp(-d^2 / (2 (min(h, w) // 2 * 0.1)^2)) a Gaussian high-pass around the
   shifted spectrum's centre; r = min(|s_K - s_L| / (mean(s_L) + s_L + 1e-6), 1);
   e = sigmoid(((r - mean r) / (std r + 1e-6)) / 0.1) (the evolution factor; std unbiased); score = e * a;
   stages 2 and 3: score = a;
3. keep the top-k_s visual tokens by score, in their original order; positions kept (original RoPE positions).

Schedule: the official ``RETAIN_TOKEN`` 192 / 128 / 64 keep 330/210/62, 220/140/41, 110/70/20 of 576 after the
three stages; any other budget B keeps floor(B * (1.72, 1.09, 0.32)) (the official fallback factors; its floats
would fail in ``topk``). Counts are stated for 576 tokens: a sample with N tokens keeps floor(N * c / 576).

The official Qwen2-VL rule (``Qwen2VL/clse_qwen2vl_model.py``, run here on Qwen2-VL and Qwen2.5-VL:
``rule="qwen2_vl"``, the default there): stages before layers 1, 10, 19 of 28; each stage keeps max(1, int(N * q_s)) of the sample's own
visual count N, q = (0.57, 0.36, 0.098) / (0.38, 0.24, 0.066) / (0.19, 0.12, 0.034) for RETAIN_RATIO 0.334 / 0.223 /
0.112 (any other r: r * (1.71, 1.08, 0.294)), pruning only where the current count exceeds it; the spectrum on the
image's merged grid (H/2, W/2); the attention row computed beside the layer as ``q k^T * scaling``; the earlier
layers' caches left whole.

Reference mode (``numerics="official"``): the attention as the official eager layer gives it (fp16 / bf16
probabilities), the head mean in that dtype, the fp32 evolution factor times it, ``torch.topk``. Ours: fp32
attention and head mean, ties to the lower index. The spectral term is fp32 in both (the official ``.float()``).
"""

from __future__ import annotations

import math

import torch

from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, scale_layers, scaled_count, topk_desc
from llava.selection import Selection

#: the official keep counts of 576 after each stage, per RETAIN_TOKEN (clse_model.py 109-115)
SCHEDULE = {192: (330, 210, 62), 128: (220, 140, 41), 64: (110, 70, 20)}
#: the official factors of any other RETAIN_TOKEN (clse_model.py 116)
FACTORS = (1.72, 1.09, 0.32)
#: the official stage layers (K_list, 0-based: the layer whose input is pruned) of a 32-layer LLaMA
LAYERS = (1, 11, 21)
EPS = 1e-6
SCORES = ("clse_attn", "attn", "clse")
#: the official Qwen2-VL stage layers (K_list) of its 28-layer LLM (clse_qwen2vl_model.py 30)
QWEN_LAYERS = (1, 10, 19)
#: the official Qwen2-VL keep shares of the original visual count per RETAIN_RATIO (clse_qwen2vl_model.py 121-129)
QWEN_SCHEDULE = {0.334: (0.57, 0.36, 0.098), 0.223: (0.38, 0.24, 0.066), 0.112: (0.19, 0.12, 0.034)}
#: ... and its factors of any other ratio (clse_qwen2vl_model.py 130)
QWEN_FACTORS = (1.71, 1.08, 0.294)
#: RETAIN_TOKEN -> RETAIN_RATIO: a LLaVA budget names the matching Qwen preset (192 / 128 / 64 of 576)
TOKENS_TO_RATIO = {192: 0.334, 128: 0.223, 64: 0.112}
RULES = ("llava", "qwen2_vl")


def highpass_mask(h: int, w: int, cutoff_ratio: float = 0.1, device=None) -> torch.Tensor:
    """The Gaussian high-pass H (h, w) fp32 of :func:`spectral_score`, laid out as the *unshifted* spectrum
    (``ifftshift`` of the mask around the centre of the shifted one): ``ifftshift(fftshift(F) * H_c) = F *
    ifftshift(H_c)`` element for element (the same products, permuted), so the two spectrum shifts are left out."""
    ch, cw = h // 2, w // 2
    yy = torch.arange(h, device=device).view(h, 1).float()
    xx = torch.arange(w, device=device).view(1, w).float()
    dist2 = (yy - ch) ** 2 + (xx - cw) ** 2
    if cutoff_ratio == 0.0:
        return torch.ones_like(dist2)
    mask = 1 - torch.exp(-dist2 / (2 * (min(ch, cw) * cutoff_ratio) ** 2))
    return torch.fft.ifftshift(mask, dim=(-2, -1))


def spectral_score(x: torch.Tensor, h: int, w: int, cutoff_ratio: float = 0.1,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token high-frequency energy (N,) of ``x`` (N, C) laid out row-major on an h x w grid: the channel mean of
    |IFFT2(H * FFT2(x))| with the Gaussian high-pass H around the centre of the shifted spectrum, in fp32.
    ``mask``: H as :func:`highpass_mask` gives it (computed here when None; a caller scoring several inputs on one
    grid builds it once)."""
    n, c = x.shape
    if n != h * w:
        raise ValueError(f"clse: {n} tokens do not fill a {h} x {w} grid")
    if mask is None:
        mask = highpass_mask(h, w, cutoff_ratio, x.device)
    feat = x.float().t().reshape(c, h, w)
    high = torch.fft.ifft2(torch.fft.fft2(feat) * mask).abs()
    return high.mean(dim=0).reshape(n)


def evolution_factor(s_l: torch.Tensor, s_k: torch.Tensor, temp: float = 0.1, eps: float = EPS) -> torch.Tensor:
    """How much each token's spectral energy changed between the two depths, standardised and squashed:
    sigmoid(((r - mean r) / (std r + eps)) / temp), r = min(|s_k - s_l| / (mean(s_l) + s_l + eps), 1)."""
    r = torch.clamp((s_k - s_l).abs() / (s_l.mean() + s_l + eps), max=1)
    return torch.sigmoid(((r - r.mean()) / (r.std() + eps)) / temp)


def clse_scores(last_row_attn: torch.Tensor, visual: torch.Tensor, z_l: torch.Tensor | None = None,
                z_k: torch.Tensor | None = None, grid: tuple[int, int] | None = None, score: str = "clse_attn",
                numerics: str = "ours", cutoff_ratio: float = 0.1, temp: float = 0.1) -> torch.Tensor:
    """One stage's score per visual token. ``last_row_attn`` (H, S): the last prompt token's attention of layer
    K-1 per head; ``visual`` (N,): the visual tokens among S. Stage 1 also gives ``z_l`` / ``z_k`` (N, C), the
    visual tokens' inputs to decoder layer 0 and to layer K, and their ``grid`` (h, w); without them (stages 2,
    3) the score is the attention alone. ``score``: "clse_attn" (official), "attn" or "clse" (the official
    alternatives)."""
    check_numerics("clse", numerics)
    if score not in SCORES:
        raise ValueError(f"clse: score must be one of {SCORES}, got {score!r}")
    if numerics == "official":
        attn = last_row_attn.mean(dim=0)[visual]  # the official head mean in the attention's dtype
    else:
        attn = last_row_attn.float().mean(dim=0)[visual]
    if z_l is None or score == "attn":
        return attn
    mask = highpass_mask(*grid, cutoff_ratio, z_l.device)  # one mask for both depths
    e = evolution_factor(spectral_score(z_l, *grid, mask=mask), spectral_score(z_k, *grid, mask=mask), temp)
    return e if score == "clse" else e * attn


def stage_counts(budget: int, n_visual: int) -> tuple[int, ...]:
    """Visual tokens kept after each of the three stages for a sample with ``n_visual`` tokens."""
    of_576 = SCHEDULE.get(int(budget)) or tuple(math.floor(int(budget) * f + 1e-9) for f in FACTORS)
    return tuple(min(int(n_visual), scaled_count(n_visual, c)) for c in of_576)


def qwen_stage_counts(retain_ratio: float, n_visual: int) -> tuple[int, ...]:
    """The official Qwen2-VL counts: max(1, int(N * q_s)) of the sample's ``n_visual`` tokens per stage (never more
    than the tokens there are: a stage whose target is not below the current count prunes nothing)."""
    shares = QWEN_SCHEDULE.get(round(float(retain_ratio), 3)) or tuple(float(retain_ratio) * f for f in QWEN_FACTORS)
    n = int(n_visual)
    out, cur = [], n
    for q in shares:
        cur = min(cur, max(1, int(n * q))) if n else 0
        out.append(cur)
    return tuple(out)


@register
class CLSE(Method):
    """CLSE: three in-LLM stages keeping the visual tokens the last prompt token attends to, the first stage
    weighted by how much each token's high-frequency spectral energy changed since the LLM's input.

    ``budget``: the official RETAIN_TOKEN (192 / 128 / 64 select the official schedules; docs/methods/clse.md says
    what they are in equivalent tokens)."""

    name = "clse"
    llm_reads = ("prev",)  # layer K-1's attention of the last prompt token
    position_mode = "keep"
    capturable = "full"
    families = ("llava", "qwen2_vl", "qwen2_5_vl")
    unsupported_reason = ("CLSE's official code runs on LLaVA-1.5 (one square grid per image for its 2-D spectrum; "
                          "it refuses LLaVA-NeXT) and Qwen2-VL (its rule runs here on Qwen2-VL and Qwen2.5-VL); other "
                          "families are not ported")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # the official rule: "auto" (by family), "llava" (LLaVA-1.5: K_list 1, 11, 21 of 32, RETAIN_TOKEN
            # schedules of 576, the square grid, the score layer on eager attention in the reference mode) or
            # "qwen2_vl" (Qwen2-VL: K_list 1, 10, 19 of 28, RETAIN_RATIO shares of the sample's count, the image's
            # merged grid, the attention row beside the layer)
            "rule": "auto",
            # the stage layers (official K_list, the layer whose input is pruned); None: the rule's, stated for its
            # depth (32 LLaVA, 28 Qwen2-VL)
            "layer_list": None,
            # the Qwen rule's RETAIN_RATIO; None: from the budget (192 / 128 / 64 -> 0.334 / 0.223 / 0.112, any
            # other B -> B / 576: ours)
            "retain_ratio": None,
            "score": Option("clse_attn", SCORES,
                            doc="clse_attn: official; attn: attention only; clse: the evolution factor only"),
            # the Gaussian high-pass cutoff ratio and the evolution temperature (official 0.1, 0.1)
            "cutoff_ratio": 0.1,
            "temperature": 0.1,
            # map layer_list from 32 layers onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # the KV caches of the layers before a stage: "kept" (ours: each layer's as it saw the prompt) or
            # "pruned" (official: the dropped rows removed too, so decoding sees the kept tokens alone; eager only)
            "caches": "kept",
            # "ours" (fp32 attention, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.budget is None and self.retain_ratio is None:
            raise ValueError("clse: a budget is required (the official RETAIN_TOKEN: 192, 128 or 64; or the Qwen "
                             "rule's retain_ratio)")
        if self.caches not in ("kept", "pruned"):
            raise ValueError(f"clse: caches must be 'kept' or 'pruned', got {self.caches!r}")
        if self.rule not in ("auto", *RULES):
            raise ValueError(f"clse: rule must be 'auto' or one of {RULES}, got {self.rule!r}")
        if self.retain_ratio is not None and not 0.0 < float(self.retain_ratio) <= 1.0:
            raise ValueError(f"clse: retain_ratio must be in (0, 1], got {self.retain_ratio}")
        if self.layer_list is None:
            return
        self.layer_list = tuple(int(k) for k in self.layer_list)
        if len(self.layer_list) != 3 or list(self.layer_list) != sorted(set(self.layer_list)) or self.layer_list[0] < 1:
            raise ValueError(f"clse: layer_list must be three increasing layers >= 1, got {self.layer_list}")

    @property
    def run_rule(self) -> str:
        """The rule as run (``rule`` resolved on the attached family)."""
        if self.rule != "auto":
            return self.rule
        return "qwen2_vl" if self.family in ("qwen2_vl", "qwen2_5_vl") else "llava"

    @property
    def llm_vision_signals(self) -> bool:
        """The Qwen rule's first stage reads the image's merged grid (``LLMSignals.vision.unit_grid``)."""
        return self.run_rule == "qwen2_vl" and self.score != "attn"

    def capture_refusal(self) -> str | None:
        if self.llm_vision_signals:
            return ("clse: the Qwen2-VL rule's first stage reads the image's merged grid (LLMSignals.vision), which the "
                    "eager engine builds; score='attn' captures")
        return super().capture_refusal()

    @property
    def ratio(self) -> float:
        """The Qwen rule's RETAIN_RATIO as run."""
        if self.retain_ratio is not None:
            return float(self.retain_ratio)
        return TOKENS_TO_RATIO.get(int(self.budget), int(self.budget) / 576)

    @property
    def eager_layers(self) -> tuple[int, ...]:
        """The reference mode runs each score layer K-1 on eager attention, as the official LLaVA code (its
        ``output_attentions=True`` there takes the eager path): its fp16 hidden states are the eager ones. The
        official Qwen2-VL code computes the row beside the layer, which runs on its own attention."""
        return tuple(k - 1 for k in self.llm_layers) if self.numerics == "official" and self.run_rule == "llava" \
            else ()

    @property
    def prune_past_cache(self) -> bool:
        return self.caches == "pruned"

    @property
    def llm_layers(self):
        qwen = self.run_rule == "qwen2_vl"
        layers = self.layer_list if self.layer_list is not None else (QWEN_LAYERS if qwen else LAYERS)
        n = self.num_layers
        return scale_layers(list(layers), n, reference=28 if qwen else 32) if self.scale_layers else tuple(layers)

    def stage_counts(self, n_visual: int) -> tuple[int, ...]:
        if self.run_rule == "qwen2_vl":
            return qwen_stage_counts(self.ratio, n_visual)
        if self.budget is None:
            raise ValueError("clse: the LLaVA rule needs a budget (the official RETAIN_TOKEN); retain_ratio is the "
                             "Qwen2-VL rule's")
        return stage_counts(self.budget, n_visual)

    def layer_counts(self, n_visual: int) -> list[int]:
        """Visual tokens entering every decoder layer."""
        L = self.num_layers
        out, cur, stages = [], int(n_visual), dict(zip(self.llm_layers, self.stage_counts(n_visual)))
        for i in range(L):
            cur = min(cur, stages.get(i, cur))
            out.append(cur)
        return out

    def select_llm(self, stage, sig):
        k = self.stage_counts(sig.num_visual_entry)[stage]
        dev = sig.visual.device
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=dev))
        if k == 0:
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=dev))
        qwen = self.run_rule == "qwen2_vl"
        logits = "fp32" if self.numerics != "official" else "model_scaling" if qwen else "model"
        row = sig.attention("last", layer="prev", logits=logits)[:, 0]
        z = {}
        if stage == 0 and self.score != "attn":
            n = sig.num_visual
            if qwen:  # the first image's merged grid; attention alone where the tokens are not that one grid
                grids = getattr(sig.vision, "unit_grid", None) if sig.vision is not None else None
                grid = tuple(int(g) for g in grids[0]) if grids else None
                if grid is not None and grid[0] * grid[1] == n:
                    z = dict(z_l=sig.visual_embeds, z_k=sig.hidden[sig.visual], grid=grid)
            else:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"clse: {n} visual tokens are not one square grid (one LLaVA-1.5 image per "
                                     "prompt)")
                z = dict(z_l=sig.visual_embeds, z_k=sig.hidden[sig.visual], grid=(side, side))
        s = clse_scores(row, sig.visual, score=self.score, numerics=self.numerics, cutoff_ratio=self.cutoff_ratio,
                        temp=self.temperature, **z)
        idx = s.topk(k).indices if self.numerics == "official" else topk_desc(s, k)
        return Selection(keep=idx.sort().values)
