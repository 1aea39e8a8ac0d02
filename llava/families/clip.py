"""CLIP-style vision towers with a [CLS] token (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA): run the tower
once, and hand out the select layer's states with the [CLS] row and keys recomputed from that
layer's own ``layer_norm1`` + q/k projections on its input, one of the run's hidden states (so the tower stays on
SDPA / FlashAttention); :func:`tower_signals` computes them for both executors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..needs import HEAD_PREFIXES
from .base import FamilyAdapter, TokenTable, VisualLayout, VisualUnits, param_dtype, uniform_units

#: the arithmetic of the tower's attention signals (``Method.vision_attention_logits``): "fp32" (ours: q / k cast
#: to fp32, fp32 softmax) or "model" (the official code's: in the tower's dtype, see :func:`clip_probs`)
TOWER_LOGITS = ("fp32", "model")


def clip_probs(q: torch.Tensor, k: torch.Tensor, scale: float, logits: str = "fp32") -> torch.Tensor:
    """softmax(q k^T * scale) over the keys: q (..., Q, d), k (..., S, d) unscaled projections -> (..., Q, S).
    ``"fp32"``: in fp32. ``"model"``: the eager ``CLIPAttention`` of transformers 4.31-4.37 (the version LLaVA and
    its forks pin; the attention maps ``output_attentions`` hands the official code): ``q_proj(x) * scale``, the
    ``bmm`` and the softmax all in the tower's dtype (fp16 when the official builder casts the tower)."""
    if logits == "model":
        return torch.matmul(q * scale, k.to(q.dtype).transpose(-1, -2)).softmax(-1)
    if logits != "fp32":
        raise ValueError(f"tower attention logits must be one of {TOWER_LOGITS}, got {logits!r}")
    return (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).softmax(-1)


def received_from_other_patches(maps: torch.Tensor) -> torch.Tensor:
    """(n, S): per token j, the attention it receives from the P = S - 1 patch queries other than itself, head
    mean per entry first, / (P - 1): ``maps`` (n, H, S, S) probabilities ([CLS] = token 0). The official
    VisionTrim term (``clip_encoder.py`` ``token_prune_visiontrim`` 22b686d l.414-423: ``attentions[-2].mean(dim=1)``,
    ``[:, 1:, 1:]``, the diagonal ``masked_fill``-ed with 0, ``.sum(dim=1) / (n_tokens - 1)``), in the maps' dtype;
    column 0 ([CLS], never a patch) sums the patch rows the same way."""
    m = maps.mean(dim=1)[:, 1:]  # (n, P, S): head mean per entry, the patch query rows
    p = m.shape[1]
    diag = torch.zeros(p, m.shape[2], dtype=torch.bool, device=m.device)
    ar = torch.arange(p, device=m.device)
    diag[ar, ar + 1] = True  # patch i's own column is i + 1
    return m.masked_fill(diag, 0).sum(dim=1) / (p - 1)


def attention_layer(tower, feature_layer: int, vision_layer: int | None) -> int:
    """Index of the encoder layer whose attention defines the vision signals: the layer that
    produces ``hidden_states[v]`` (v = the method's ``vision_layer`` or the model's select layer)."""
    v = feature_layer if vision_layer is None else vision_layer
    if not isinstance(v, int):
        raise ValueError("vision signals need a single vision_feature_layer")
    n = len(tower.encoder.layers)
    idx = (v % (n + 1)) - 1  # hidden_states[v] is the output of encoder layer idx
    if idx < 0:
        raise ValueError(f"vision layer {v} is the embedding output: it has no attention")
    return idx


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(n, s, H*d) projections -> (n, H, s, d), in their dtype."""
    n, s, _ = x.shape
    return x.view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)


#: the forms of the received attention: per head (mean over all queries), from the other patches
#: (:func:`received_from_other_patches`), global (head mean per entry, then the mean over all queries)
RECEIVED_FORMS = ("per_head", "other_patches", "global")


def received_attention(layer, h: torch.Tensor, chunk: int = 64, logits: str = "fp32",
                       form: str = "per_head") -> torch.Tensor:
    """(n, H, S) fp32: per head, the attention each token *receives* in ``layer`` (the mean over all S
    query rows, [CLS] included, of softmax(q k^T * scale)), recomputed from the layer's input ``h``
    (n, S, D) with its own ``layer_norm1`` + q/k projections; ``chunk`` units at a time. ``logits="model"``:
    the maps in the tower's dtype (:func:`clip_probs`), the means there. ``form="other_patches"``: instead
    (n, S), :func:`received_from_other_patches` (VisionTrim's term); ``"global"``: (n, S), the head mean per
    entry, then the mean over all S queries (HiPrune's official ``attn.mean(dim=1).mean(dim=1)``)."""
    if form not in RECEIVED_FORMS:
        raise ValueError(f"received attention form must be one of {RECEIVED_FORMS}, got {form!r}")
    patches = form != "per_head"
    attn = layer.self_attn
    out = []
    for a in range(0, h.shape[0], chunk):
        xn = layer.layer_norm1(h[a:a + chunk])
        n, s, _ = xn.shape
        if logits == "fp32" and not patches:  # the default signal, unchanged
            q = attn.q_proj(xn).view(n, s, attn.num_heads, attn.head_dim).float()
            k = attn.k_proj(xn).view(n, s, attn.num_heads, attn.head_dim).float()
            p = (torch.einsum("nqhd,nshd->nhqs", q, k) * attn.scale).softmax(-1)
            out.append(p.mean(2))
            continue
        p = clip_probs(_heads(attn, attn.q_proj(xn)), _heads(attn, attn.k_proj(xn)), attn.scale, logits)
        out.append(received_from_other_patches(p) if form == "other_patches"
                   else p.mean(dim=1).mean(dim=1) if form == "global" else p.mean(2))
    return torch.cat(out)


def fullwidth_signals(layer, h: torch.Tensor, logits: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's q / k projections of its input ``h`` (n, S, D) taken full width (one D-wide head):
    the [CLS] query's softmax over all S keys with scale 1/sqrt(D) (n, S), and the keys (n, S, D); fp32.
    ``logits="model"``: the row as PruMerge's official code computes it from its hooked q / k (42Shawn/LLaVA-PruMerge
    ``clip_encoder.py`` ``token_prune_merge_advanced(_plus)``: ``softmax((q @ k^T) * C ** -0.5)``, all in the
    tower's dtype); the keys stay fp32."""
    attn = layer.self_attn
    xn = layer.layer_norm1(h)
    if logits == "model":
        k16, q16 = attn.k_proj(xn), attn.q_proj(xn[:, :1])
        p = (torch.matmul(q16, k16.transpose(-1, -2)) * k16.shape[-1] ** -0.5).softmax(-1)[:, 0]
        return p, k16.float()
    if logits != "fp32":
        raise ValueError(f"tower attention logits must be one of {TOWER_LOGITS}, got {logits!r}")
    k = attn.k_proj(xn).float()
    q = attn.q_proj(xn[:, :1]).float()
    p = (torch.einsum("nqd,nsd->nqs", q, k) / k.shape[-1] ** 0.5).softmax(-1)[:, 0]
    return p, k


def _gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (g, S, ...) -> (g, k, ...) at the token positions idx (g, k)."""
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


def _apply_keep(units: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, state: dict, keep) -> list:
    """The groups (host unit indices, states, stock positions, the method's per-token state) left after
    an in-tower selection."""
    if keep is None:
        return [(units, y, pos, state)]
    g = y.shape[0]
    if torch.is_tensor(keep):
        if keep.dim() != 2 or keep.shape[0] != g:
            raise ValueError(f"select_tower must return ({g}, k) positions, got shape {tuple(keep.shape)}")
        idx = keep.to(y.device, torch.long)
        return [(units, _gather_tokens(y, idx), pos.gather(1, idx),
                 {k: _gather_tokens(t, idx.to(t.device)) for k, t in state.items()})]
    keep = list(keep)
    if len(keep) != g:
        raise ValueError(f"select_tower returned {len(keep)} keep lists for {g} units")
    by_len: dict[int, list[int]] = {}
    for j, kj in enumerate(keep):  # units keeping different counts run on in groups of equal length
        by_len.setdefault(int(kj.numel()), []).append(j)
    out = []
    for members in by_len.values():
        m = torch.tensor(members)
        md = m.to(y.device)
        sub = torch.stack([keep[j].reshape(-1) for j in members])
        out.extend(_apply_keep(units[m], y[md], pos[md], {k: t[m.to(t.device)] for k, t in state.items()}, sub))
    return out


def run_tower_staged(tower, pixels: torch.Tensor, feature_layer: int, method, kind: str = "image",
                     cls_in_llm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-tower stage: run the CLIP vision model layer by layer as the stock ``CLIPVisionModel`` /
    ``CLIPEncoder`` do (embeddings, ``pre_layrnorm``, ``encoder.layers[i](h, None)``), up to the layer
    producing ``hidden_states[feature_layer]``, asking ``method.select_tower(i, TowerSignals)`` after
    each layer and gathering the survivors (later layers run on fewer tokens). Units whose counts part
    run on as separate groups. Returns the select-layer states scattered back to the stock token
    positions (n, S, Dv), zero rows for dropped tokens, and the survivors (n, S) bool ([CLS] = column 0).
    Layers after the select layer are not run (their output is unused)."""
    from llava.tower_signals import TowerSignals

    if not isinstance(feature_layer, int):
        raise ValueError("an in-tower stage needs a single vision_feature_layer")
    layers = tower.encoder.layers
    n_layers = len(layers)
    v = feature_layer % (n_layers + 1)  # hidden_states[v] = output of encoder layer v - 1
    h = tower.pre_layrnorm(tower.embeddings(pixels.to(tower.dtype)))
    n, s, d = h.shape
    pos = torch.arange(s, device=h.device).expand(n, s)
    groups = [(torch.arange(n), h, pos, {})]
    for i in range(v):
        layer = layers[i]
        nxt = []
        for units, x, p, state in groups:
            y = layer(x, None)
            sig = TowerSignals(layer=i, module=layer, hidden_in=x, hidden_out=y, patch=p - 1, select_layer=v - 1,
                               num_layers=n_layers, kind=kind, cls_in_llm=cls_in_llm, state=state)
            nxt.extend(_apply_keep(units, y, p, sig.state, method.select_tower(i, sig)))
        groups = nxt
    if len(groups) == 1 and groups[0][1].shape[1] == s:  # nothing dropped (one group = all units, in order)
        return groups[0][1], torch.ones(n, s, dtype=torch.bool, device=h.device)
    out = h.new_zeros(n, s, d)
    kept = torch.zeros(n, s, dtype=torch.bool, device=h.device)
    for units, x, p, _ in groups:
        u = units.to(h.device)[:, None]
        out[u, p] = x
        kept[u, p] = True
    return out, kept


#: the CLIP attention implementations that take the masked tower's additive 4-D mask (n, 1, 1, S)
MASKED_TOWER_ATTN = ("sdpa", "eager")


def run_tower_masked(tower, pixels: torch.Tensor, feature_layer: int, method, kind: str = "image",
                     cls_in_llm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-tower stage with static shapes (the fast path's captured prefill, :mod:`llava.fast.path`):
    :func:`run_tower_staged`'s loop with every unit kept at its full token count S and a keep mask (n, S) bool
    carried on the device instead of gathering the survivors. Each layer runs as the stock
    ``encoder.layers[i](h, mask)`` with an additive mask (n, 1, 1, S) that is -inf at the dropped tokens
    (their keys get exactly zero probability in every query's softmax; ``None``, the stock call, until the
    method first changed the mask); after each layer the method's ``select_tower_masked(i, TowerSignals)``
    (``key_mask`` = the current mask, ``captured`` True) returns the new (n, S) mask, or None for "unchanged"
    (a host decision). No host read. The dropped tokens' rows still run through the layers (their outputs are
    never read: no kept token attends to them).

    Returns what :func:`run_tower_staged` returns: the select layer's states (n, S, Dv) with zero rows at the
    dropped tokens, and the survivors (n, S) bool. Not bit-identical to the gathered run (the attention sums
    over S keys, some with zero weight, instead of the survivors alone); the kept tokens are the same on the
    tested inputs (tests/test_fastpath_flowcut.py)."""
    from llava.tower_signals import TowerSignals

    if not isinstance(feature_layer, int):
        raise ValueError("an in-tower stage needs a single vision_feature_layer")
    hook = method.select_tower_masked
    if not callable(hook):
        raise TypeError(f"{method.name}: the masked tower needs select_tower_masked(layer, sig) -> (n, S) bool")
    impl = getattr(tower.config, "_attn_implementation", None) or "eager"
    if impl not in MASKED_TOWER_ATTN:
        raise NotImplementedError(f"{method.name}: the masked tower passes a 4-D additive mask, which the tower's "
                                  f"{impl!r} attention does not take ({', '.join(MASKED_TOWER_ATTN)} do)")
    layers = tower.encoder.layers
    n_layers = len(layers)
    v = feature_layer % (n_layers + 1)  # hidden_states[v] = output of encoder layer v - 1
    h = tower.pre_layrnorm(tower.embeddings(pixels.to(tower.dtype)))
    n, s, _ = h.shape
    keep = torch.ones(n, s, dtype=torch.bool, device=h.device)
    patch = (torch.arange(s, device=h.device) - 1).expand(n, s)
    state: dict = {}
    bias = None  # nothing dropped yet: the stock call
    for i in range(v):
        layer = layers[i]
        y = layer(h, bias)
        sig = TowerSignals(layer=i, module=layer, hidden_in=h, hidden_out=y, patch=patch, select_layer=v - 1,
                           num_layers=n_layers, kind=kind, cls_in_llm=cls_in_llm, state=state,
                           key_mask=keep if bias is not None else None, captured=True)
        new = hook(i, sig)
        state = sig.state
        if new is not None:
            if tuple(new.shape) != (n, s) or new.dtype != torch.bool:
                raise ValueError(f"{method.name}: select_tower_masked must return a ({n}, {s}) bool mask, got "
                                 f"{tuple(new.shape)} {new.dtype}")
            keep = new
            bias = torch.zeros(n, 1, 1, s, dtype=h.dtype, device=h.device).masked_fill(
                ~keep[:, None, None, :], float("-inf"))
        h = y
    return h.masked_fill(~keep[..., None], 0), keep


def official_cls_row(attn, xn: torch.Tensor, k: torch.Tensor, logits: str = "model") -> torch.Tensor:
    """(n, H, S): the [CLS] query's row of the whole attention map, as the official code reads it from
    ``output_attentions`` (``attentions[i][:, :, 0]``): every token's query projected (``q_proj`` of all S rows),
    the (S, S) map of :func:`clip_probs`, row 0. The [CLS] row alone (``q_proj`` of one row, a (1, S) product) is
    the same formula, but other GEMM shapes sum in another order: in fp32 it parts from the official row by an
    ulp here and there (e.g. 1.8e-7 on a NeXT crop of the parity weights, seed 4), which reorders near-ties."""
    return clip_probs(_heads(attn, attn.q_proj(xn)), _heads(attn, k), attn.scale, logits)[:, :, 0]


def cls_row(layer, h: torch.Tensor, logits: str = "fp32") -> torch.Tensor:
    """(n, H, S) fp32: per head, the [CLS] query's softmax over the unit's tokens in ``layer``, recomputed
    from its input ``h`` with its own ``layer_norm1`` + q/k projections (as the select layer's cls_attn).
    ``logits="model"``: :func:`clip_probs`'s official arithmetic, in the tower's dtype, row 0 of the whole map
    (:func:`official_cls_row`)."""
    attn = layer.self_attn
    xn = layer.layer_norm1(h)
    if logits != "fp32":
        return official_cls_row(attn, xn, attn.k_proj(xn), logits)
    n, s, _ = xn.shape
    k = attn.k_proj(xn).view(n, s, attn.num_heads, attn.head_dim).float()
    q = attn.q_proj(xn[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).float()
    return (torch.einsum("nqhd,nshd->nhqs", q, k) * attn.scale).softmax(-1)[:, :, 0]


def run_tower(tower, pixels: torch.Tensor, feature_layer: int, call, kind: str = "image", cls_in_llm: bool = False):
    """Run the tower once for ``call`` (:class:`llava.needs.TowerCall`); return (select-layer hidden states
    (n, S, Dv), then :func:`tower_signals`' [CLS] row, keys and extra signals).

    ``call.stage``: a method with ``tower_stage``: the tower then runs layer by layer (:func:`run_tower_staged`),
    without attention signals, and the extra signals carry ``in_tower_kept`` (n, S)."""
    stage = call.stage
    if stage is not None:  # a method with an in-tower stage
        if not stage.vision_stage:
            raise TypeError(f"{stage.name}: a tower-stage method needs a vision stage (select_vision keeps the "
                            "survivors, sig.in_tower_kept; the dropped tokens carry zero features)")
        if call.attention or call.reads:
            raise NotImplementedError(f"{stage.name}: an in-tower stage cannot be combined with vision "
                                      "attention signals (needs_vision_attention / vision_*_layers)")
        hs, kept = run_tower_staged(tower, pixels, feature_layer, stage, kind, cls_in_llm)
        return hs, None, None, {"in_tower_kept": kept}
    out = tower(pixels.to(tower.dtype), output_hidden_states=True, return_dict=True)
    return (out.hidden_states[feature_layer], *tower_signals(tower, out.hidden_states, feature_layer, call))


def tower_signals(tower, hidden_states: tuple, feature_layer: int, call) -> tuple:
    """The attention signals ``call`` (:class:`llava.needs.TowerCall`) asks of one run of a CLIP tower, recomputed
    from its ``hidden_states`` (encoder layer i's input is ``hidden_states[i]``) with each layer's own ``layer_norm1``
    + q / k projections: both executors' tower runs call it. Returns (the [CLS] row (n, H, S) and head-mean keys
    (n, S, d) of the layer producing hidden state ``call.layer`` (the select layer when None), each None without
    ``call.attention``; the ``call.reads`` signals by flat name (:attr:`llava.needs.TowerRead.names`), at hidden-state
    index v: ``received`` the attention each token receives (``recv:v`` (n, H, S)), ``fullwidth`` the full-width
    [CLS] attention and keys (``fwa:v`` (n, S), ``fwk:v`` (n, S, D)), ``cls_row`` that layer's [CLS] row per head
    (``clsl:v`` (n, H, S)), ``received_patches`` the attention received from the other patches (``rpat:v`` (n, S),
    :func:`received_from_other_patches`), ``received_global`` the global attention (``glob:v`` (n, S): head mean per
    entry, then the mean over all queries)). All fp32; ``call.logits="model"`` (``Method.vision_attention_logits``,
    reference modes): every attention signal in the arithmetic of the official code, in the tower's dtype
    (:func:`clip_probs`, :func:`fullwidth_signals`)."""
    if any(r.kind == "group_mean" for r in call.reads):
        raise ValueError("vision_group_mean_blocks (a block's output averaged over each merged token's 4 "
                         "patches) is computed for the Qwen towers only")
    logits = call.logits
    received = {}
    for r in dict.fromkeys(call.reads):
        idx = attention_layer(tower, feature_layer, r.layer)
        layer, h = tower.encoder.layers[idx], hidden_states[idx]
        if r.kind == "fullwidth":
            received[r.names[0]], received[r.names[1]] = fullwidth_signals(layer, h, logits)
        elif r.kind == "received_patches":  # received from the other patches (VisionTrim's term)
            received[r.names[0]] = received_attention(layer, h, logits=logits, form="other_patches")
        elif r.kind == "received_global":  # global: heads first, then all queries (HiPrune's)
            received[r.names[0]] = received_attention(layer, h, logits=logits, form="global")
        elif r.kind == "cls_row":  # that layer's [CLS] query row per head
            received[r.names[0]] = cls_row(layer, h, logits)
        else:
            received[r.names[0]] = received_attention(layer, h, logits=logits)
    cls_attn = keys = None
    if call.attention:
        idx = attention_layer(tower, feature_layer, call.layer)
        cls_attn, keys = cls_signals(tower.encoder.layers[idx], hidden_states[idx], logits)
    return cls_attn, keys, received


def cls_signals(layer, h: torch.Tensor, logits: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] query row per head (n, H, S) and the head-mean keys (n, S, d) of ``layer``, fp32,
    recomputed from its input ``h`` (n, S, D) = ``hidden_states[i]`` for encoder layer i with its own
    ``layer_norm1`` + q/k projections. ``logits="model"``: the row in the tower's
    dtype (:func:`clip_probs`); the keys stay fp32."""
    attn = layer.self_attn
    xn = layer.layer_norm1(h)
    n, s, _ = xn.shape
    heads, d = attn.num_heads, attn.head_dim
    if logits != "fp32":  # the row from the same projections, in the tower's dtype
        k16 = attn.k_proj(xn)
        return official_cls_row(attn, xn, k16, logits), k16.view(n, s, heads, d).float().mean(2)
    k = attn.k_proj(xn).view(n, s, heads, d).float()
    q = attn.q_proj(xn[:, :1]).view(n, 1, heads, d).float()
    scores = torch.einsum("nqhd,nshd->nhqs", q, k) * attn.scale
    return scores.softmax(-1)[:, :, 0], k.mean(2)


def clip_features(hs: torch.Tensor, proj, drop_cls: bool, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The LLM inputs of n units' select-layer states ``hs`` (n, S, Dv), as the stock model projects them: the
    [CLS] row left out when ``drop_cls``, cast to the projector's dtype (a tower kept in fp32 under a half-precision
    LLM, ``load(vision_dtype=)``), one projector call; zero where an in-tower stage dropped the token (``kept``
    (n, S) bool). (n, S - drop_cls, D)."""
    off = 1 if drop_cls else 0
    feats = proj(hs[:, off:].to(param_dtype(proj)))
    return feats if kept is None else feats.masked_fill(~kept[:, off:, None], 0)


def clip_tokens(hs, feats, ca, ks, received: dict, drop_cls: bool) -> TokenTable:
    """Per visual token of n units, in unit order (the [CLS] row left out when ``drop_cls``): ``features`` (from
    :func:`clip_features`), ``vision_features`` (the select layer's states), with ``ca`` / ``ks`` ``cls_attn``
    (n*m, H) / ``keys``, and each of :func:`tower_signals`' ``received`` signals (the per-head ones heads-last,
    (n*m, H)) or the in-tower stage's survivors ``in_tower_kept`` (n*m,). Both executors' CLIP towers lay out their
    tokens with it."""
    off = 1 if drop_cls else 0
    sel = hs[:, off:]
    n, m, dv = sel.shape
    flat = {"features": feats.reshape(n * m, -1), "vision_features": sel.reshape(n * m, dv)}
    if ca is not None:
        flat["cls_attn"] = ca[:, :, off:].permute(0, 2, 1).reshape(n * m, -1)
        flat["keys"] = ks[:, off:].reshape(n * m, -1)
    for name, r in received.items():  # recv (n, H, S) / fwa (n, S) / fwk (n, S, D) -> per token
        r = r.permute(0, 2, 1) if name.startswith(HEAD_PREFIXES) else r
        flat[name] = r[:, off:].reshape(n * m, *r.shape[2:])
    return TokenTable.of(flat)


def clip_cls(hs, ca, ks, received: dict, proj, units: torch.Tensor | None = None) -> TokenTable:
    """The [CLS] rows of the units ``units`` (device index; None: every unit) of a tower run that drops the [CLS]
    from the LLM input, as extra candidates (VisionZip / VisionDrop; :func:`llava.candidates.with_cls`), one
    entry per :func:`clip_tokens` entry: ``features`` its own projector call, ``vision_features``, the [CLS] attention
    / keys and tower signals at the [CLS] token. Both executors' CLIP towers take them from here."""
    at = slice(None) if units is None else units
    cls = {"features": proj(hs[at, :1].to(param_dtype(proj)))[:, 0], "vision_features": hs[at, 0]}
    if ca is not None:
        cls["cls_attn"] = ca[at, :, 0]
        cls["keys"] = ks[at, 0]
    for name, r in received.items():
        cls[name] = r[at, :, 0] if name.startswith(HEAD_PREFIXES) else r[at, 0]
    return TokenTable.of(cls)


def clip_table(hs, ca, ks, proj, drop_cls: bool, received: dict | None = None) -> TokenTable:
    """The eager engine's per-token table of n CLIP units (:meth:`llava.families.base.FamilyAdapter.encode`):
    :func:`clip_tokens` (``features``, ``vision_features``, ``cls_attn``, ``keys``, the ``received`` signals,
    ``in_tower_kept``) and, when the model drops the [CLS] from the LLM input, ``cls`` (:func:`clip_cls`: each unit's
    [CLS] as an extra candidate, VisionZip / VisionDrop)."""
    received = received or {}
    table = clip_tokens(hs, clip_features(hs, proj, drop_cls, received.get("in_tower_kept")), ca, ks, received,
                        drop_cls)
    if drop_cls:
        table.cls = clip_cls(hs, ca, ks, received, proj)
    return table


def clip_units(vision_config, items: int, per_item: int, drop_cls: bool) -> VisualUnits:
    """The host layout of ``items`` images / videos of ``per_item`` CLIP units each (:func:`uniform_units`): every
    unit's tokens in order, its [CLS] (patch -1) left out when ``drop_cls``."""
    g = vision_config.image_size // vision_config.patch_size
    off = 1 if drop_cls else 0
    m = g * g + 1 - off
    return uniform_units(items, per_item, m, torch.arange(off, off + m) - 1, (g, g))


@dataclass(frozen=True)
class ClipRun:
    """The static plan of a CLIP tower's run in a captured prefill (the CLIP families' ``VisualLayout.tower``, part
    of the graph key): the visual keyword whose tower runs (``key``), the unit kind, whether the model drops the [CLS]
    row from the LLM input, and whether the tower runs a planned subset of the flattened input (``crops``: its rows
    are the tower tensor ``crops``, LLaVA-NeXT's real crops)."""

    key: str
    kind: str
    drop_cls: bool
    crops: bool = False


class ClipAdapter(FamilyAdapter):
    """The captured executor's half of the CLIP families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA): the tower run of a
    captured prefill (:meth:`encode_static`) and its per-token table and [CLS] rows (:meth:`static_table`,
    :meth:`static_cls`), from the functions the eager ``encode`` uses."""

    tower_logits = True  # the attention signals in the official arithmetic too (clip_probs)

    def encode(self, visual, layouts, call):
        """The eager executor's tower run per layout (:func:`run_tower`): a video's frames flattened into units, an
        image's real crops (``tower.crops``: LLaVA-NeXT's padded crops left out); its :func:`clip_table`."""
        tables = []
        for lay in layouts:
            px = visual[lay.key]
            if lay.kind == "frame":
                px = px.flatten(0, 1)
            elif lay.tower.crops:
                px = torch.cat([pv[:c] for pv, c in zip(px, lay.units.counts)], 0)
            hs, ca, ks, rc = run_tower(self.tower_for(lay.key), px, self.config.vision_feature_layer, call,
                                       kind=lay.kind, cls_in_llm=not lay.drop_cls)
            tables.append(clip_table(hs, ca, ks, self.core.multi_modal_projector, lay.drop_cls, rc))
        return tables

    def clip_layout(self, key: str, kind: str, items: int, per_item: int, drop_cls: bool) -> VisualLayout:
        """The :class:`VisualLayout` of ``items`` images / videos of ``per_item`` CLIP units each (:func:`clip_units`)
        under the keyword ``key``."""
        cfg = self.config
        token_id = cfg.video_token_id if key == "pixel_values_videos" else cfg.image_token_id
        return VisualLayout(key, token_id, kind, drop_cls, clip_units(cfg.vision_config, items, per_item, drop_cls),
                            tower=ClipRun(key, kind, drop_cls))

    def encode_static(self, pixels, tower: ClipRun, tensors, call):
        """The tower once over every unit (images / crops / frames, flattened; ``tower.crops``: the planned rows
        ``tensors["crops"]``): the select layer's states ``hs`` (N, S, Dv), the projected features ``feats``
        (:func:`clip_features`), the [CLS] row / keys ``ca`` / ``ks`` with ``call.attention`` and the further tower
        signals (``x:<name>``) as :func:`run_tower` computes them; for an in-tower stage (``call.stage``) the masked
        tower (:func:`run_tower_masked`), its survivors ``x:in_tower_kept``."""
        x = pixels.flatten(0, pixels.dim() - 4)
        if tower.crops:
            x = x[tensors["crops"]]
        mod, fl = self.tower_for(tower.key), self.config.vision_feature_layer
        out = {}
        if call.stage is not None:  # every unit at its S tokens, the survivors as a mask (zero states elsewhere)
            hs, kept = run_tower_masked(mod, x, fl, call.stage, tower.kind, cls_in_llm=not tower.drop_cls)
            out["x:in_tower_kept"] = kept
        else:
            hs, ca, ks, extra = run_tower(mod, x, fl, call)  # the eager engine's run and signals
            if ca is not None:
                out["ca"], out["ks"] = ca, ks
            out.update({f"x:{k}": v for k, v in extra.items()})
        # one projector call, as the stock model (tokens dropped inside the tower: zero features)
        out.update(hs=hs, feats=clip_features(hs, self.core.multi_modal_projector, tower.drop_cls,
                                              out.get("x:in_tower_kept")))
        return out

    def static_table(self, out: dict, tower: ClipRun) -> TokenTable:
        """:meth:`encode_static`'s outputs per tower token of every unit, as the eager table (:func:`clip_tokens`)."""
        return clip_tokens(out["hs"], out["feats"], out.get("ca"), out.get("ks"), _signals(out), tower.drop_cls)

    def static_cls(self, out: dict, tower: ClipRun, units: torch.Tensor) -> TokenTable:
        """The [CLS] rows of the units ``units`` (:func:`clip_cls`, its own projector call)."""
        return clip_cls(out["hs"], out.get("ca"), out.get("ks"), _signals(out), self.core.multi_modal_projector, units)


def _signals(out: dict) -> dict:
    """The tower signals among :meth:`ClipAdapter.encode_static`'s outputs, by their flat names."""
    return {k[2:]: v for k, v in out.items() if k.startswith("x:")}
