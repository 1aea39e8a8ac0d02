"""Signals of the stages at the vision tower, handed to methods: an in-tower stage's (:class:`TowerSignals`, one batched
call between two encoder layers: :meth:`llava.method.Method.select_tower`) and a pre-tower stage's
(:class:`PixelSignals`, one image's pixels before the tower runs: :meth:`llava.method.Method.select_pixels`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TowerSignals:
    """One batched call of an in-tower stage (:meth:`llava.method.Method.select_tower`): ``n`` units
    (images / crops / frames) right after vision encoder layer ``layer`` ran on their ``S`` current
    tokens ([CLS] first, then the surviving patches in original order).

    layer:        0-based index of the encoder layer that just ran.
    module:       that layer (a ``CLIPEncoderLayer``: ``layer_norm1``, ``self_attn.{q,k,v}_proj``, ...).
    hidden_in:    (n, S, D) its input hidden states.
    hidden_out:   (n, S, D) its output.
    patch:        (n, S) the original patch index of every current token (row-major in the unit's
                  grid), -1 for [CLS].
    select_layer: 0-based index of the encoder layer whose output the model feeds to the projector
                  (``hidden_states[vision_feature_layer]``; 22 on CLIP-L/14 with -2, 1 on a 3-layer tower).
    num_layers:   the tower's encoder layers.
    kind:         "image" / "crop" / "frame".
    cls_in_llm:   True when the unit's [CLS] enters the LLM (Video-LLaVA frames), False when the model
                  drops it (LLaVA-1.5 images, NeXT crops).
    Helpers (fp32, computed on first use from the layer's own ``layer_norm1`` + q/k/v projections of
    ``hidden_in``, so the tower itself keeps its attention backend): :meth:`cls_attention`,
    :meth:`values`.

    Masked tower (the fast path's captured prefill, :func:`llava.families.clip.run_tower_masked`): every
    unit keeps its full static token count S, and ``key_mask`` (n, S) bool flags the tokens still present
    (the layer attended to those only); ``captured`` is True. :meth:`cls_attention` is then the softmax over
    the present tokens only (exactly 0 at the others), :meth:`num_kept` the present count per unit on the
    device, and :meth:`masked_softmax` a softmax over the present tokens; methods answer through
    ``select_tower_masked(layer, sig)`` with the new (n, S) mask (no host read).
    """

    layer: int
    module: torch.nn.Module
    hidden_in: torch.Tensor
    hidden_out: torch.Tensor
    patch: torch.Tensor
    select_layer: int
    num_layers: int
    kind: str = "image"
    cls_in_llm: bool = False
    #: per-token tensors (n, S, ...) the method keeps for its next call on these units (e.g. FlowCut's
    #: cumulative scores); the engine gathers them with the survivors and splits them with the units
    state: dict = field(default_factory=dict)
    #: masked tower only: (n, S) bool, the tokens still present ([CLS] = column 0, always True); None: every
    #: current token is present (the eager, gathered tower)
    key_mask: torch.Tensor | None = None
    #: True inside a captured prefill (the masked tower): no host read of a device value
    captured: bool = False
    _cache: dict = field(repr=False, default_factory=dict)

    @property
    def num_units(self) -> int:
        return int(self.hidden_in.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.hidden_in.shape[1])

    def _normed(self) -> torch.Tensor:
        if "xn" not in self._cache:
            self._cache["xn"] = self.module.layer_norm1(self.hidden_in)
        return self._cache["xn"]

    def _heads(self, proj: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = self.module.self_attn
        return proj(x).view(*x.shape[:2], attn.num_heads, attn.head_dim).float()

    def cls_attention(self) -> torch.Tensor:
        """(n, H, S): per head, the [CLS] query's softmax(q k^T * scale) over all S current tokens
        ([CLS] included), as the layer computed it (with a ``key_mask``: over the present tokens only)."""
        if "cls_attn" not in self._cache:
            attn = self.module.self_attn
            xn = self._normed()
            q = self._heads(attn.q_proj, xn[:, :1])
            k = self._heads(attn.k_proj, xn)
            scores = torch.einsum("nqhd,nshd->nhqs", q, k) * attn.scale
            self._cache["cls_attn"] = (scores.softmax(-1)[:, :, 0] if self.key_mask is None
                                       else self.masked_softmax(scores[:, :, 0]))
        return self._cache["cls_attn"]

    def masked_softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """softmax over the last axis (the S tokens) of ``scores`` (n, ..., S), over the present tokens only
        when there is a ``key_mask`` (the others masked to -inf: exactly 0 probability; [CLS] is always
        present, so no row is empty)."""
        if self.key_mask is not None:
            m = self.key_mask.view(self.key_mask.shape[0], *([1] * (scores.dim() - 2)), self.key_mask.shape[1])
            scores = scores.masked_fill(~m, float("-inf"))
        return scores.softmax(-1)

    def num_kept(self) -> torch.Tensor:
        """(n,) long on the device: the tokens present per unit ([CLS] included); S each without a mask."""
        if self.key_mask is None:
            return torch.full((self.num_units,), self.num_tokens, dtype=torch.long, device=self.hidden_in.device)
        return self.key_mask.sum(1)

    def values(self) -> torch.Tensor:
        """(n, S, H, d): the layer's value vectors per head (``v_proj`` output, bias included)."""
        if "values" not in self._cache:
            self._cache["values"] = self._heads(self.module.self_attn.v_proj, self._normed())
        return self._cache["values"]


@dataclass
class PixelSignals:
    """One image before its vision tower runs (a pre-tower stage, :meth:`llava.method.Method.select_pixels`): its
    visual tokens as the pixel blocks the tower would read. ``T`` = the image's visual tokens (Qwen: merged 2x2
    patch blocks), in raster order over ``grid``.

    pixels: (T, P) fp32 in [0, 1]: each token's pixels in the processor's resized image with the family's
            normalisation undone (:attr:`llava.families.base.FamilyAdapter.pixel_norm`), flattened (Qwen: its
            2 x 2 patches x 3 channels x p x p of the first temporal frame); token i lies at row ``i // cols``,
            column ``i % cols`` of ``grid``. On the device the pixels were given on.
    grid:   (rows, cols) of tokens (host ints).
    unit:   the image's index among the call's images (host int).
    """

    pixels: torch.Tensor
    grid: tuple[int, int]
    unit: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.pixels.shape[0])
