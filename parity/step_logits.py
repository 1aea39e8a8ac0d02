"""Each decode step's two largest logits, on both sides: the official workers load this file from their own folder
(``import step_logits``), ours imports it (``parity.step_logits``). Plain torch, imported inside the functions and
nothing of this repository: it runs in the official environments' older releases too."""


def record_top2(model, store: list):
    """A forward hook on ``model``'s output embeddings (``lm_head``): per call, the last position's two largest logits
    (fp32, ``(B, 2)``) and their token ids, appended to ``store``. Hooked around ``generate`` it records one entry per
    generated token. Returns the handle (``.remove()``)."""

    def hook(module, args, out):
        last = out[:, -1] if out.dim() == 3 else out
        values, ids = last.float().topk(2, dim=-1)
        store.append((values.cpu(), ids.cpu()))

    return model.get_output_embeddings().register_forward_hook(hook)


def stacked(store: list):
    """:func:`record_top2`'s entries as ``{"logits": (steps, B, 2), "ids": (steps, B, 2)}`` (None: none recorded)."""
    import torch

    if not store:
        return None
    return {"logits": torch.stack([v for v, _ in store]), "ids": torch.stack([i for _, i in store])}
