"""Process-wide runtime settings: the allocator tuning that keeps activation buffers off fresh mmaps."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = """
import resource, torch
from patchcore_core.runtime import tune_allocator
on = tune_allocator()
x = torch.rand(8, 32, 112, 112)  # a Lite0-sized activation, 12.8 MB
for _ in range(3):
    (x * 2).sum()  # warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    (x * 2).sum()  # a fresh 12.8 MB buffer each time
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env: dict[str, str]) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=120, check=True)
    on, faults = done.stdout.split()
    return on, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tuned_allocator_reuses_large_buffers_without_page_faults():
    on, tuned = run({"PATCHCORE_TUNE_MALLOC": "1"})
    off, untuned = run({"PATCHCORE_TUNE_MALLOC": "0", "MALLOC_TRIM_THRESHOLD_": "65536"})  # as Dask starts workers
    assert (on, off) == ("True", "False")
    # untuned, each 12.8 MB buffer is a fresh mmap: ~3,100 faults apiece; tuned, the heap reuses it (a few
    # first touches remain, more when the machine is busy)
    assert untuned > 60 * 2000 and tuned < untuned / 5, (tuned, untuned)
