"""Process rank / world size from the launcher, and the one collective the runner needs (a
barrier before the merge).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_ADDR / MASTER_PORT); the ``deepspeed``
launcher sets the same variables and also passes ``--local_rank=N`` on the command line. gloo is
used on CPU, nccl where CUDA is available (``--dist-backend`` overrides). The timeout is long
because ranks finish their shards at different times and wait at the barrier.
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(local_rank_arg: int | None = None) -> DistInfo:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local = env.get("LOCAL_RANK")
    local_rank = int(local) if local is not None else (local_rank_arg if local_rank_arg is not None else 0)
    if local_rank_arg is not None and local is not None and int(local) != local_rank_arg:
        raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local}")
    rank = int(env["RANK"]) if "RANK" in env else local_rank
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world} (check the launcher's RANK / WORLD_SIZE)")
    return DistInfo(rank=rank, world=world, local_rank=local_rank)


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
