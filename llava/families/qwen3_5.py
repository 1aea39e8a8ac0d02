"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): Qwen3-VL's vision tower without DeepStack (a ViT with learned
interpolated position embeddings and 2-D RoPE, full attention in every block, a 2x2 merger, dynamic resolution,
no [CLS]) and a **hybrid** language model: ``layer_types`` interleaves Gated DeltaNet linear-attention layers
(a recurrent state per layer, no KV cache, no attention map) with gated full-attention layers (q / k norms per
head, partial M-RoPE, an output gate), three linear to one full in the released models.

* Vision side, positions (3-D M-RoPE from the model's own ``get_rope_index``, kept tokens keep theirs) and
  signals: as Qwen3-VL (:mod:`llava.families.qwen3_vl`, :mod:`llava.families.qwen_vision`).
* Pre-LLM methods hand the stock text model the pruned rows: its linear layers run their recurrence over the kept
  tokens only, so the state a decode step continues from is that of the pruned prompt (tested: cached
  generation == no-cache recompute).
* In-LLM stages run in the staged decoder, which gives each layer the mask of its type (``hybrid_layer_masks``);
  a stage may read attention only at a full-attention layer: ``linear_layers`` names the others, and a method
  whose stage reads one is refused at attach with the reason (``PruningEngine._check_hybrid``).
"""

from __future__ import annotations

from .qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    @property
    def deepstack_levels(self) -> int:
        return 0

    @property
    def linear_layers(self) -> frozenset[int]:
        """Decoder layers without attention (Gated DeltaNet)."""
        return frozenset(i for i, t in enumerate(self.lm.config.layer_types) if t != "full_attention")
