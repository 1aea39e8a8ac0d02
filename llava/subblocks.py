"""Sub-block states of decoder layers (``Method.llm_subblock_layers``, ``LLMSignals.subblocks``): what the
attention sub-block and the feed-forward sub-block of a decoder layer took in and gave out during the prefill.

A decoder layer of every family the engine runs is ``h + attn(norm1(h))`` then ``h + mlp(norm2(h))`` (Gemma-style
post-norms aside); the four states are the inputs and outputs of its attention module (``self_attn``) and of its
feed-forward module (``mlp``): ``attn_in`` = the normed input of the attention, ``attn_out`` = what the attention
returns before the residual add (after ``o_proj``), ``mlp_in`` / ``mlp_out`` likewise. They are read with forward
hooks on those two sub-modules (pre-hooks for the inputs, hooks for the outputs), so the layer itself runs as the
stock model runs it (its attention backend, its arithmetic). The hooks only keep references to tensors the layer
computes anyway: no host read, no copy, nothing a captured prefill could not trace.

A recorder is installed for one prefill on the layers a method names and removed at its end; the engine hands a
stage the states of the layers that ran since the previous stage (the same rows as the stage's hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the sub-module names of a decoder layer, tried in order: attention, feed-forward
ATTENTION_MODULES = ("self_attn",)
FFN_MODULES = ("mlp", "feed_forward")


@dataclass
class SubBlockStates:
    """One decoder layer's sub-block states for one sample's rows, (S, D) each, in the model's dtype."""

    attn_in: torch.Tensor
    attn_out: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor

    def rows(self, idx) -> "SubBlockStates":
        return SubBlockStates(self.attn_in[idx], self.attn_out[idx], self.mlp_in[idx], self.mlp_out[idx])


def _submodule(layer: torch.nn.Module, names: tuple[str, ...], what: str, idx: int) -> torch.nn.Module:
    for n in names:
        m = getattr(layer, n, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise ValueError(f"decoder layer {idx} ({type(layer).__name__}) has no {what} sub-module named "
                     f"{' / '.join(names)}: its sub-block states cannot be recorded (a linear-attention layer?)")


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class SubBlockRecorder:
    """Forward hooks on the attention and feed-forward sub-modules of the given decoder layers. ``states[i]`` is the
    last call's :class:`SubBlockStates` of layer ``i`` (batched: (B, L, D) each); :meth:`take` hands out and forgets
    the layers recorded so far; :meth:`remove` takes the hooks off (always, also after an error)."""

    def __init__(self, layers, which):
        self.states: dict[int, dict] = {}
        self._handles = []
        for i in sorted(set(int(k) for k in which)):
            if not 0 <= i < len(layers):
                raise ValueError(f"sub-block states of decoder layer {i}: the model has {len(layers)} layers")
            attn = _submodule(layers[i], ATTENTION_MODULES, "attention", i)
            ffn = _submodule(layers[i], FFN_MODULES, "feed-forward", i)
            self._handles += [
                attn.register_forward_pre_hook(self._pre(i, "attn_in"), with_kwargs=True),
                attn.register_forward_hook(self._post(i, "attn_out")),
                ffn.register_forward_pre_hook(self._pre(i, "mlp_in"), with_kwargs=True),
                ffn.register_forward_hook(self._post(i, "mlp_out")),
            ]

    def _pre(self, i, key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            self.states.setdefault(i, {})[key] = x
        return hook

    def _post(self, i, key):
        def hook(module, args, out):
            self.states.setdefault(i, {})[key] = _first(out)
        return hook

    def take(self) -> dict[int, SubBlockStates]:
        out = {i: SubBlockStates(**d) for i, d in sorted(self.states.items()) if len(d) == 4}
        self.states = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.states = {}
