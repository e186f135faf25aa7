"""Process-wide runtime settings: devices and thread counts for torch and faiss."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from patchcore_core.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """Map "auto" to CUDA when present, else CPU; validate explicit names."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"setting device: must be auto, cpu, cuda or cuda:N (got {device!r})") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"setting device: must be auto, cpu, cuda or cuda:N (got {device!r})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"setting device: {device!r} was requested but CUDA is not available on this machine")
    return dev


MMAP_THRESHOLD = 64 * 2**20  # glibc: blocks below this come from the heap (default: 128 KiB, sliding up to 32 MiB)
TRIM_THRESHOLD = 256 * 2**20  # freed heap kept before it is returned to the system
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """glibc only, once per process: serve the backbone's large short-lived activation buffers from the heap.

    With glibc's defaults (and more so under Dask, whose workers start with MALLOC_TRIM_THRESHOLD_=65536, which
    also freezes the mmap threshold at 128 KiB) every such buffer is a fresh mmap, and each reuse page-faults:
    measured, half the CPU time of a Lite0 forward pass in the flow process and two thirds in a Dask worker.
    Costs up to TRIM_THRESHOLD of freed memory kept. Off with PATCHCORE_TUNE_MALLOC=0 or a MALLOC_MMAP_THRESHOLD_
    of your own; a no-op where the C library is not glibc. Returns whether it is on.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if os.environ.get("PATCHCORE_TUNE_MALLOC", "1") != "0" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            import ctypes
            import platform

            if platform.libc_ver()[0] == "glibc":
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
                _allocator_tuned = bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
                                        and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))
    return _allocator_tuned


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch and faiss (OpenMP) thread counts explicitly; both bring OpenMP and may deadlock otherwise, and a
    process sharing its cores (a Dask worker) must not use more than its share. (The numba kernels are serial;
    starting numba's own thread pool here would perturb torch's OpenMP and change later results by an ulp, so a
    process's numba pool is bounded by NUMBA_NUM_THREADS at start instead: flows/task_runner.py.)

    `num_threads` defaults to $PATCHCORE_THREADS or the number of usable cores.
    """
    source = "threads"
    if num_threads is None:
        env = os.environ.get("PATCHCORE_THREADS")
        source, num_threads = "PATCHCORE_THREADS", env if env else len(os.sched_getaffinity(0))
    try:
        valid = int(num_threads) >= 1 and float(num_threads) == int(num_threads)
    except (TypeError, ValueError):
        valid = False
    if not valid:  # never clamped silently
        raise ConfigError(f"setting {source}: must be an integer >= 1 (got {num_threads!r})")
    num_threads = int(num_threads)
    tune_allocator()
    torch.set_num_threads(num_threads)
    import faiss

    faiss.omp_set_num_threads(num_threads)
    return num_threads


@dataclass(frozen=True)
class Runtime:
    """How a pipeline stage runs (never what it computes): device, threads, and where progress is logged."""

    device: str = "auto"
    num_threads: int | None = None
    log: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def estimator_kwargs(self) -> dict:
        """The runtime arguments every detector constructor takes."""
        return {"device": self.device, "num_threads": self.num_threads, "progress": False}


DEFAULT_RUNTIME = Runtime()  # auto device, default threads, no log
