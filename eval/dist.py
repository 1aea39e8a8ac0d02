"""Process rank / world size from the launcher, and the one collective the runner needs (a
barrier before the merge).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_ADDR / MASTER_PORT); the ``deepspeed``
launcher sets the same variables and also passes ``--local_rank=N`` on the command line. Where none of
them is set, Slurm's are read: processes started by ``srun`` (a job step) are ranks ``SLURM_PROCID`` of
``SLURM_STEP_NUM_TASKS`` (``SLURM_LOCALID`` on their node), so ``srun -n 4 python -m eval run ...``
is one world of four, not four worlds of one. The batch script itself (not a step: it has
``SLURM_NTASKS`` and ``SLURM_PROCID=0`` but no ``SLURM_STEP_NUM_TASKS``) stays a world of one. For such a
world, MASTER_ADDR defaults to the address of the step's first node (``scontrol show node``) and
MASTER_PORT to a port derived from the job id (two jobs sharing a node do not collide). gloo is
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
import re
import shutil
import subprocess
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
    source: str = "single"  # where rank / world came from: "single", "launcher" (RANK / WORLD_SIZE), "slurm"

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


def slurm_step(env=None) -> tuple[int, int, int] | None:
    """(rank, world, local rank) of a process that ``srun`` started as one task of a job step, else None (no
    Slurm, or the batch script itself: Slurm sets SLURM_STEP_NUM_TASKS for a step's tasks only)."""
    env = os.environ if env is None else env
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return None
    try:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    except ValueError:
        raise ValueError(f"unreadable Slurm task variables: SLURM_PROCID={env.get('SLURM_PROCID')!r} "
                         f"SLURM_STEP_NUM_TASKS={env.get('SLURM_STEP_NUM_TASKS')!r}") from None


def detect(local_rank_arg: int | None = None, tp: int = 1) -> DistInfo:
    env = os.environ
    step = slurm_step(env) if "RANK" not in env and "WORLD_SIZE" not in env else None
    if step is not None:  # srun started this process (no torchrun / deepspeed launcher in between)
        rank, world, local_rank = step
        source = "slurm"
    else:
        world = int(env.get("WORLD_SIZE", "1"))
        local = env.get("LOCAL_RANK")
        local_rank = int(local) if local is not None else (local_rank_arg if local_rank_arg is not None else 0)
        if local_rank_arg is not None and local is not None and int(local) != local_rank_arg:
            raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local}")
        rank = int(env["RANK"]) if "RANK" in env else local_rank
        source = "launcher" if "RANK" in env or "WORLD_SIZE" in env else "single"
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world} (check the launcher's RANK / WORLD_SIZE"
                         f"{' / SLURM_PROCID / SLURM_STEP_NUM_TASKS' if source == 'slurm' else ''})")
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp}: the world of {world} process(es) must be a multiple of the tensor-parallel size "
                         f"(start NPROC x NNODES = a multiple of {tp} processes with LAUNCHER=deepspeed or torchrun)")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, tp=tp, source=source)


def slurm_port(job_id: str | int) -> int:
    """A rendezvous port of the job's own: 20000 + job id mod 20000 (two jobs on one node take different ports
    unless their ids are 20000 apart)."""
    return 20000 + int(job_id) % 20000


def slurm_master_addr(env=None) -> str:
    """The address of the Slurm step's first node: its NodeAddr as ``scontrol show node`` gives it (a node's name
    need not resolve; its NodeAddr does), the name itself when scontrol cannot say, 127.0.0.1 on one node."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1) <= 1 or not shutil.which("scontrol"):
        return "127.0.0.1"
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=60, check=True).stdout.split()[0]
    except (subprocess.SubprocessError, OSError, IndexError):
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        return m.group(1) if m else first
    except (subprocess.SubprocessError, OSError):
        return first


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
    if info.source == "slurm":  # srun started the ranks: the step's first node hosts the rendezvous
        # and the launcher's variables are set as torchrun would, for what reads them later (DeepSpeed's
        # init_distributed under --tp would otherwise look for MPI)
        os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world), LOCAL_RANK=str(info.local_rank))
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = slurm_master_addr()
        if "MASTER_PORT" not in os.environ and "SLURM_JOB_ID" in os.environ:
            os.environ["MASTER_PORT"] = str(slurm_port(os.environ["SLURM_JOB_ID"]))
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
