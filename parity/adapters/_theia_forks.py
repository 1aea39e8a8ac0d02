"""The official half's glue shared by the adapters of three LLaVA forks by the same author (Theia-4869: FasterVLM,
VisPruner, CDPruner), loaded by its file path in ``.venv-official``: standard library only at module
level, like an adapter (each adapter's ``_forks()`` loads it).

The three forks change ``encode_images`` to return the kept patches as a boolean ``index_masks`` (B, N), and their
eval scripts only ever call ``model.generate(...)``: the fork's ``generate`` runs its own
``prepare_inputs_labels_for_multimodal`` (which returns 7 or 8 values on the image path) and returns
``(output_ids, visual_token_num[, cls_attn])``, while the fork's ``forward`` unpacks 6 values from the same function,
so a forward with images raises. :func:`glue` gives the loaded model instance methods that do what the fork's
``generate`` does: ``forward`` with images = the fork's ``prepare_inputs_labels_for_multimodal`` (its first six
outputs), then ``LlamaForCausalLM.forward`` on the embeddings (the fork's first generation step); ``generate`` = the
fork's ``generate``, its output ids. Nothing of the method is replaced.
"""

from __future__ import annotations


class Restore:
    """A handle whose ``remove()`` puts an instance attribute back (the worker calls ``remove()`` on hook handles)."""

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name
        self.had = name in vars(obj)
        self.old = vars(obj).get(name)

    def remove(self) -> None:
        if self.had:
            setattr(self.obj, self.name, self.old)
        elif self.name in vars(self.obj):
            delattr(self.obj, self.name)


def glue(model, prepare_keywords: tuple = ()) -> None:
    """Instance ``forward`` / ``generate`` on the loaded fork model (module docstring). ``prepare_keywords``: keyword
    arguments the fork's ``generate`` hands to ``prepare_inputs_labels_for_multimodal`` besides LLaVA's (CDPruner:
    ``texts``); the forward takes them too (the fork's ``forward`` has no such parameter)."""
    cls = type(model)
    base = cls.__mro__[1]  # LlamaForCausalLM: what the fork's forward calls as super().forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, images=None, image_sizes=None, **kwargs):
        extra = {k: kwargs.pop(k) for k in prepare_keywords if k in kwargs}
        if inputs_embeds is None and images is not None and input_ids.shape[1] > 1:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = \
                model.prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask, past_key_values,
                                                           labels, images, image_sizes=image_sizes, **extra)[:6]
            return base.forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        return cls.forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, images=images,
                           image_sizes=image_sizes, **kwargs)

    def generate(*args, **kwargs):
        out = cls.generate(model, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    model.forward = forward
    model.generate = generate


def record_masks(model, store: list, stage: str = "vision") -> list:
    """Wrap the model's ``encode_images`` (an instance attribute, put back by the returned handle): after each call
    the kept patches of each image, the returned ``index_masks`` (B, N) as ascending indices, as ``(stage, (B, k))``."""
    handle = Restore(model, "encode_images")
    inner = model.encode_images

    def encode_images(*args, **kwargs):
        out = inner(*args, **kwargs)
        store.append((stage, mask_indices(out[1])))
        return out

    model.encode_images = encode_images
    return [handle]


def mask_indices(masks):
    """(B, N) boolean masks -> (B, k) ascending indices of the True entries; rows with fewer than the longest are
    padded with -1 (never equal to a real index, so a ragged row cannot compare equal to a full one)."""
    import torch

    rows = [m.nonzero().flatten().cpu() for m in masks]
    k = max((len(r) for r in rows), default=0)
    return torch.stack([torch.cat([r, r.new_full((k - len(r),), -1)]) for r in rows])


#: the literal VisPruner's and CDPruner's ``select_best_resolution`` fix every LLaVA-NeXT grid with (2 x 2 crops of
#: CLIP-L/336: "[VisPruner] Fix resolution for LLaVA-NeXT to get 2880 visual tokens")
FIXED_RESOLUTION_LITERAL = r"possible_resolutions = \[\(672, 672\)\]"


def fixed_resolution(side: int) -> None:
    """The fork's ``select_best_resolution`` recompiled from its own source with the one literal ``[(672, 672)]``
    (2 x 2 crops of CLIP-L/336) replaced by ``[(side, side)]`` (2 x 2 crops of the tiny tower), put back in
    ``llava.mm_utils`` (``process_anyres_image`` and ``get_anyres_image_grid_shape`` call it from there)."""
    import inspect
    import re

    import llava.mm_utils as mm

    fn = getattr(mm, "_parity_original_select_best_resolution", mm.select_best_resolution)
    src = inspect.getsource(fn)
    hits = re.findall(FIXED_RESOLUTION_LITERAL, src)
    if len(hits) != 1:
        raise RuntimeError(f"parity adapter: expected one {FIXED_RESOLUTION_LITERAL!r} in the fork's "
                           f"select_best_resolution, found {len(hits)}")
    code = compile(re.sub(FIXED_RESOLUTION_LITERAL, f"possible_resolutions = [({side}, {side})]", src),
                   inspect.getsourcefile(fn), "exec")
    scope: dict = {}
    exec(code, mm.__dict__, scope)
    mm._parity_original_select_best_resolution = fn
    mm.select_best_resolution = scope["select_best_resolution"]
