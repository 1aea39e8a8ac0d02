"""V2Drop (CVPR 2026, arXiv 2509.01552): the authors' repository ``xuyang-liu16/V2Drop``, a LLaVA tree at its root
whose LLaVA model's LLaMA is ``V2DropLlamaModel`` (``llava/model/language_model/V2Drop.py``; ``llava_llama.py``
builds the model on it, so loading the checkpoint with the repository's own builder switches it on: no flag).

- the official schedule: no budget exists; stages before layers {3, 17, 22} keep 0.5 / 0.5 / 0 of the current image
  tokens. On the tiny model the stage layers are **{1, 2, 3}** (the official ones of a 32-layer LLaMA mapped onto the
  4-layer one as ``llava.ops.scale_layers`` maps them), with the same keep ratios: 64 -> 32 -> 16 -> 1.
- shims: ``V2DropLlamaModel.forward`` compiled again from the clone's source with its literals replaced, each found
  exactly once: the image's start ``35`` (the vicuna_v1 prompt's) by the placeholder's position in the prompt (three
  places), the image length ``576`` and the test ``seq_len > 576`` by the tiny tower's 64 patches, the stage layers
  ``{3,17,22}`` and the ``current_layer == 3 / 17 / 22`` tests by 1 / 2 / 3. And each LLaMA attention of this
  environment's transformers takes its RoPE table up to the largest position id + 1 instead of its key count (what
  CLSE's vendored transformers changes): the official code keeps the kept tokens' original positions, which stock
  4.36 / 4.37 index beyond a table sliced to the shortened sequence (an index error); the rows are the same table's.
  Nothing else of the official code is changed.
- alone: the official code is batch-1 only (``[0]`` indexing, one fixed range): each image alone on both sides.
- kept indices: per stage, the visual rows entering decoder layer K (a pre-hook reads their ``position_ids``, which
  keep the original positions), as indices into the stage's candidates (the previous stage's kept rows), stages
  ``"llm1"``, ``"llm2"``, ``"llm3"``.
- ours: ``v2drop`` in its reference mode (``numerics="official"``: the difference and its norm in the model's dtype,
  ``torch.topk``) with the LLaVA rule's keep ratios and ``layers`` (1, 2, 3) unscaled; the earlier layers' caches are
  not pruned on either side.
"""

from __future__ import annotations

REPOSITORY = "xuyang-liu16/V2Drop"
COMMIT = "219e03ede8cf6a70d1534903fa238b13dd900bbb"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}
#: no budget: the official schedule (ours ignores the value; the report labels the run with it)
BUDGETS = (0,)

#: the official stage layers {3, 17, 22} on the 4-layer tiny LLaMA (``llava.ops.scale_layers([3, 17, 22], 4)``)
LAYERS = (1, 2, 3)
OFFICIAL_LAYERS = (3, 17, 22)
#: the tiny tower's patches (the official 576 is CLIP-L/336's)
PATCHES = 64


def edits(patches: int = PATCHES) -> list[tuple[str, str]]:
    """The literal replacements of the official forward (each pattern found exactly once)."""
    start = "self._parity_image_start"
    return [
        ("if current_hidden_states.size(1) > 576:", f"if current_hidden_states.size(1) > {patches}:"),
        ("image_token_amount = 576", f"image_token_amount = {patches}"),
        ("target_layer_indices = {3,17,22}", "target_layer_indices = {" + ",".join(map(str, LAYERS)) + "}"),
        ("candidate_indices = torch.arange(35, self.image_token_amount_after_selection + 35, device=device)",
         f"candidate_indices = torch.arange({start}, self.image_token_amount_after_selection + {start}, "
         "device=device)"),
        ("torch.arange(35, device=device), selected_indices, "
         "torch.arange(self.image_token_amount_after_selection + 35, current_seq_length, device=device)",
         f"torch.arange({start}, device=device), selected_indices, "
         f"torch.arange(self.image_token_amount_after_selection + {start}, current_seq_length, device=device)"),
        *[(f"if current_layer == {o}:", f"if current_layer == {t}:") for o, t in zip(OFFICIAL_LAYERS, LAYERS)],
    ]


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    from transformers.models.llama import modeling_llama as ml

    from llava.model.language_model.V2Drop import V2DropLlamaModel

    from .clse import recompile_forward  # CLSE's adapter: the same literal shim

    recompile_forward(V2DropLlamaModel, edits())
    # kept tokens keep their original positions: the RoPE table up to the largest position + 1 (same rows)
    for cls in (ml.LlamaAttention, ml.LlamaSdpaAttention):
        recompile_forward(cls, [("seq_len=kv_seq_len)", "seq_len=position_ids.max().item() + 1)")])
    from . import _official

    _official.cpu_cuda_timing(memory=True)  # the official generate() times itself (llava_llama.py 126-140)


def enable(model, method: dict) -> None:
    if int(model.get_vision_tower().num_patches) != PATCHES:
        raise ValueError(f"v2drop: the tiny tower has {model.get_vision_tower().num_patches} patches, not {PATCHES}")
    if len(model.get_model().layers) != 4:
        raise ValueError("v2drop: the stage layers 1 / 2 / 3 are those of the 4-layer tiny LLaMA")


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    if input_ids.shape[0] != 1:
        raise ValueError("v2drop: the official code runs one sample at a time (OFFICIAL['alone'])")
    row = [int(t) for t in input_ids[0]]
    if row.count(-200) != 1:
        raise ValueError("v2drop: one image placeholder expected")
    model.get_model()._parity_image_start = row.index(-200)
    return {}


def record(model, store: list) -> list:
    """Pre-hooks on decoder layers K: in the prefill their ``position_ids`` hold the kept rows' original positions."""
    import torch

    inner = model.get_model()
    seen: dict = {}

    def hook_for(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1 or layer in seen:
                return
            start = inner._parity_image_start
            pos = kwargs["position_ids"][0]
            vis = pos[(pos >= start) & (pos < start + PATCHES)] - start
            prev = seen.get(max([k for k in seen if k < layer], default=-1), torch.arange(PATCHES))
            seen[layer] = vis
            store.append((f"llm{layer}", torch.searchsorted(prev, vis)[None].cpu()))
        return hook

    class Handle:
        def __init__(self, h):
            self.h = h

        def remove(self):
            self.h.remove()
            seen.clear()

    # the worker's forward and generate() each run a prefill: the first one is recorded
    return [Handle(inner.layers[k].register_forward_pre_hook(hook_for(k), with_kwargs=True)) for k in LAYERS]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "v2drop", {"budget": None, "numerics": "official", "rule": "llava", "layers": LAYERS,
                      "scale_layers": False}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)
