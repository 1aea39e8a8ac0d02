"""ApET (CVPR 2026 highlight, arXiv 2602.19870, "ApET: Approximation-Error Guided Token Compression for
Efficient VLMs"): attention-free selection of visual tokens by the error of their linear reconstruction from a
few basis tokens, then a merge of the dropped tokens into the kept ones; before the LLM and again at the
middle decoder layer.

Official code: MaQianKun0/ApET at 70cc01b (docs/methods/apet.md): ``llava/model/llava_arch.py``
(``encode_images``, ``token_merging``), ``llava/model/utils.py`` (``fps``), ``llava/model/modeling_llama_x.py``
(``layer_prune``, ``token_merging``), ``llava/eval/model_vqa_loader.py`` + ``scripts/`` (hyper-parameters),
``video-llava/videollava/model/llava_arch.py`` (``encode_videos``).

Algorithm, per unit (LLaVA-1.5 image / LLaVA-NeXT crop / Video-LLaVA frame / Qwen image) of N tokens x_i,
T tokens out, k basis tokens (official ``basis_token_num`` 10):

1. basis  S = FPS(x, k): farthest-point sampling from a random start (squared Euclidean distance);
2. fit    G = S S^T + 1e-5 I;  C = G^-1 S X^T;  x^_i = C_i^T S       (least squares, fp32)
3. error  e_i = ||x_i - x^_i||;  E = the T tokens of largest error, in descending order;
4. merge  targets = E[:T-k]; every dropped token joins its most similar target (cosine, argmax), and a
          target becomes mean(itself, its joiners);
5. output the T - k merged targets and the k basis tokens (official image code: each basis token in the place
          of one of E[T-k:], the k lowest-error kept tokens, which are dropped without merging).

Stage 1 runs before the LLM on the select-layer features (official LLaVA; ``space``), per unit (a Video-LLaVA
frame's [CLS] kept aside, ``cls_token``); stage 2 runs before decoder layer K (official 16 of 32) on the hidden
states of each unit's current tokens (all alike), positions re-indexed. Numerics (``ours``): FPS, the solve,
the errors and the cosine in fp32; the merge is the engine's (fp32, then the model dtype).

Budget: ``budget`` = equivalent visual tokens per unit (the layer average, as VScan, whose code ApET adapts):
stage 2 = B // 2, stage 1 = 2B - B // 2 (64 -> 96 / 32, 128 -> 192 / 64, 192 -> 288 / 96: the official
scripts); with ``llm_stage=False`` ``budget`` = tokens per unit entering the LLM. A unit with at most T
tokens is kept whole (budget >= tokens: the identity, bit-identical to the stock model).

Options (docs/methods/apet.md; defaults and origins in ``option_defaults``): ``stage1`` / ``stage2``,
``llm_stage``, ``layer`` / ``scale_layers``, ``basis``, ``ridge``, ``seed_slots`` (``replace``: official image
code; ``append``: official Video-LLaVA code; ``own``: ours), ``space`` (stage 1 features: ``vision`` /
``projected``), ``merge_seeds`` (official: the basis tokens are merged into the targets too, besides being
outputs), ``cls_token`` (Video-LLaVA frame [CLS]), ``keep_newlines``, ``seed`` (the FPS start draw) and
``numerics``: ``ours`` (fp32 throughout, the basis tokens ranked last, ties to the lower index) or
``official`` (reference mode: FPS on fp16 features with the official 1e10 / ``max`` loop, ``torch.topk`` of all
errors, the stage-1 cosine and merge in fp16 with the basis tokens merged too, the stage-2 cosine in fp32 of
the fp16 hidden states).

Everything is batched over the units of equal size and budget; every size is a host int (the unit layout), the
FPS loop is k device steps, the solve is ``torch.linalg.solve_ex`` (no error check, no host read): capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava.families import registry
from llava.method import BudgetError, Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, scale_layers
from llava.options import Option
from llava.selection import Selection

OFFICIAL_BASIS = 10  # --basis_token_num (README, every script)
OFFICIAL_RIDGE = 1e-5  # G.diagonal().add_(1e-5) (LLaVA, Video-LLaVA; the Qwen LLM stage uses 1e-1)
OFFICIAL_STAGE1 = 96  # --visual_token_num of the README example (64 equivalent)
OFFICIAL_STAGE2 = 32  # --image_token_list '[32]'
OFFICIAL_LAYER = 16  # --layer_list '[16]' of 32 decoder layers
REFERENCE_DEPTH = 32
#: official dtype of the stage-1 features (the tower output ``.to(images.dtype)``, the projector output) and of
#: the LLM's hidden states (the fp16 LLM)
OFFICIAL_DTYPE = torch.float16
OFFICIAL_FAR = 1e10  # fps: the initial distance
SEED_SLOTS = ("replace", "append", "own")
SPACES = ("vision", "projected")
CLS_TOKEN_MODES = ("keep", "candidate")
#: families whose official code scores and merges the projected tokens (Video-LLaVA ``encode_videos``, the Qwen
#: code's merger output); the others follow the LLaVA image code (select-layer features)
PROJECTED_FAMILIES = registry.where(video_model=True) | registry.where(qwen_grid=True)
#: the video models (Video-LLaVA: its official ``encode_videos`` appends the seeds' slots)
VIDEO_MODELS = registry.where(video_model=True)
COSINE_CHUNK = 64  # rows of the official cosine evaluated at a time (same values, bounded memory)


def split_budget(budget: int) -> tuple[int, int]:
    """(stage 1, stage 2) tokens per unit for ``budget`` equivalent tokens (the layer average with the stage at
    half depth): stage 2 = B // 2, stage 1 = 2B - stage 2. 64 -> 96 / 32, 192 -> 288 / 96 (official scripts)."""
    s2 = int(budget) // 2
    return 2 * int(budget) - s2, s2


def basis_count(basis: int, out: int) -> int:
    """Basis tokens of a unit with ``out`` tokens out: the official k, at most out - 1 (our rule: one target at
    least; the official budgets, 32 and more, never meet it)."""
    return max(0, min(int(basis), int(out) - 1))


# ------------------------------------------------------------------------------------------------ algorithm


def farthest_point_sampling(x: torch.Tensor, k: int, start: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """k basis tokens per unit: x (B, N, D), start (B,) the first pick. Returns (B, k) indices in pick order.

    Each pick is the token farthest (squared Euclidean) from the picks so far. ``ours``: fp32, a picked token is
    never picked again, the first maximum wins. ``official`` (``fps`` of ``llava/model/utils.py``): x in its own
    dtype (fp16 there), distances initialised to 1e10 and lowered with ``torch.min``, the next pick
    ``dist.max(1)[1]``."""
    B, N, D = x.shape
    dev = x.device
    if k <= 0:
        return torch.zeros(B, 0, dtype=torch.long, device=dev)
    official = numerics == "official"
    xs = x if official else x.float()
    dist = torch.full((B, N), OFFICIAL_FAR if official else float("inf"), device=dev)
    pick = start.to(dev).long()
    picks = []
    for i in range(k):
        picks.append(pick)
        centre = xs.gather(1, pick[:, None, None].expand(B, 1, D))
        dist = torch.min(dist, ((xs - centre) ** 2).sum(-1))
        if official:
            pick = dist.max(1)[1]
        else:
            dist = dist.scatter(1, pick[:, None], -1.0)  # never again (official: a tie at 0 could repeat one)
            pick = dist.argmax(1)
    return torch.stack(picks, 1)


def approximation_errors(x: torch.Tensor, seeds: torch.Tensor, ridge: float = OFFICIAL_RIDGE) -> torch.Tensor:
    """e_i = ||x_i - x^_i||, x^ the least-squares reconstruction of every token from the basis rows (fp32, the
    official arithmetic: G = S S^T + ridge I, C = solve(G, S X^T)). x (B, N, D), seeds (B, k) -> (B, N).
    ``solve_ex``: the same LU solve as ``solve`` without its error check (a host read)."""
    xf = x.float()
    if seeds.shape[1] == 0:
        return torch.norm(xf, dim=-1)
    s = xf.gather(1, seeds[..., None].expand(-1, -1, xf.shape[-1]))
    g = torch.matmul(s, s.transpose(-1, -2))
    g.diagonal(dim1=-2, dim2=-1).add_(ridge)
    coef = torch.linalg.solve_ex(g, torch.matmul(s, xf.transpose(-1, -2)))[0].transpose(-1, -2)
    return torch.norm(xf - torch.matmul(coef, s), dim=-1)


def rank_by_error(err: torch.Tensor, seeds: torch.Tensor, out: int, numerics: str = "ours") -> torch.Tensor:
    """E: the ``out`` tokens of largest error per unit, descending. ``ours``: the basis tokens ranked last, ties
    to the lower index; ``official``: ``torch.topk`` of every error (its tie order)."""
    if numerics == "official":
        return torch.topk(err, k=out, dim=1)[1]
    err = err.float().scatter(1, seeds, float("-inf"))
    return torch.sort(err, dim=1, descending=True, stable=True).indices[:, :out]


def nearest_target(x: torch.Tensor, targets: torch.Tensor, cosine: str = "ours") -> torch.Tensor:
    """For every token of every unit the slot of its most similar target (cosine, first maximum): x (B, N, D),
    targets (B, c) -> (B, N). ``ours``: fp32, norms floored at 1e-12; ``official``: ``F.cosine_similarity`` in
    x's own dtype (``token_merging``)."""
    B, N, D = x.shape
    if targets.shape[1] == 0:
        return torch.zeros(B, N, dtype=torch.long, device=x.device)
    t = x.gather(1, targets[..., None].expand(-1, -1, D))
    if cosine == "official":
        out = [F.cosine_similarity(x[:, a:a + COSINE_CHUNK, None], t[:, None], dim=3).argmax(dim=2)
               for a in range(0, N, COSINE_CHUNK)]
        return torch.cat(out, 1)
    xn = x.float() / x.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    tn = t.float() / t.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.bmm(xn, tn.transpose(1, 2)).argmax(dim=-1)


def apet_units(x: torch.Tensor, out: int, k: int, start: torch.Tensor, *, seed_slots: str = "replace",
               merge_seeds: bool = False, ridge: float = OFFICIAL_RIDGE, numerics: str = "ours",
               stage: str = "vision") -> dict:
    """ApET on a batch of B units of N tokens each (x (B, N, D), in the scoring / merging space), ``out`` tokens
    out of each, ``k`` basis tokens, ``start`` (B,) the FPS start. Returns local (B, .) indices:

    ``seeds`` (B, k) in pick order; ``targets`` (B, out - k) in error order; ``slots`` (B, k): where each basis
    token goes (``replace``: the tokens E[out-k:], ascending at stage 1 (the boolean mask of ``encode_images``),
    in error order at stage 2 (``image_embeds[errors_indices[-k:]] = seed_features``); else the seeds);
    ``assign`` (B, N): the target slot every merged token joins, -1 for the others (targets, seeds unless
    ``merge_seeds``, and with ``replace`` the dropped tokens E[out-k:]).

    ``numerics="official"``: FPS on fp16 x, errors of the fp16 values, ``torch.topk``, the cosine of the fp16
    values at stage 1 and of their fp32 copy at stage 2 (``layer_prune`` casts to fp32 first)."""
    check_numerics("apet", numerics)
    official = numerics == "official"
    B, N, _ = x.shape
    xs = x.to(OFFICIAL_DTYPE) if official else x.float()
    seeds = farthest_point_sampling(xs, k, start, numerics)
    ranked = rank_by_error(approximation_errors(xs, seeds, ridge), seeds, out, numerics)
    targets, tail = ranked[:, :out - k], ranked[:, out - k:]
    if seed_slots == "replace":
        slots = tail.sort(dim=1).values if stage == "vision" else tail
    else:
        slots = seeds
    nearest = nearest_target(xs.float() if official and stage != "vision" else xs, targets, numerics)
    merged = torch.ones(B, N, dtype=torch.bool, device=x.device)
    merged = merged.scatter(1, targets, False)
    if seed_slots == "replace":
        merged = merged.scatter(1, tail, False)
    if not merge_seeds:
        merged = merged.scatter(1, seeds, False)
    assign = torch.where(merged, nearest, torch.full_like(nearest, -1))
    return {"seeds": seeds, "targets": targets, "slots": slots, "assign": assign}


def merged_rows(x: torch.Tensor, targets: torch.Tensor, assign: torch.Tensor, official: bool) -> torch.Tensor:
    """mean(target, its joiners) per target: x (B, N, D), targets (B, c), assign (B, N) -> (B, c, D). ``official``:
    ``token_merging``'s arithmetic in x's dtype (fp16): ``scatter_add_`` of the joiners in ascending token order
    onto the target rows, then ``/= (1 + count)``; ours in fp32."""
    B, N, D = x.shape
    xs = x if official else x.float()
    rows = xs.gather(1, targets[..., None].expand(-1, -1, D)).clone()
    joins = assign >= 0
    slot = assign.clamp(min=0)
    src = torch.where(joins[..., None], xs, torch.zeros((), dtype=xs.dtype, device=xs.device))
    rows.scatter_add_(1, slot[..., None].expand(-1, -1, D), src)
    count = torch.zeros(B, targets.shape[1], dtype=torch.int32, device=x.device)
    count.scatter_add_(1, slot, joins.to(torch.int32))
    if official:
        rows /= (1 + count[..., None])
        return rows
    return rows / (1 + count[..., None]).float()


# ------------------------------------------------------------------------------------------------ one sample


def _draw(seed: int, key: int, count: int) -> torch.Tensor:
    """The FPS start draws of one sample (host): ``count`` integers from a generator seeded by the method's seed
    and the sample's key (the official start is ``torch.randint``, unseeded); a unit's start is draw % N."""
    g = torch.Generator().manual_seed(hash((int(seed), int(key))) & 0x7FFFFFFFFFFFFFFF)
    return torch.randint(0, 2 ** 31 - 1, (max(count, 1),), generator=g)


def apet_compose(x: torch.Tensor, fixed: list, groups: list, draws: torch.Tensor, *, basis: int, seed_slots: str,
                 merge_seeds: bool, ridge: float, numerics: str, stage: str, space: str = "vision",
                 want_values: bool = False) -> Selection:
    """One sample's selection over its n tokens x (n, D): ``fixed`` index tensors kept as they are (newlines,
    units kept whole, a frame's [CLS]); ``groups`` [(unit, candidate indices (m,), tokens out)] pruned by
    :func:`apet_units` (units of equal (m, out) in one batch; unit u starts its FPS at draws[u] % m).

    Output order: every output at its place (a target, a fixed token: its own index; a basis token: its slot's
    index with ``replace``, its own with ``own``, after the unit's last token with ``append``). Without
    ``want_values``: ``keep`` = fixed tokens and basis tokens, ``targets`` / ``assign`` the merge (rule ``mean``;
    with ``merge_seeds`` the basis tokens keep their slot too, ``Selection.merge_kept``), ``order`` that
    placement: the LLM stage, whose merge is the engine's fp32 one as the official ``layer_prune``'s. With
    ``want_values`` (``merge_seeds``: a basis token that also joins a target, which one ``assign`` cannot say):
    every output computed here (fp16 under ``numerics="official"``), ``keep`` = each output's provenance in output
    order (a basis token in ``replace`` mode: its slot token)."""
    dev = x.device
    n, D = x.shape
    official = numerics == "official"
    sub = 2 * basis + 2  # a place is index * sub, + 1 + j for the j-th basis token appended after index
    keep, prov, place = list(fixed), list(fixed), [f * sub for f in fixed]
    tg_all, tg_place = [], []
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    xv = x.to(OFFICIAL_DTYPE) if official and want_values else x
    rows_keep, rows_tg = [xv[f] for f in fixed], []
    batches: dict[tuple[int, int], list] = {}
    for u, cand, out in groups:
        batches.setdefault((int(cand.numel()), int(out)), []).append((u, cand))
    num_targets = 0
    for (m, out), members in batches.items():
        if out <= 0:
            continue  # nothing of these candidates survives (a frame whose budget its [CLS] fills)
        cand = torch.stack([c for _, c in members])  # (B, m)
        start = torch.stack([draws[u] for u, _ in members]).to(dev) % m
        k = basis_count(basis, out)
        r = apet_units(x[cand], out, k, start, seed_slots=seed_slots, merge_seeds=merge_seeds, ridge=ridge,
                       numerics=numerics, stage=stage)
        seeds, targets, slots = (cand.gather(1, r[name]) for name in ("seeds", "targets", "slots"))
        if seed_slots == "append":
            last = cand.max(dim=1, keepdim=True).values
            seed_place = last * sub + 1 + torch.arange(k, device=dev)[None]
        else:
            seed_place = slots * sub
        keep.append(seeds.reshape(-1))
        prov.append((slots if seed_slots == "replace" else seeds).reshape(-1))
        place.append(seed_place.reshape(-1))
        tg_all.append(targets.reshape(-1))
        tg_place.append(targets.reshape(-1) * sub)
        c = r["targets"].shape[1]
        slot_ids = r["assign"] + num_targets + torch.arange(len(members), device=dev)[:, None] * c
        slot_ids = torch.where(r["assign"] >= 0, slot_ids, torch.full_like(slot_ids, -1))
        assign = assign.scatter(0, cand.reshape(-1), slot_ids.reshape(-1))
        num_targets += len(members) * c
        if want_values:
            xc = xv[cand]
            rows_keep.append(xc.gather(1, r["seeds"][..., None].expand(-1, -1, D)).reshape(-1, D))
            rows_tg.append(merged_rows(xc, r["targets"], r["assign"], official).reshape(-1, D))
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    keep_t = torch.cat(keep) if keep else empty
    targets_t = torch.cat(tg_all) if tg_all else empty
    order = torch.argsort(torch.cat(place + tg_place)) if place or tg_place else empty
    if want_values:
        rows = torch.cat(rows_keep + rows_tg).to(x.dtype) if not official else torch.cat(rows_keep + rows_tg)
        return Selection(keep=torch.cat(prov + tg_all)[order], values=rows[order], space=space)
    if not tg_all:
        return Selection(keep=keep_t, order=order)
    return Selection(keep=keep_t, targets=targets_t, assign=assign, rule="mean", space=space, order=order,
                     merge_kept=merge_seeds)  # the basis tokens (kept) join their nearest target too


@register
class ApET(Method):
    """ApET: per image / crop / frame, k farthest-point basis tokens; the tokens their linear span reconstructs
    worst are kept, the others merged into the most similar kept one; before the LLM and at the middle LLM
    layer. ``budget``: equivalent tokens per unit (stage 1 = 2B - B//2, stage 2 = B//2), or tokens entering the
    LLM per unit with ``llm_stage=False``."""

    name = "apet"
    #: every size a host int (the planned unit layout; the FPS draws planned on the host), the FPS loop k device
    #: steps, the solve without its error check: no device read. The reference mode runs eagerly.
    capturable = "full"
    vision_stage = True
    position_mode = "reindex"  # official layer_prune: contiguous positions after the stage

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # tokens per unit after the vision stage / after the LLM stage; None = from the budget (official
            # pairs 96/32, 192/64, 288/96), or the official 96 / 32 without a budget
            "stage1": None,
            "stage2": None,
            # the in-LLM stage (official: every script passes --layer_list '[16]'); False: pre-LLM only
            "llm_stage": True,
            # LLM stage before this decoder layer, stated for 32 layers (official 16), scaled to the model (ours)
            "layer": OFFICIAL_LAYER,
            "scale_layers": True,
            # basis tokens per unit (official --basis_token_num 10), at most tokens out - 1 (ours)
            "basis": OFFICIAL_BASIS,
            # Tikhonov term on the Gram matrix's diagonal (official 1e-5)
            "ridge": OFFICIAL_RIDGE,
            # where the basis tokens go: None = "append" on Video-LLaVA (official encode_videos), "replace"
            # elsewhere (official encode_images / layer_prune: in the places of E[T-k:], dropped); "own" (ours)
            "seed_slots": None,
            # stage-1 scoring / merging features: None = "projected" on Video-LLaVA and the Qwen families (the
            # official Video-LLaVA / Qwen code), "vision" elsewhere (official LLaVA: the select layer)
            "space": None,
            # basis tokens also merged into their nearest target (official: they are non-retained tokens too);
            # None = False ("ours") / True (numerics="official"); stage 1 only (an llm stage merges with assign)
            "merge_seeds": None,
            "cls_token": Option("keep", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS] at stage 1: keep (official encode_videos: kept aside, "
                                    "T - 1 patches) or candidate (ours: a token like the patches); stage 2 treats "
                                    "every token of a unit alike"),
            # LLaVA-NeXT / OneVision newline tokens kept as layout, not counted (ours)
            "keep_newlines": True,
            # seeds the FPS start draw per sample (official: unseeded torch.randint)
            "seed": 0,
            # "ours" (fp32, basis ranked last, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and (options.get("stage1") is not None or options.get("stage2") is not None):
            raise ValueError("apet: give either a budget or stage1= / stage2=, not both")
        super().__init__(budget, **options)
        if self.budget is not None:
            if self.llm_stage:
                if self.budget < 2:
                    raise ValueError("apet: budget must be >= 2 with the LLM stage (stage 2 keeps budget // 2)")
                self.stage1, self.stage2 = split_budget(self.budget)
            else:
                self.stage1, self.stage2 = self.budget, None
        else:
            self.stage1 = OFFICIAL_STAGE1 if self.stage1 is None else self.stage1
            self.stage2 = (OFFICIAL_STAGE2 if self.stage2 is None else self.stage2) if self.llm_stage else None
        for name in ("stage1", "stage2"):
            v = getattr(self, name)
            if v is None and name == "stage2" and not self.llm_stage:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
                raise ValueError(f"apet: {name} must be a whole number >= 1, got {v!r}")
            setattr(self, name, int(v))
        if not self.llm_stage and options.get("stage2") is not None:
            raise ValueError("apet: stage2 needs llm_stage=True")
        b = self.basis
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(f"apet: basis must be a whole number >= 0, got {b!r}")
        if not isinstance(self.ridge, (int, float)) or isinstance(self.ridge, bool) or not self.ridge > 0:
            raise ValueError(f"apet: ridge must be > 0, got {self.ridge!r}")
        if self.seed_slots is not None and self.seed_slots not in SEED_SLOTS:
            raise ValueError(f"apet: seed_slots must be one of {SEED_SLOTS} or None, got {self.seed_slots!r}")
        if self.space is not None and self.space not in SPACES:
            raise ValueError(f"apet: space must be one of {SPACES} or None, got {self.space!r}")
        if self.merge_seeds not in (None, True, False):
            raise ValueError(f"apet: merge_seeds must be None, True or False, got {self.merge_seeds!r}")
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=24, family="llava")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        self._layers = ()
        if self.llm_stage:
            self._layers = (scale_layers((int(self.layer),), num_layers) if self.scale_layers
                            else (int(self.layer),))
        self._slots = self.seed_slots or ("append" if family in VIDEO_MODELS else "replace")
        self._space = self.space or ("projected" if family in PROJECTED_FAMILIES else "vision")
        self._merge_seeds = (self.numerics == "official") if self.merge_seeds is None else bool(self.merge_seeds)

    @property
    def llm_layers(self):
        return self._layers

    # ---- planning (host)
    def _stage1_plan(self, lay):
        """Per unit: (fixed token indices, candidate indices, tokens out of the candidates) of stage 1, from the
        layout only (host ints)."""
        plans = []
        T = self.stage1
        for u in range(lay.num_units):
            tok = lay.tokens[u]
            cls = lay.cls[u] if self.cls_token == "keep" else tok[:0]
            if T >= tok.numel():
                plans.append(([tok], None, 0))
                continue
            n_cls = int(cls.numel())
            plans.append(([cls] if n_cls else [], lay.patches[u] if n_cls else tok, max(T - n_cls, 0)))
        return plans

    def stage1_counts(self, v) -> tuple[int, list[int]]:
        """(newline tokens, tokens of every unit) after stage 1 for the vision signals ``v``: min(T1, unit size)
        (a pruned unit gives exactly T1: its [CLS] and T1 - 1 tokens, or T1 tokens), newlines if kept. Host ints
        from the planned layout or the engine's host copy of ``unit``: no device read."""
        if v.layouts or v._unit_host is None:
            lay = v.unit_layout()
            sizes, n_nl = [int(t.numel()) for t in lay.tokens], int(lay.newlines.numel())
        else:
            uh = v._unit_host.long()
            n_nl = int((uh < 0).sum())
            sizes = torch.bincount(uh[uh >= 0], minlength=v.num_units).tolist() if uh.numel() else []
        return (n_nl if self.keep_newlines else 0), [min(self.stage1, n) for n in sizes]

    def plan_vision(self, sig):
        """The FPS start draws of both stages (host), as the captured prefill reads them (``sig.plan``)."""
        return {"fps_draws": _draw(self.seed, sig.key, 2 * sig.unit_layout().num_units)}

    def _draws(self, sig, num_units: int) -> torch.Tensor:
        """(2U,) draws on the signals' device: U for stage 1, U for stage 2 (planned on the fast path)."""
        if "fps_draws" in sig.plan:
            return sig.plan["fps_draws"]
        return _draw(self.seed, sig.key, 2 * num_units).to(sig.unit.device)

    # ---- stages
    def select_vision(self, sig):
        lay = sig.unit_layout(patch=True)  # the one host read (none when planned)
        dev = sig.unit.device
        plans = self._stage1_plan(lay)
        if all(c is None for _, c, _ in plans) and (self.keep_newlines or not lay.newlines.numel()):
            return Selection(keep=torch.arange(sig.num_tokens, device=dev))
        fixed = [lay.newlines] if self.keep_newlines and lay.newlines.numel() else []
        groups = []
        for u, (fx, cand, out) in enumerate(plans):
            fixed += [f for f in fx if f.numel()]
            if cand is not None:
                groups.append((u, cand, out))
        if self._merge_seeds and sig.deepstack is not None:
            raise BudgetError("apet: merge_seeds needs outputs computed by the method (Selection.values), which cannot "
                             "carry Qwen3-VL's DeepStack rows; use merge_seeds=False")
        if self._merge_seeds and self._space == "vision" and self.keep_newlines and lay.newlines.numel():
            raise BudgetError("apet: merge_seeds computes every output in vision space, where LLaVA-NeXT / OneVision "
                             "newline tokens have no features; use merge_seeds=False or keep_newlines=False")
        x = sig.vision_features if self._space == "vision" else sig.features
        return apet_compose(x, fixed, groups, self._draws(sig, lay.num_units), basis=int(self.basis),
                            seed_slots=self._slots, merge_seeds=self._merge_seeds, ridge=float(self.ridge),
                            numerics=self.numerics, stage="vision", space=self._space, want_values=self._merge_seeds)

    def select_llm(self, stage, sig):
        """Stage 2, per unit, on the hidden states of the current visual tokens (every token of a unit alike, a
        frame's [CLS] too: there is no official video LLM stage): each token's unit from its origin; the counts
        per unit are stage 1's (host ints), so one stable sort by unit groups them without a host read."""
        v = sig.vision
        dev = sig.visual.device
        n_nl, counts = self.stage1_counts(v)
        nv = sig.num_visual
        if nv != n_nl + sum(counts):
            raise RuntimeError(f"apet: {nv} visual tokens at the LLM stage, the vision stage planned "
                               f"{n_nl + sum(counts)}")
        T = self.stage2
        if all(c <= T for c in counts):
            return Selection(keep=torch.arange(nv, device=dev))
        unit = v.unit[sig.origin]
        order = torch.sort(torch.where(unit >= 0, unit + 1, torch.zeros_like(unit)), stable=True).indices
        fixed = [order[:n_nl]] if n_nl else []
        groups, at = [], n_nl
        for u, c in enumerate(counts):
            mine, at = order[at:at + c], at + c
            if c <= T:
                fixed.append(mine)
            else:
                groups.append((u, mine, T))
        U = len(counts)
        return apet_compose(sig.hidden[sig.visual], fixed, groups, self._draws(v, U)[U:], basis=int(self.basis),
                            seed_slots=self._slots, merge_seeds=self._merge_seeds, ridge=float(self.ridge),
                            numerics=self.numerics, stage="llm")
