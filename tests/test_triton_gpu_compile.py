"""The Triton kernels compile to sm_80 and sm_90 cubins on a machine without a GPU.

The work is tests/compile_triton_for_gpu.py, run in a subprocess because this pytest
process may have TRITON_INTERPRET=1 (tests/conftest.py), which turns the kernels into
interpreter-only functions. About a minute on 2 cores; Triton caches the results.
"""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_triton_for_gpu.py")


def test_triton_kernels_compile_for_gpu():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=environment, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
