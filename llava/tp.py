"""DeepSpeed inference for a runtime, tensor parallelism of the language model included.

``deepspeed_inference(rt, tp_size)`` puts ``rt.model`` through ``deepspeed.init_inference`` with kernel
injection off (the pruning engine's hooks and SDPA / FlashAttention stay in place). At ``tp_size`` > 1
DeepSpeed's AutoTP shards the **language model only**:

* the policy (:func:`lm_policy`) names the LLM's attention and MLP classes, so their ``o_proj`` /
  ``down_proj`` become row-parallel (an all-reduce after them) and the other linears of those modules
  (q / k / v, gate / up) column-parallel, split at head boundaries; ``lm_head`` is row-parallel. The vision
  tower and projector are replicated (AutoTP's default policy would shard them too: Qwen2.5-VL's fused
  ``attn.qkv`` is then split naively and fails, and the [CLS] / key signals of CLIP towers would see only
  a rank's heads). Qwen3.5's Gated DeltaNet layers are replicated as well (their fused projections cannot
  be split by name); its full-attention layers and every MLP are sharded.
* the engine's LLM signals (:class:`llava.attention_rows.LayerQK`: the attention rows FastV, PyramidDrop,
  SparseVLM, DART, VScan, VisionDrop and ConsensusDrop read) gather the q / k projections' shards across
  the group (:func:`llava.tp_shards.full_width`), so every rank computes the unsharded model's signal and selects
  the same tokens; a projection whose width is not the config's heads is refused, never read from a rank's heads.
* ranks form ``world / tp`` groups of consecutive ranks (:class:`TPGroups`, the ``mpu`` DeepSpeed takes):
  data parallelism across groups, tensor parallelism inside one.

On a CPU (the tests) DeepSpeed's shared-memory all-reduce op is switched off: it reduces across every local
rank whatever the group (wrong with two groups) and compiles for minutes on first use; gloo's all-reduce is
used instead.

What the engine itself reads of a sharded model (:func:`llava.tp_shards.full_width`, ``sharded_module``) lives in
:mod:`llava.tp_shards`: this file names ``llava.models``' ``Runtime``, which imports the engine.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .models import Runtime

#: what AutoTP makes row-parallel in each policy module (an all-reduce after it)
ROW_PARALLEL = {"attention": "o_proj", "mlp": "down_proj"}


class TPGroups:
    """The process groups of a world of ``world`` ranks in ``world // tp`` tensor-parallel groups of ``tp``
    consecutive ranks (ranks 0..tp-1 are group 0), and the data-parallel groups across them (one rank of
    each group). The model-parallel unit (``mpu``) DeepSpeed's ``init_inference`` accepts. Every rank must
    build it (``torch.distributed.new_group`` is collective)."""

    def __init__(self, tp: int):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs the process group (torch.distributed) initialized first")
        self.tp, self.world, self.rank = int(tp), dist.get_world_size(), dist.get_rank()
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"the world size ({self.world} processes) must be a multiple of the tensor-parallel "
                             f"size ({self.tp})")
        self.dp = self.world // self.tp
        self.tp_rank, self.dp_rank = self.rank % self.tp, self.rank // self.tp
        self.tp_group = self.dp_group = None
        for g in range(self.dp):
            group = dist.new_group(list(range(g * self.tp, (g + 1) * self.tp)))
            if g == self.dp_rank:
                self.tp_group = group
        for t in range(self.tp):
            group = dist.new_group(list(range(t, self.world, self.tp)))
            if t == self.tp_rank:
                self.dp_group = group

    # the mpu interface (Megatron's names)
    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def as_dict(self) -> dict:
        return {"tp": self.tp, "dp": self.dp, "tp_rank": self.tp_rank, "dp_rank": self.dp_rank}


def lm_policy(model: torch.nn.Module, lm: torch.nn.Module) -> dict[type, tuple[str, ...]]:
    """AutoTP's injection policy that shards the language model ``lm`` only: {the decoder layers' attention
    class: (".o_proj",), their MLP class: (".down_proj",)} (AutoTP matches the child's name as it spells it
    under a policy module: a leading dot). Refused (ValueError, the reason) when a decoder
    layer lacks them or when a module outside ``lm`` has one of those classes (it would be sharded too)."""
    policy: dict[type, tuple[str, ...]] = {}
    for i, layer in enumerate(lm.layers):
        for kind, attr in (("attention", "self_attn"), ("mlp", "mlp")):
            mod = getattr(layer, attr, None)
            if mod is None:
                if kind == "attention" and hasattr(layer, "linear_attn"):
                    continue  # a hybrid model's linear-attention layer: replicated
                raise ValueError(f"tensor parallelism: decoder layer {i} ({type(layer).__name__}) has no {attr}")
            out = ROW_PARALLEL[kind]
            if not isinstance(getattr(mod, out, None), torch.nn.Linear):
                raise ValueError(f"tensor parallelism: {type(mod).__name__} (decoder layer {i}) has no linear {out} "
                                 "to make row-parallel (a mixture-of-experts MLP?): not supported")
            policy[type(mod)] = ("." + out,)  # AutoTP names a policy module's child "." + its name
    inside = {id(m) for m in lm.modules()}
    for name, mod in model.named_modules():
        if type(mod) in policy and id(mod) not in inside:
            raise ValueError(f"tensor parallelism: {name} ({type(mod).__name__}) outside the language model has the "
                             "class of a decoder module and would be sharded too: not supported")
    return policy


def rank_params(model: torch.nn.Module, tp: int) -> dict[str, int]:
    """Parameters each rank holds under :func:`deepspeed_inference` at ``tp``: what :func:`lm_policy` shards
    (every linear of the decoder layers' attention and MLP modules, and ``lm_head``) split ``tp`` ways, the rest
    (towers, projector, token embeddings, norms, a hybrid model's linear-attention layers) whole on every rank.
    {"total", "sharded", "replicated", "per_rank"} (``per_rank``: the largest rank's share of an uneven split,
    at most one AutoTP block more than ``sharded / tp``; counted here as ``ceil(sharded / tp)``). Works on a
    model built on the meta device (no memory)."""
    lm = model.model.language_model
    policy = lm_policy(model, lm)
    sharded: dict[int, int] = {}
    for mod in model.modules():
        if type(mod) in policy:
            for sub in mod.modules():
                if isinstance(sub, torch.nn.Linear):
                    sharded.update({id(p): p.numel() for p in sub.parameters()})
    head = model.get_output_embeddings()
    if head is not None and head.weight is not lm.embed_tokens.weight:  # a tied head stays whole with the embeddings
        sharded.update({id(p): p.numel() for p in head.parameters()})
    total = sum(p.numel() for p in model.parameters())
    n = sum(sharded.values())
    return {"total": total, "sharded": n, "replicated": total - n, "per_rank": total - n + -(-n // int(tp))}


def grain_size(text_config, tp: int) -> int:
    """AutoTP's split granularity of the MLP and ``lm_head``: 64 (its default; a dimension that 64 x tp does not
    divide is split unevenly, whole 64-wide blocks per rank) unless a split dimension has fewer than 64 x tp
    features, where a rank would get nothing (the width-64 test models: an empty ``lm_head`` shard): then 8."""
    dims = [text_config.hidden_size, getattr(text_config, "intermediate_size", None) or text_config.hidden_size]
    return 64 if all(d >= 64 * tp for d in dims) else 8


def _cpu_collectives(deepspeed) -> None:
    """DeepSpeed's communication on a CPU: plain gloo all-reduce (the shared-memory op off; see the module
    docstring). Must run before DeepSpeed builds its backend."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _free_port() -> int:
    """A TCP port free on this host now (bound to port 0, the number read, the socket closed)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_inference(rt: Runtime, tp_size: int = 1, dtype=None, groups: TPGroups | None = None) -> Runtime:
    """Put ``rt.model`` through ``deepspeed.init_inference`` (the ``deepspeed`` extra), kernel injection off;
    attach methods after this call. ``tp_size`` > 1: the language model sharded across the ranks of this
    process's tensor-parallel group (``groups``, default :class:`TPGroups` of ``tp_size`` over the initialized
    world), the rest replicated; the model then sits on DeepSpeed's current device (load it on the CPU first
    when one GPU cannot hold all of it: the harness does at tp > 1). A single process without a launcher gets a
    one-rank group (MASTER_ADDR / PORT defaults)."""
    if not torch.cuda.is_available():  # before DeepSpeed picks its accelerator (a model on the CPU may be bound for a GPU)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError("DeepSpeed inference needs the deepspeed package: pip install -e '.[deepspeed]'") from None
    from .dtypes import parse_dtype as _dtype

    if rt.engine is not None and not rt.engine_by_load:
        raise ValueError("call deepspeed_inference before attaching a pruning method")
    reattach = rt.engine is not None  # load's unpruned engine (fast / vision_dtype): attached again afterwards
    rt.unprune(detach=True)
    tp = int(tp_size)
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    if "MASTER_PORT" not in os.environ:  # one process: any free port (two jobs on a node must not share one)
        os.environ["MASTER_PORT"] = str(_free_port())
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    dtype = _dtype(dtype) or next(rt.model.parameters()).dtype
    info = {"version": deepspeed.__version__, "tp_size": tp, "kernel_inject": False}
    if tp == 1:
        eng = deepspeed.init_inference(rt.model, tensor_parallel={"tp_size": 1}, dtype=dtype,
                                       replace_with_kernel_inject=False)
    else:
        if rt.fast is not None:
            raise ValueError("tensor parallelism runs the eager engine: the fast path (captured prefills) does not "
                             "capture the all-reduces; load without fast=True")
        lm = rt.model.model.language_model
        policy = lm_policy(rt.model, lm)
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            _cpu_collectives(deepspeed)
        groups = groups or TPGroups(tp)
        if groups.tp != tp:
            raise ValueError(f"groups of {groups.tp} ranks for a tensor-parallel size of {tp}")
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        grain = grain_size(lm.config, tp)
        # the group twice: DeepSpeed 0.19 takes the mpu's group for itself but shards from tp_group (with the mpu
        # alone it leaves tp_group unset and replaces the linears without splitting them)
        eng = deepspeed.init_inference(rt.model, tensor_parallel={"tp_size": tp, "mpu": groups, "tp_group": groups.tp_group,
                                                                  "tp_grain_size": grain},
                                       dtype=dtype, replace_with_kernel_inject=False, injection_policy=policy)
        info.update(tp_grain_size=grain, groups=groups.as_dict(),
                    sharded={c.__name__: list(v) for c, v in policy.items()}, replicated="vision tower, projector")
    rt.model = eng.module
    rt.info["deepspeed"] = info
    if reattach:
        rt.prune("none")
        rt.engine_by_load = True
    return rt
