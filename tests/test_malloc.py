"""fastnl.app.malloc: glibc keeps freed memory, so a step's tensors are not faulted in again.

Each check runs a fresh Python process (the setting is per process and cannot be
undone): large tensors allocated, written and freed round after round, as in training
steps, count their page faults under keep_freed_memory and under glibc's starting
thresholds held fixed (128 KiB: every such tensor a fresh mapping). glibc's own dynamic
thresholds fall in between, and vary from run to run: PreResNet-20 steps took 0 to
20,000 faults each."""
import json
import subprocess
import sys

import pytest

from fastnl.app import malloc

PATTERN = """
import json, resource, sys
import torch
from fastnl.app import malloc
if sys.argv[1] == "keep":
    said = malloc.keep_freed_memory()
else:  # glibc's starting thresholds, held
    libc = malloc._glibc()
    said = str(libc.mallopt(malloc.M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(malloc.M_TRIM_THRESHOLD, 128 << 10))
def round_():  # 8 tensors of 4 MiB (below the raised mmap threshold), written, then all freed
    tensors = [torch.empty(1 << 20).fill_(1.0) for _ in range(8)]
    del tensors
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print(json.dumps({"said": said, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""

glibc_only = pytest.mark.skipif(malloc._glibc() is None, reason="not glibc")


def _run(mode):
    done = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_tensors_are_reused_without_page_faults():
    pages = 20 * 8 * (4 << 20) // 4096  # every page of every round
    starting, kept = _run("starting"), _run("keep")
    assert starting["said"] == "1" and starting["faults"] > pages // 2, "the pattern shows no faults to avoid"
    assert kept["faults"] < pages // 50
    assert kept["said"] == "glibc mmap threshold 32 MiB, trim threshold 1024 MiB"


def test_it_says_why_nothing_was_set_without_glibc(monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.keep_freed_memory() == "unchanged (not glibc)"
