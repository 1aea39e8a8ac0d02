"""A run's model inputs prepared ahead of the device: ``eval run --loader-workers N``.

Each batch's host work - the input files' content hashes, reading and decoding the image / video, the processor
(pixels, prompt, tokenisation) - is :func:`prepare`; it is the same code with or without workers, so the answers
are the same bytes. With ``N > 0`` it runs in ``N`` forked worker processes of a ``torch.utils.data.DataLoader``
(LLaVA's ``model_vqa_loader.py`` does the same with 4 workers) while the main process answers the batches before:
batches come back in question order, their tensors pinned on a GPU run so that the copy to the device does not
wait (``non_blocking``). ``N = 0`` prepares each batch in the answering loop, just before it is answered.

What the loop guarantees holds with workers: a batch whose input cannot be read comes back as its
:class:`eval.shards.InputError` (never raised in the worker), raised when the loop reaches it - after every batch
before it is answered and on disk, with the same message as in the loop; a killed run's workers die with it
(``PR_SET_PDEATHSIG`` on Linux); Ctrl-C stops them quietly (the DataLoader's workers ignore it, the main process
says its one line).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .shards import InputError, read_input

log = logging.getLogger("eval")

#: LLaVA's model_vqa_loader.py: DataLoader(num_workers=4)
LLAVA_WORKERS = 4
#: a worker hands tensors up to this size back as bytes through its pipe (one copy, ~0.6 ms a batch of LLaVA-1.5's
#: pixels and ids), larger ones in shared memory (a file descriptor passed per tensor: ~0.5 ms each, whatever the size)
BY_VALUE_BYTES = 8 << 20


@dataclass
class Prepared:
    """One batch's host work, done: its position, the inputs' hashes (taken before reading), the processor's
    CPU tensors, or the :class:`InputError` that stopped it; ``prepare_s``: the seconds it took (in a worker:
    hidden behind the device when the loop did not wait for it)."""

    index: int
    hashes: list = field(default_factory=list)
    inputs: dict | None = None
    error: Exception | None = None
    prepare_s: float = 0.0

    def pin_memory(self, device=None):
        """The DataLoader's pin thread calls this: the tensors in page-locked memory (non-blocking copies)."""
        self.unpack()
        if self.inputs is not None:
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        return self

    def pack(self) -> "Prepared":
        """In a worker: the tensors up to :data:`BY_VALUE_BYTES` as plain bytes (their dtype and shape beside), so
        that they travel in the pipe, not as shared-memory handles (bfloat16 too: its bits are carried as bytes)."""
        import torch

        if self.inputs is not None:
            self.inputs = {k: ((v.contiguous().view(-1).view(torch.uint8).numpy(), v.dtype, tuple(v.shape))
                               if v.nbytes <= BY_VALUE_BYTES else v) for k, v in self.inputs.items()}
        return self

    def unpack(self) -> "Prepared":
        """The packed tensors back, bit for bit (idempotent)."""
        import torch

        if self.inputs is not None:
            self.inputs = {k: (torch.from_numpy(v[0]).view(v[1]).reshape(v[2]) if isinstance(v, tuple) else v)
                           for k, v in self.inputs.items()}
        return self


class BatchInputs:
    """The batches of one rank's answering loop as a map-style dataset: item ``i`` is batch ``i`` prepared
    (:func:`prepare`). ``answered_before[i]``: the answers this session saves before batch ``i`` (an
    :class:`InputError` says it, as the loop does)."""

    def __init__(self, batches: list[list], processor, root, shard: Path):
        from .fingerprint import InputHasher

        self.batches, self.processor, self.shard = batches, processor, shard
        self.packed = False  # set for workers: the tensors travel packed (Prepared.pack)
        self.hasher = InputHasher(root)  # each answer records the content hash of the inputs it read
        self.answered_before, n = [], 0
        for b in batches:
            self.answered_before.append(n)
            n += len(b)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Prepared:
        p = prepare(self.batches[i], i, self.processor, self.hasher, self.answered_before[i], self.shard)
        return p.pack() if self.packed else p


def prepare(batch: list, index: int, processor, hasher, answered_before: int, shard: Path) -> Prepared:
    """Batch ``index``'s inputs as the model takes them (CPU tensors): the inputs' hashes first (what was read is
    at least this recent), then each question's image / video read and the processor run over the batch. An
    input that cannot be read is returned as its :class:`InputError`, not raised."""
    from llava.preprocess import load_image

    t0 = time.perf_counter()
    out = Prepared(index, hashes=[hasher.inputs(q) for q in batch])
    texts = [q.text for q in batch]

    def read(q, fn, what):
        return read_input(q, fn, what, answered_before, shard)

    try:
        if batch[0].modality == "video":
            from .benchmarks.videoqa import load_video

            videos = [read(q, lambda q=q: load_video(q.video, processor.num_frames), "video") for q in batch]
            out.inputs = processor(texts, videos=videos)
        elif batch[0].modality == "image":
            pil = [read(q, lambda q=q: load_image(q.load_image()), "image") for q in batch]
            out.inputs = processor(texts, images=pil)
        else:
            out.inputs = processor(texts, images=[None] * len(batch))
    except InputError as e:
        out.error = e
    out.prepare_s = time.perf_counter() - t0
    return out


def default_workers() -> int:
    """LLaVA's 4 loader workers, within this process's share of the cores (the cores it may run on over the
    processes of this node, less one for the answering loop itself): 0 on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(LLAVA_WORKERS, cores // max(_local_processes(), 1) - 1))


def _local_processes() -> int:
    """The processes of this run on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, or
    the tasks of this node in a Slurm job step (``SLURM_STEP_TASKS_PER_NODE``, e.g. ``4(x2),3``: 4, 4 and 3 tasks
    on the step's nodes, this one ``SLURM_NODEID``); 1 otherwise. (Slurm binding each task to its own cores already
    narrows the affinity mask.)"""
    env = os.environ
    n = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
    if n:
        return int(n)
    counts = []
    for part in (env.get("SLURM_STEP_TASKS_PER_NODE") or "").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID") or 0)
    return counts[node] if node < len(counts) else 1


#: a worker's niceness over the answering loop's: the loop feeds the device and is the run's critical path; the
#: workers are batches ahead and can wait for a core (on a machine with fewer free cores than workers they would
#: otherwise take the loop's core in turns and stall it for a time slice)
WORKER_NICE = 5


def _worker_init(_worker_id: int) -> None:
    """A worker yields the CPU to the answering loop (:data:`WORKER_NICE`) and dies with its parent (a killed run
    leaves no worker behind holding its output pipes)."""
    try:
        os.nice(WORKER_NICE)
    except (OSError, AttributeError):  # not permitted / not POSIX: the same work at the same priority
        pass
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the DataLoader's own watchdog ends it within seconds
        pass
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(0)


class Prefetcher:
    """Batches prepared in order: in the loop (``workers=0``) or ahead of it by ``workers`` forked processes
    (``prefetch`` batches each). ``pin``: page-locked tensors (a GPU run). Iterate once; :meth:`close` stops the
    workers (also on an error or Ctrl-C)."""

    def __init__(self, data: BatchInputs, workers: int, pin: bool = False, prefetch: int = 2):
        import multiprocessing

        self.data, self.workers, self.pin = data, workers, pin
        self._it = None
        if workers > 0 and "fork" not in multiprocessing.get_all_start_methods():
            log.warning("--loader-workers %d: this platform cannot fork; the inputs are prepared in the loop",
                        workers)
            self.workers = 0
        elif workers > 0 and multiprocessing.current_process().daemon:  # e.g. a multiprocessing.Pool's worker
            log.warning("--loader-workers %d: a daemonic process cannot start workers; the inputs are prepared in "
                        "the loop", workers)
            self.workers = 0
        if self.workers > 0:
            import torch.utils.data as tud

            # the processor's tokenizer (HF tokenizers) would warn in every worker that it was forked after use
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            data.packed = True
            # forked: the processor, the questions and their image callables are inherited, never pickled; a worker
            # uses no CUDA, so a parent that has initialised it forks safely
            self._loader = tud.DataLoader(data, batch_size=None, shuffle=False, num_workers=self.workers,
                                          pin_memory=pin, prefetch_factor=prefetch, worker_init_fn=_worker_init,
                                          multiprocessing_context="fork", persistent_workers=False)

    def __iter__(self):
        if self.workers == 0:
            return (self._pinned(self.data[i]) for i in range(len(self.data)))
        self._it = iter(self._loader)  # the workers start here and begin on the first batches
        return (p.unpack() for p in self._it)

    def _pinned(self, p: Prepared) -> Prepared:
        return p.pin_memory() if self.pin else p

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def to_device(inputs: dict, device) -> dict:
    """The batch's tensors on ``device``; from pinned memory the copies are queued without waiting."""
    dev = getattr(device, "type", str(device))
    if dev == "cpu":
        return inputs
    return {k: v.to(device, non_blocking=v.is_pinned()) for k, v in inputs.items()}
