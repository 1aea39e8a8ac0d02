"""FlowCut (NeurIPS 2025): the authors' package ``flowcut`` (PyPI ``flowcut==1.0.2``, installed in
``.venv-official``; GitHub ``TungChintao/FlowCut``, which ships ``flowcut/`` without a ``llava/`` tree).

- switch: ``flowcut.flowcut(model, target_num=T)`` (its README), which patches transformers' CLIP classes and
  LLaVA's multimodal code; on an anyres model (LLaVA-NeXT) also its LLM stage after decoder layer 1;
- kept indices: the ``all_keep_indices`` its patched ``CLIPEncoderLayer_forward`` returns as the third output
  (a forward hook on every CLIP layer; recorded after each layer whose output is shorter than its input), and on
  NeXT the ``keep_indices`` its patched ``LlamaDecoderLayer_forward`` appends to decoder layer ``prune_layer``'s
  outputs (``flowcut/modeling_llama_flowcut.py``);
- ours: ``flowcut`` in its reference mode (``numerics="official"``) with the official batch max
  (``batch_max=True``: the adaptive amount is the max over the images of one tower call); the tower cuts are
  recorded by wrapping the method's ``select_tower``.
"""

from __future__ import annotations

REPOSITORY = "TungChintao/FlowCut"
COMMIT = "a2ecd247cb3c605773ec317a0c246425b47abdbe"
PACKAGES = ("flowcut",)
INSTALLED = True


# ---- the official side (runs in .venv-official) ----

def enable(model, method: dict) -> None:
    from flowcut import flowcut

    flowcut(model, target_num=method["budget"])


def _tower_recorder(model, store: list) -> list:
    """Forward hooks on the CLIP encoder layers (flowcut's CLIPEncoderLayer_forward returns (outputs,
    cumulative_scores, all_keep_indices)): after each layer whose output is shorter than its input, the kept patch
    indices (0-based, ascending) per image."""
    layers = model.get_model().get_vision_tower().vision_tower.vision_model.encoder.layers
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, output, i=i):
            if not isinstance(output, tuple) or len(output) != 3:
                return
            outputs, _, keep = output
            n_in = (args[0] if args else None).shape[1]
            if outputs[0].shape[1] < n_in:
                store.append((i, keep.detach().cpu().clone()))
        handles.append(layer.register_forward_hook(hook))
    return handles


def _llm_recorder(model, store: list) -> list:
    """LLaVA-NeXT (``image_aspect_ratio anyres``): FlowCut's LLM stage. Its patched ``LlamaDecoderLayer_forward``
    appends the kept indices (into the sample's visual run, ascending, one row per pruned sample) as the last
    element of decoder layer ``prune_layer``'s outputs; recorded as ``("llm<layer>", indices)`` when present
    (prefill only: the decode steps do not prune)."""
    layer_idx = getattr(model.get_model(), "prune_layer", None)
    if getattr(model.config, "image_aspect_ratio", None) != "anyres" or layer_idx is None:
        return []
    import torch

    def hook(module, args, output):
        if isinstance(output, tuple) and len(output) > 1 and torch.is_tensor(output[-1]) and \
                output[-1].dtype == torch.long:
            store.append((f"llm{layer_idx}", output[-1].detach().cpu().clone()))

    return [model.get_model().layers[layer_idx].register_forward_hook(hook)]


def record(model, store: list) -> list:
    return _tower_recorder(model, store) + _llm_recorder(model, store)


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "flowcut", {"numerics": "official", "batch_max": True}


def record_ours(rt, store: list):
    from ._ours import record_tower_cuts

    record_tower_cuts(rt.engine.method, store)
    return None
