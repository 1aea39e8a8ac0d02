"""CDPruner (NeurIPS 2025, arXiv 2506.10967, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"): keep the visual tokens that maximise *conditional* diversity,
the MAP of a determinantal point process whose kernel is the token similarity weighted by relevance
to the instruction. Pre-LLM, per image (LLaVA-1.5) / crop (LLaVA-NeXT, OneVision) / frame (video).

Doc: docs/methods/cdpruner.md. Official code: Theia-4869/CDPruner (commit 9541616),
``llava/model/llava_arch.py`` ``encode_images`` (similarity, relevance, kernel, greedy MAP) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``load_text_tower``, ``forward``: CLIP text tower on
the question in 77-token segments, ``post_layernorm`` + ``visual_projection`` on the select-layer patch
features). Our own implementation from the spec and the official code's algorithm.

Algorithm, per unit of N candidate tokens, budget T (``budget``):

1. S = Xn Xn^T, Xn = the projected tokens (LLM input) L2-normalised, fp32.
2. Relevance c_j (option ``relevance``):
   ``"clip"`` (official): c_j = mean_m <E_j, T_m> with E = visual_projection(post_layernorm(V)) of the
   select-layer features V and T_m the CLIP text embeddings of the question's 77-token segments (both
   L2-normalised); needs a CLIP checkpoint with the text tower (``clip_model``) and the LLM tokenizer
   (``llm_tokenizer``) to turn ``sig.question_ids`` into the question string.
   ``"llm"`` (default; OUR DEVIATION, LLaVA checkpoints ship no CLIP text tower / visual projection):
   c_j = mean over the question tokens q of cos(X_j, e_q), e_q the question's LLM input embeddings.
3. r = -c (official sign, ``relevance_sign="neg"``; ``"pos"`` uses +c); r <- (r - min r + 1e-6) /
   (max r - min r), min / max over all candidates of the image (NeXT / OneVision: all crops of the image;
   ``minmax_scope``). Optional ``theta``: r <- exp(theta / (2 (1 - theta)) r) (only a comment in the
   official code; not in the released path).
4. L_ij = r_i S_ij r_j.
5. Greedy DPP MAP by incremental Cholesky (Chen et al. 2018): T steps of j = argmax d2 (first index on
   ties), e = (L_j - C_j^T C) / sqrt(d2_j), d2 -= e^2, d2_j = -inf. Keep the picks in ascending order.

Our design: newline tokens (NeXT / OneVision) are kept as layout, outside the budget (as FasterVLM /
Random); Video-LLaVA's per-frame [CLS] token is an ordinary candidate (``cls_token``); a unit with at most
T candidates is kept whole. No host synchronisation per greedy step (picks stay on the device).

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics of
``encode_images`` - the projected tokens cast to float16 (the official projector output: the model is
loaded in fp16), normalised in fp16 without a norm floor, then the fp32 similarity; the CLIP relevance in
fp32 (the official tower, its ``visual_projection`` and the text tower are fp32 under ``device_map='auto'``)
without a norm floor; the min-max without the constant-relevance guard; the greedy MAP as the official fp32
loop (cis laid out (T, B, N), ``argmax`` over every item, ``sqrt`` of the pivot unclamped, no picked-item
mask: once the values stop being finite it may re-pick, and a re-picked token is kept once, as the
official index mask). ``relevance="llm"`` (ours) reads the fp16-cast features and question embeddings.
``reference_dtype="model"`` (default; ``"float16"``: always fp16): the reference mode's casts in the features' own
dtype (our LLM's), as the official code computes in its projector's dtype, the dtype its model was loaded in
(fp32 where it is loaded in fp32: the parity harness's fp32 rows; fp16 under its builder, where both agree).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llava.clip_route import ClipTextRoute
from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, unit_layout
from llava.selection import Selection

RELEVANCE_MODES = ("llm", "clip")
SIGNS = ("neg", "pos")
REFERENCE_DTYPES = ("float16", "model")
MINMAX_SCOPES = ("image", "unit", "sample")
CLS_TOKEN_MODES = ("candidate", "keep", "drop")
#: families whose vision tower is a CLIP ViT (the ``clip`` relevance applies post_layernorm +
#: visual_projection of a CLIP checkpoint to the tower's select-layer features)
CLIP_FAMILIES = ("llava", "llava_next", "video_llava")
CLIP_TEXT_LEN = 77  # fallback when the CLIP config has no max_position_embeddings
#: dtype of the official projected tokens (and LLM text embeddings): LLaVA loads the model in float16
OFFICIAL_DTYPE = torch.float16


# ------------------------------------------------------------------------------------ pure functions


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def relevance_llm(features: torch.Tensor, text_embeds: torch.Tensor, question_mask: torch.Tensor,
                  normed: torch.Tensor | None = None) -> torch.Tensor:
    """Our ``llm`` relevance: c_j = mean over question tokens q of cos(features_j, text_embeds_q) (fp32).
    features (T, D), text_embeds (Tt, D), question_mask (Tt,) bool. No host sync (masked mean). ``normed``: the
    features already normalised as here (``_normalize(features.float())``, shared with the kernel)."""
    cos = (_normalize(features.float()) if normed is None else normed) @ _normalize(text_embeds.float()).T  # (T, Tt)
    w = question_mask.to(device=cos.device, dtype=cos.dtype)
    return (cos * w).sum(-1) / w.sum().clamp(min=1)


def relevance_clip(image_embeds: torch.Tensor, text_embeds: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """Official relevance before the sign: mean over text segments of cos(E_j, T_m).
    image_embeds (T, C), text_embeds (M, C) -> (T,) fp32. ``numerics="official"``: rows divided by their
    norms without the 1e-12 floor (the official division)."""
    check_numerics("cdpruner", numerics)
    if numerics == "official":
        e, t = image_embeds.float(), text_embeds.float()
        return ((e / e.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).T).mean(-1)
    return (_normalize(image_embeds.float()) @ _normalize(text_embeds.float()).T).mean(-1)


def normalize_relevance(c: torch.Tensor, sign: str = "neg", theta: float | None = None,
                        guard: bool = True) -> torch.Tensor:
    """r = sign * c, then global min-max with +1e-6 in the numerator only (official), then the optional
    theta weighting exp(theta / (2 (1 - theta)) r). Guard (ours; ``guard=False``: the official division):
    constant r (max = min, where the official code divides by zero) gives r = 1 everywhere (pure diversity)."""
    if sign not in SIGNS:
        raise ValueError(f"cdpruner: relevance_sign must be one of {SIGNS}, got {sign!r}")
    r = (-c if sign == "neg" else c).float()
    if r.numel() == 0:
        return r
    lo, hi = r.min(), r.max()
    rng = hi - lo
    out = (r - lo + 1e-6) / rng
    if guard:
        out = torch.where(rng > 0, out, torch.ones_like(out))
    if theta is not None:
        out = torch.exp(float(theta) / (2 * (1 - float(theta))) * out)
    return out


def cdpruner_kernel(features: torch.Tensor, relevance: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """L = r_i S_ij r_j with S the cosine similarity of ``features`` (..., N, D); relevance (..., N).
    fp32; ``reference``: normalise in the features' own dtype before the fp32 cast (the official fp16
    order of operations)."""
    if reference:
        xn = (features / features.norm(dim=-1, keepdim=True)).float()
    else:
        xn = _normalize(features.float())
    return kernel_of_normed(xn, relevance)


def kernel_of_normed(xn: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """:func:`cdpruner_kernel` from features already L2-normalised in fp32, ``xn`` (..., N, D)."""
    s = xn @ xn.transpose(-1, -2)
    r = relevance.float()
    return r.unsqueeze(-1) * s * r.unsqueeze(-2)


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy DPP MAP (Chen et al. 2018, incremental Cholesky) of ``k`` items; kernel (N, N) or a batch
    (B, N, N) of equal-size kernels. Returns the picks in pick order, (k,) or (B, k), on the kernel's
    device; no host sync per step. Ties: first index (``argmax``).

    Guards (ours; identical to the official loop whenever its values stay finite): picked items are
    excluded by a mask (not only by d2 = -inf), NaN / -inf gains rank below every finite one, and a
    non-positive pivot d2_j is clamped to the smallest normal number (the official loop takes sqrt of it
    and propagates NaN once T approaches the kernel's rank)."""
    squeeze = kernel.dim() == 2
    L = kernel[None] if squeeze else kernel
    B, N, _ = L.shape
    k = max(0, min(int(k), N))
    if not k:
        # tensors made from L (new_*): on L's device, and host tensors when L is a host copy
        picks = L.new_empty((B, 0), dtype=torch.long)
        return picks[0] if squeeze else picks
    fi = torch.finfo(L.dtype)
    C = L.new_zeros((B, k, N))
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()
    taken = L.new_zeros((B, N), dtype=torch.bool)
    ar = torch.arange(B, device=L.device)
    yes = L.new_ones((), dtype=torch.bool)  # a tensor: a Python scalar would be copied from the host at every write
    picks = []
    # 14 ops a step: the picks stacked once at the end; e divided straight into its row of C; d2 updated in place;
    # no -inf written into a picked item's d2 (the taken mask alone keeps it out of every later argmax, and a picked
    # item's d2 is never read again), so the same values and picks as writing it
    for t in range(k):
        score = torch.nan_to_num(d2, nan=fi.min, neginf=fi.min).masked_fill(taken, float("-inf"))
        j = score.argmax(-1)  # (B,), first maximum
        picks.append(j)
        row = L[ar, j]  # (B, N)
        if t:
            row = row - torch.einsum("bt,btn->bn", C[ar, :t, j], C[:, :t])
        e = torch.div(row, torch.sqrt(d2[ar, j].clamp(min=fi.tiny)).unsqueeze(-1), out=C[:, t])
        d2.sub_(e * e)
        taken[ar, j] = yes
    picks = torch.stack(picks, 1)
    return picks[0] if squeeze else picks


def dpp_greedy_device(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`dpp_greedy` for a prefill captured whole (CUDA graph / ``torch.compile(fullgraph=True)``): the
    same loop on the kernel's device, unrolled ``k`` times with static shapes, with no host read and no
    host <-> device copy. kernel (N, N) or (B, N, N); returns the picks in pick order, (k,) or (B, k).

    The same fp32 ops in the same order as :func:`dpp_greedy` (the guards included: picked items masked,
    NaN / -inf gains below every finite one, the pivot clamped at the smallest normal number), with the
    Cholesky rows in the same (B, k, N) buffer contracted by the same ``einsum``, so the same picks bit for
    bit, ties to the first index (``argmax``); only the bookkeeping differs (one-hot masks and gathers
    instead of indexed writes). On another device than the host loop's, the ``einsum`` is that device's
    matrix product: its last bits (and so a pick at a near tie) may differ there, as any fp32 GEMM does."""
    squeeze = kernel.dim() == 2
    L = kernel[None] if squeeze else kernel
    B, N, _ = L.shape
    k = max(0, min(int(k), N))
    dev = L.device
    if k == 0:
        picks = torch.zeros((B, 0), dtype=torch.long, device=dev)
        return picks[0] if squeeze else picks
    fi = torch.finfo(L.dtype)
    items = torch.arange(N, device=dev)
    C = L.new_zeros((B, k, N))
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()
    taken = torch.zeros((B, N), dtype=torch.bool, device=dev)
    picks = []
    for t in range(k):
        score = torch.nan_to_num(d2, nan=fi.min, neginf=fi.min).masked_fill(taken, float("-inf"))
        j = score.argmax(-1)  # (B,), first maximum
        picks.append(j)
        row = L.gather(1, j[:, None, None].expand(B, 1, N))[:, 0]  # (B, N) = L[ar, j]
        if t:  # C[ar, :t, j], (B, t)
            cj = C[:, :t].gather(2, j[:, None, None].expand(B, t, 1))[..., 0]
            row = row - torch.einsum("bt,btn->bn", cj, C[:, :t])
        e = row / torch.sqrt(d2.gather(1, j[:, None]).clamp(min=fi.tiny))
        C[:, t] = e
        d2 = d2 - e * e
        hit = items[None] == j[:, None]  # (B, N) one-hot of the pick
        taken = taken | hit
        d2 = d2.masked_fill(hit, float("-inf"))
    out = torch.stack(picks, 1)
    return out[0] if squeeze else out


def dpp_greedy_official(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Reference mode of :func:`dpp_greedy`: the official loop's numerics, without our guards. kernel
    (B, N, N) (or (N, N)); the Cholesky rows are held as (k, B, N) and contracted with
    ``einsum('tb,tbn->bn')`` (the official layout, also at step 0 where it contracts nothing), the pivot
    gain is ``sqrt``-ed unclamped, every item competes in ``argmax`` (a picked one only through its -inf
    gain; NaN wins ``argmax``). Returns the picks (B, k) / (k,) in pick order; they may repeat once the
    gains stop being finite (the official loop does the same)."""
    squeeze = kernel.dim() == 2
    L = kernel[None] if squeeze else kernel
    B, N, _ = L.shape
    k = max(0, min(int(k), N))
    dev = L.device
    picks = torch.empty(k, B, dtype=torch.long, device=dev)
    rows = torch.zeros(k, B, N, dtype=L.dtype, device=dev)
    gain = torch.diagonal(L, dim1=1, dim2=2).clone()
    ar = torch.arange(B, device=dev)
    ninf = torch.full((), float("-inf"), dtype=L.dtype, device=dev)  # a tensor: not a host scalar's copy per write
    for t in range(k):
        j = torch.argmax(gain, dim=-1)
        picks[t] = j
        proj = torch.einsum("tb,tbn->bn", rows[:t, ar, j], rows[:t])
        e = (L[ar, j] - proj) / torch.sqrt(gain[ar, j]).unsqueeze(-1)
        rows[t] = e
        gain = gain - torch.square(e)
        gain[ar, j] = ninf
    picks = picks.t()
    return picks[0] if squeeze else picks


def _groups(num_units: int, unit_pos: list | None, scope: str) -> list[list[int]]:
    """Units sharing one relevance min-max: ``image`` = a new image starts at every unit without a grid
    position (LLaVA-1.5 image, NeXT / OneVision base crop, frame, Qwen image); ``unit``; ``sample``."""
    if scope == "sample":
        return [list(range(num_units))] if num_units else []
    if scope == "unit" or unit_pos is None:
        return [[u] for u in range(num_units)]
    groups: list[list[int]] = []
    for u in range(num_units):
        if not groups or unit_pos[u][0] < 0:
            groups.append([])
        groups[-1].append(u)
    return groups


def cdpruner(features: torch.Tensor, relevance: torch.Tensor | Callable[[], torch.Tensor], unit: torch.Tensor,
             budget: int, *, patch: torch.Tensor | None = None, unit_pos: torch.Tensor | None = None,
             relevance_sign: str = "neg", theta: float | None = None, minmax_scope: str = "image",
             cls_token: str = "candidate", keep_newlines: bool = True, reference: bool = False,
             numerics: str = "ours", layout=None, device_loop: bool = False,
             official_dtype: torch.dtype | None = OFFICIAL_DTYPE,
             normed: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Indices (ascending) of the tokens CDPruner keeps for one sample: per unit the greedy DPP MAP of
    ``budget`` candidates (the whole unit if it has at most ``budget``).
    ``numerics="official"`` (reference mode): features cast to float16 and normalised there, min-max
    without the guard, :func:`dpp_greedy_official` (a re-picked token is kept once: a unit may keep fewer);
    ``official_dtype``: the dtype of that cast (None: the features' own, the official projector output's dtype when
    our model is loaded in the official model's dtype).

    features: (T, D) projected tokens; relevance: (T,) raw relevance c (before sign / min-max), or a
    callable computing it (only called when some unit is pruned); unit (T,) (-1 = newline); patch (T,)
    (-1 = [CLS] token); unit_pos (U, 2) grid position per unit ((-1, -1) = a new image starts).
    ``layout``: the :func:`unit_layout` of (unit, patch, unit_pos) when the caller has it (a planned one:
    no host read). ``device_loop``: the greedy steps run on the device (:func:`dpp_greedy_device`, a prefill
    captured whole: no host read at all) instead of on one host copy of the kernels; the same picks.
    ``normed``: ``_normalize(features.float())`` (T, D), or a callable giving it, when the caller has it (the ``llm``
    relevance normalises the same rows): the kernels read its rows instead of normalising the candidates again
    (the same values: each row's norm is the same reduction over the same D entries). Not used with ``reference``
    or the reference mode (they normalise in the features' own dtype).
    """
    check_numerics("cdpruner", numerics)
    official = numerics == "official"
    if minmax_scope not in MINMAX_SCOPES:
        raise ValueError(f"cdpruner: minmax_scope must be one of {MINMAX_SCOPES}, got {minmax_scope!r}")
    if cls_token not in CLS_TOKEN_MODES:
        raise ValueError(f"cdpruner: cls_token must be one of {CLS_TOKEN_MODES}, got {cls_token!r}")
    # the one host sync (none when planned)
    lay = layout if layout is not None else unit_layout(unit, patch, unit_pos=unit_pos)
    dev = unit.device
    kept: list[torch.Tensor] = [lay.newlines] if keep_newlines else []
    # per unit: (forced tokens, candidates, picks)
    plan = []
    for u in range(lay.num_units):
        if cls_token == "candidate" or patch is None:
            forced, cand = lay.tokens[u][:0], lay.tokens[u]
        elif cls_token == "keep":
            forced, cand = lay.cls[u], lay.patches[u]
        else:
            forced, cand = lay.cls[u][:0], lay.patches[u]
        k = max(0, budget - int(forced.numel()))
        plan.append((forced, cand, k))
    if all(k >= cand.numel() for _, cand, k in plan):
        # nothing to prune (e.g. budget >= tokens): no scores needed
        for forced, cand, _ in plan:
            kept += [forced, cand]
        return torch.cat(kept).sort().values if kept else unit.new_zeros(0)
    c = relevance() if callable(relevance) else relevance
    c = c.to(dev).float().reshape(-1)
    r = torch.zeros(unit.numel(), dtype=torch.float32, device=dev)
    for g in _groups(lay.num_units, lay.unit_pos, minmax_scope):
        idx = torch.cat([plan[u][1] for u in g])
        if idx.numel():
            r[idx] = normalize_relevance(c[idx], relevance_sign, theta, guard=not official)
    # units to prune, batched by candidate count (one kernel batch per size)
    by_size: dict[int, list[int]] = {}
    for u, (forced, cand, k) in enumerate(plan):
        kept.append(forced)
        if k >= cand.numel():
            kept.append(cand)
        else:
            by_size.setdefault((int(cand.numel()), k), []).append(u)
    groups = []  # (candidates (B, N), kernels (B, N, N), k): one batch of kernels per candidate count
    for (n, k), units in by_size.items():
        cand = torch.stack([plan[u][1] for u in units])  # (B, N)
        if official:  # the official fp16 projector output, normalised in fp16
            f = features[cand]
            L = cdpruner_kernel(f if official_dtype is None else f.to(official_dtype), r[cand], reference=True)
        elif normed is None or reference:
            L = cdpruner_kernel(features[cand], r[cand], reference=reference)
        else:
            normed = normed() if callable(normed) else normed
            L = kernel_of_normed(normed[cand], r[cand])
        groups.append((cand, L, k))
    if official:  # the official loop, on the device
        kept += [cand.gather(1, dpp_greedy_official(L, k)).reshape(-1) for cand, L, k in groups]
    elif device_loop:  # inside a captured prefill: the loop on the device, unrolled (no host read)
        kept += [cand.gather(1, dpp_greedy_device(L, k)).reshape(-1) for cand, L, k in groups]
    elif groups:
        # the k sequential steps run on the host: on a GPU each step is ~15 tiny kernels, launch-bound
        # (~19 ms per 7B prefill at 64 tokens on an H100). One copy of every kernel of the sample to the
        # host, the loop there (same code, same fp32 ops), the picks back.
        host = torch.cat([L.reshape(-1) for _, L, _ in groups]).cpu()
        at = 0
        for cand, L, k in groups:
            hl = host[at:at + L.numel()].view(L.shape)
            at += L.numel()
            kept.append(cand.gather(1, dpp_greedy(hl, k).to(dev)).reshape(-1))
    if official:  # a re-picked token (official index mask) is kept once; sorted
        return torch.unique(torch.cat(kept))
    return torch.cat(kept).sort().values if kept else unit.new_zeros(0)


def clip_text_embeds(clip: Any, tokenizer: Any, text: str, device: torch.device) -> torch.Tensor:
    """The official text side: tokenise ``text`` with the CLIP tokenizer (BOS / EOS, no truncation),
    zero-pad input ids and attention mask to a multiple of 77, cut into M segments of 77, run the text
    tower on each, project: (M, C) fp32 ``text_embeds`` (pooled as the installed transformers' CLIP does)."""
    seg = int(getattr(clip.config.text_config, "max_position_embeddings", CLIP_TEXT_LEN) or CLIP_TEXT_LEN)
    enc = tokenizer(text=[text], return_tensors="pt")
    ids, mask = enc["input_ids"], enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
    m = (ids.shape[1] - 1) // seg + 1
    pad = m * seg - ids.shape[1]
    ids = torch.cat([ids, ids.new_zeros((1, pad))], 1).reshape(-1, seg).to(device)
    mask = torch.cat([mask, mask.new_zeros((1, pad))], 1).reshape(-1, seg).to(device)
    out = clip.text_model(input_ids=ids, attention_mask=mask)
    return clip.text_projection(out.pooler_output).float()


def clip_image_embeds(clip: Any, vision_features: torch.Tensor) -> torch.Tensor:
    """The official image side: visual_projection(post_layernorm(V)) of the select-layer features, fp32
    (post_layernorm in the CLIP model's dtype, the projection on fp32 inputs, as the official code)."""
    vm = clip.vision_model
    dt = vm.post_layernorm.weight.dtype
    h = vm.post_layernorm(vision_features.to(dt))
    proj = clip.visual_projection
    return proj(h.to(proj.weight.dtype) if proj.weight.dtype != torch.float32 else h.float()).float()


# ------------------------------------------------------------------------------------ the method


@register
class CDPruner(Method):
    """CDPruner: per image / crop / frame, the ``budget`` tokens maximising conditional diversity (greedy
    DPP MAP on L = r S r, S the cosine similarity of the projected tokens, r the min-max relevance to the
    question); ``relevance="llm"`` (default, our deviation) or ``"clip"`` (official, needs ``clip_model``
    and ``llm_tokenizer``)."""

    name = "cdpruner"
    #: relevance "llm" (default): the question rows of the padded text block (masked mean) and the greedy DPP
    #: on the device (:func:`dpp_greedy_device`); relevance "clip" is refused (:meth:`capture_refusal`)
    capturable = "full"
    vision_stage = True
    query_aware = True

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "relevance": Option("llm", RELEVANCE_MODES,
                                doc="llm (ours: question LLM embeddings), clip (official: CLIP text tower + "
                                    "visual_projection)"),
            "relevance_sign": Option("neg", SIGNS, doc="neg (official: r = -cosine)"),
            # None (official released path) or the commented exp(theta / (2 (1 - theta)) r) weighting
            "theta": None,
            "minmax_scope": Option("image", MINMAX_SCOPES,
                                   doc="the relevance min-max's scope (official: image, all crops of a NeXT image)"),
            # clip route: CLIP checkpoint (hub id / local path, or a loaded CLIPModel) with the text tower
            "clip_model": None,
            # clip route: the CLIP tokenizer (path / object); None = from clip_model
            "clip_tokenizer": None,
            # clip route: the LLM tokenizer (hub id / path / object with .decode / callable ids -> str)
            "llm_tokenizer": None,
            "cls_token": Option("candidate", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS]: candidate (ours), keep ([CLS] + T-1), drop (T patches)"),
            # NeXT / OneVision newline tokens: keep as layout (not counted) or drop
            "keep_newlines": True,
            # normalise the projected tokens in their own dtype before the fp32 cast (official order)
            "reference": False,
            # "ours" (fp32, guards) or "official" (reference mode: fp16 projected tokens, the official
            # greedy loop without guards; docs/methods/cdpruner.md)
            "numerics": NUMERICS_OPTION,
            "reference_dtype": Option("model", REFERENCE_DTYPES,
                                      doc="reference mode: the projected tokens' dtype of the official numerics: "
                                          "model (our features' own dtype: the official model loaded in our LLM's "
                                          "dtype, fp16 under its builder) or float16 (always)"),
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("cdpruner: a budget T (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        if self.theta is not None and not (0 <= float(self.theta) < 1):
            raise ValueError(f"cdpruner: theta must be in [0, 1), got {self.theta!r}")
        if self.relevance == "clip" and (self.clip_model is None or self.llm_tokenizer is None):
            raise ValueError("cdpruner: relevance='clip' needs clip_model (a CLIP checkpoint with its text tower, "
                             "e.g. openai/clip-vit-large-patch14-336) and llm_tokenizer (to decode the question)")
        self._clip_route = ClipTextRoute("cdpruner", self.clip_model, self.clip_tokenizer, self.llm_tokenizer)

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        if self.relevance == "clip" and family not in CLIP_FAMILIES:
            raise ValueError(f"cdpruner: relevance='clip' needs a CLIP vision tower ({', '.join(CLIP_FAMILIES)}); "
                             f"{family} has none: use relevance='llm'")

    # -- clip route ---------------------------------------------------------------------------
    def _load_clip(self, device):
        return self._clip_route.load(device)

    def question_text(self, ids: torch.Tensor) -> str:
        return self._clip_route.question_text(ids)

    def _clip_relevance(self, sig) -> torch.Tensor:
        dev = sig.features.device
        clip = self._load_clip(dev)
        dv = sig.vision_features.shape[-1]
        if clip.vision_model.post_layernorm.weight.shape[0] != dv:
            raise ValueError(f"cdpruner: the CLIP model's vision width {clip.vision_model.post_layernorm.weight.shape[0]} "
                             f"!= the tower's select-layer width {dv}")
        if sig.question_ids is None:
            raise ValueError("cdpruner: relevance='clip' needs sig.question_ids")
        with torch.no_grad():
            text = clip_text_embeds(clip, self._clip_route.tokenizer, self.question_text(sig.question_ids), dev)
            image = clip_image_embeds(clip, sig.vision_features)
        return relevance_clip(image, text, self.numerics)

    # -- stage --------------------------------------------------------------------------------
    def relevance_of(self, sig, normed: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """The raw relevance c (T,) of every visual token of the sample (before sign and min-max). ``normed``: a
        callable giving the normalised features (shared with the kernels; the ``llm`` relevance, default numerics)."""
        if self.relevance == "clip":
            return self._clip_relevance(sig)
        # the question rows (masked: the fast path pads the text block, and a boolean index would sync)
        text, question = sig.text_rows("question")
        if self.numerics == "official":  # the fp16 signals of the official model (our relevance route)
            dt = self._official_dtype() or sig.features.dtype
            return relevance_llm(sig.features.to(dt), text.to(dt), question)
        return relevance_llm(sig.features, text, question, normed=normed() if normed is not None else None)

    def capture_refusal(self):
        if self.relevance == "clip":
            return ("cdpruner: relevance='clip' runs on the eager engine: it decodes the question's token ids to a "
                    "string and tokenises it for a CLIP text tower (host text work between the tower and the "
                    "selection); relevance='llm' (default) is captured")
        return super().capture_refusal()

    def select_vision(self, sig):
        normed = None
        if self.relevance == "llm" and self.numerics == "ours" and not self.reference:
            memo = []  # the normalised features, computed once (only when some unit is pruned) for both readers

            def normed():
                if not memo:
                    memo.append(_normalize(sig.features.float()))
                return memo[0]
        keep = cdpruner(sig.features, lambda: self.relevance_of(sig, normed), sig.unit, self.budget, patch=sig.patch,
                        unit_pos=sig.unit_pos, relevance_sign=self.relevance_sign, theta=self.theta,
                        minmax_scope=self.minmax_scope, cls_token=self.cls_token,
                        keep_newlines=self.keep_newlines, reference=self.reference, numerics=self.numerics,
                        layout=sig.unit_layout(patch=True, pos=True), device_loop=sig.captured,
                        official_dtype=self._official_dtype(), normed=normed)
        return Selection(keep=keep)

    def _official_dtype(self):
        """The reference mode's cast: fp16, or None (the features' own dtype) for ``reference_dtype="model"``."""
        return OFFICIAL_DTYPE if self.reference_dtype == "float16" else None
