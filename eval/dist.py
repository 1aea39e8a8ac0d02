"""Process rank / world size from the launcher, and the one collective the runner needs (a
barrier before the merge).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_ADDR / MASTER_PORT); the ``deepspeed``
launcher sets the same variables and also passes ``--local_rank=N`` on the command line. gloo is
used on CPU, nccl where CUDA is available (``--dist-backend`` overrides). The timeout is long
because ranks finish their shards at different times and wait at the barrier.

Under tensor parallelism (``eval run --tp N``) the world is ``world / N`` groups of ``N`` consecutive
ranks (llava.tp.TPGroups builds the same groups): a group answers one shard of the questions
(``dp_rank`` of ``dp``), every rank of it runs the same batches, and only its first rank writes.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False
    backend: str | None = None
    tp: int = 1  # ranks per tensor-parallel group (consecutive ranks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        """How many shards the questions are cut into: one per tensor-parallel group."""
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        """The shard this rank's group answers."""
        return self.rank // self.tp

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's answers (the group's first rank)."""
        return self.rank % self.tp == 0


def detect(local_rank_arg: int | None = None, tp: int = 1) -> DistInfo:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local = env.get("LOCAL_RANK")
    local_rank = int(local) if local is not None else (local_rank_arg if local_rank_arg is not None else 0)
    if local_rank_arg is not None and local is not None and int(local) != local_rank_arg:
        raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local}")
    rank = int(env["RANK"]) if "RANK" in env else local_rank
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world} (check the launcher's RANK / WORLD_SIZE)")
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp}: the world of {world} process(es) must be a multiple of the tensor-parallel size "
                         f"(start NPROC x NNODES = a multiple of {tp} processes with LAUNCHER=deepspeed or torchrun)")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, tp=tp)


def init(info: DistInfo, backend: str | None = None, timeout_min: float = 720.0) -> DistInfo:
    """Join the process group when the world has more than one process."""
    if info.world <= 1:
        return info
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        info.initialized = True
        info.backend = dist.get_backend()
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    kwargs = dict(backend=backend, rank=info.rank, world_size=info.world,
                  timeout=datetime.timedelta(minutes=timeout_min))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # older torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    info.initialized = True
    info.backend = backend
    return info


def barrier(info: DistInfo) -> None:
    if info.initialized:
        import torch.distributed as dist

        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def broadcast_object(info: DistInfo, obj, src: int = 0):
    if not info.initialized:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def close(info: DistInfo) -> None:
    """Leave the process group (without this, rank 1 aborts with 'terminate called without an
    active exception' on exit)."""
    if info.initialized:
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - exiting anyway
            log.warning("destroy_process_group failed: %s", e)
        info.initialized = False
