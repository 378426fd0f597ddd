"""The CUDA extension compiles (and imports) wherever nvcc is present, GPU or not.

Without a visible GPU it is built for sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST="8.0;9.0",
unless set). A compile error fails this test; a machine with no CUDA toolkit skips it.
The .cu holds every kernel per width bucket and dtype, fully unrolled, so a fresh build
takes minutes (README, "What was verified"). Later uses of the backend reuse torch's
extension cache; this test always builds fresh, in a subprocess, to read ptxas's report.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastnl import backends
from fastnl.backends import _cuda_build

needs_toolkit = pytest.mark.skipif(_cuda_build.cuda_home() is None,
                                   reason="no CUDA toolkit (nvcc and headers): set CUDA_HOME to build csrc/cuda")

KERNELS = ("forward_kernel", "delta_kernel", "query_grad_kernel", "key_value_grad_kernel")
BUCKETS = (16, 32, 64, 128)
# Itanium mangling of the kernels' scalar_t template argument
DTYPES = {"f": "float32", "d": "float64", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}
# Four float64 rows of 32 need 256 registers, one more than a thread has: this one kernel must spill.
SPILL_EXPECTED = {("key_value_grad_kernel", 32, "float64")}


def parse_ptxas(log):
    """{(kernel, bucket, dtype, arch): {"registers", "stack", "spill_stores"}} from a -Xptxas=-v log."""
    report, entry, properties_of = {}, None, None
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line):
            name, arch = match.groups()
            kernel = re.search(rf"\d({'|'.join(KERNELS)})ILi(\d+)E({'|'.join(DTYPES)})", name)
            entry = (name, (kernel[1], int(kernel[2]), DTYPES[kernel[3]], arch)) if kernel else None
            properties_of = None
        elif match := re.search(r"Function properties for (\w+)", line):
            properties_of = match[1]
        elif match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line):
            # a callee that was not inlined has its own properties: only the entry's count here
            if entry and properties_of == entry[0]:
                report.setdefault(entry[1], {}).update(stack=int(match[1]), spill_stores=int(match[2]))
        elif (match := re.search(r"Used (\d+) registers", line)) and entry:
            report.setdefault(entry[1], {})["registers"] = int(match[1])
    return report


@needs_toolkit
def test_cuda_extension_compiles_with_rows_in_registers(tmp_path):
    """A fresh verbose build (its own TORCH_EXTENSIONS_DIR, so nvcc really runs) compiles
    and imports, reports every kernel per bucket, and buckets 16 and 32 use no local
    memory: neither spills nor a stack frame (the per-thread arrays before buckets had no
    spills either, but a stack)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    build = subprocess.run([sys.executable, "-m", "fastnl.backends._cuda_build"], env=env, check=False,
                           cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-4000:]
    assert "softmax_forward and softmax_backward loaded" in build.stdout
    assert re.search(r"Used \d+ registers", build.stdout), build.stdout[-4000:]
    report = parse_ptxas(build.stdout)
    found = {key[:3] for key in report}
    expected = {(kernel, bucket, dtype) for kernel in KERNELS for bucket in BUCKETS for dtype in DTYPES.values()}
    assert found == expected, f"missing {sorted(expected - found)}, unexpected {sorted(found - expected)}"
    local_memory = {key: numbers for key, numbers in report.items()
                    if key[1] in (16, 32) and key[:3] not in SPILL_EXPECTED
                    and (numbers["spill_stores"] != 0 or numbers["stack"] != 0)}
    assert not local_memory, f"bucket 16/32 kernels with spill stores or a stack frame: {local_memory}"


def test_cuda_backend_needs_cuda_tensors():
    assert "CUDA tensors" in backends.unavailable_reason("cuda", "cpu")
