"""The device's measured limits, the denominators of every row's physical floor (:mod:`bench.efficiency.floor`): its
memory bandwidth, as a large device-to-device copy reaches it, and its matrix-multiply peak, as a large GEMM of the
run's dtype reaches it. Usable on their own::

    python -c "from bench.efficiency.hardware import measure; print(measure('cuda', 'float16'))"

Bandwidth convention: a copy of B bytes reads B and writes B, so a copy's bandwidth is 2 B / its time (bytes read +
written per second, what a device's datasheet bandwidth counts). A forward's floor divides the bytes it must *read*
by that number: a read-only stream is taken to move at the rate of the copy's total traffic (on an H100 a device copy
reaches ~2.9 TB/s read + written of the 3.35 TB/s datasheet figure). Best of N timings for both (the device's
capability, not its average under noise); on a GPU each timing covers a few back-to-back repetitions between CUDA
events. On a CPU the same code runs with small sizes (the tests exercise it; the numbers are only indicative)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

__all__ = ["si", "cpu_model", "copy_bandwidth", "matmul_peak", "measure", "describe", "GPU_SIZES", "CPU_SIZES", "CONVENTION"]

#: (copy bytes, GEMM side) by device kind: 1 GiB copied (2 GiB held), an 8192^3 GEMM (1.1 TFLOP, 384 MiB at fp16)
GPU_SIZES = (1 << 30, 8192)
#: a CPU: 16 MiB copied, a 256^3 GEMM (a fraction of a second on the project's 2-core machine, fp16 included)
CPU_SIZES = (16 << 20, 256)

CONVENTION = ("copy bandwidth = bytes read + bytes written by a device-to-device copy / its time (2 B per B copied); "
              "a row's bytes to read are divided by it")


def cpu_model() -> str:
    """The CPU's model name (lscpu's 'Model name', from /proc/cpuinfo), or the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from llava.dtypes import parse_dtype

    return parse_dtype(dtype)


def _best(fn, device: torch.device, repeats: int, inner: int) -> float:
    """The best of ``repeats`` timings of ``inner`` back-to-back calls of ``fn``, per call (seconds); one untimed call
    first (allocation, kernel selection)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            t = time.perf_counter() - t0
        best = min(best, t / inner)
    return best


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 5, inner: int = 3) -> dict:
    """A device-to-device copy of ``nbytes`` (default: 1 GiB on a GPU, 16 MiB on a CPU), best of ``repeats``:
    ``bytes_per_s`` = 2 x nbytes / time (read + written; :data:`CONVENTION`)."""
    device = torch.device(device)
    nbytes = int(nbytes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)[0])
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # written: no lazily mapped zero pages on a CPU
    dst = torch.empty_like(src)
    try:
        t = _best(lambda: dst.copy_(src), device, repeats, inner)
    finally:
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * nbytes / t, "bytes": nbytes, "best_s": t, "repeats": repeats, "inner": inner,
            "convention": CONVENTION}


def matmul_peak(device, dtype="float16", n: int | None = None, repeats: int = 5, inner: int = 3) -> dict:
    """An ``n`` x ``n`` x ``n`` GEMM of ``dtype`` (default side: 8192 on a GPU, 256 on a CPU), best of ``repeats``:
    ``flops_per_s`` = 2 n^3 / time (torch's own matmul settings, as the model runs them)."""
    device, dt = torch.device(device), _dtype(dtype)
    n = int(n or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)[1])
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
    c = torch.empty(n, n, device=device, dtype=dt)
    try:
        t = _best(lambda: torch.mm(a, b, out=c), device, repeats, inner)
    finally:
        del a, b, c
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"flops_per_s": 2 * n ** 3 / t, "n": n, "dtype": str(dt).removeprefix("torch."), "best_s": t,
            "repeats": repeats, "inner": inner}


def measure(device, dtype="float16", copy_bytes: int | None = None, gemm_n: int | None = None,
            repeats: int = 5) -> dict:
    """Both limits of ``device`` for ``dtype`` (sizes by device kind unless given), with the date, the device's name
    and the seconds the measurement took."""
    device = torch.device(device)
    t0 = time.perf_counter()
    copy = copy_bandwidth(device, copy_bytes, repeats)
    mm = matmul_peak(device, dtype, gemm_n, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"bytes_per_s": copy["bytes_per_s"], "flops_per_s": mm["flops_per_s"], "device": str(device),
            "device_name": name, "dtype": mm["dtype"], "date": time.strftime("%Y-%m-%d"),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "copy": copy, "matmul": mm,
            "seconds": round(time.perf_counter() - t0, 3)}


def si(x: float, unit: str) -> str:
    """A quantity with its SI prefix, three significant digits or more: si(2.91e12, "B/s") -> '2.91 TB/s',
    si(7.12e14, "FLOP/s") -> '712 TFLOP/s', si(13.2e9, "B") -> '13.2 GB'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            v = x / scale
            return f"{v:,.0f} {prefix}{unit}" if v >= 100 else f"{v:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def describe(hw: dict | None) -> str:
    """One line: the measured bandwidth and peak, how, and when."""
    if not hw:
        return "device limits not measured"
    c, m = hw["copy"], hw["matmul"]
    return (f"measured on {hw['device_name']} ({hw['device']}) on {hw['date']}: copy bandwidth "
            f"{si(hw['bytes_per_s'], 'B/s')} (a {c['bytes'] / 2**20:,.0f} MiB device-to-device copy, best of "
            f"{c['repeats']}; bytes read + written / time, applied to the bytes a forward reads), matmul peak "
            f"{si(hw['flops_per_s'], 'FLOP/s')} ({m['dtype']} {m['n']}^3 GEMM, best of {m['repeats']})")
