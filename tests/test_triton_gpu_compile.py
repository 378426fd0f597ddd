"""The Triton kernels compile to sm_80 and sm_90 cubins on a machine without a GPU, fit
Hopper's shared memory, and do not spill registers at the models' widths.

The work is tests/compile_triton_for_gpu.py, run in a subprocess because this pytest
process may have TRITON_INTERPRET=1 (tests/conftest.py), which turns the kernels into
interpreter-only functions. The pinned set (what FASTNL_TRITON_CONFIGS=first launches)
runs by default; every configuration that pruning keeps is the `slow` test
(`pytest -m slow`). Triton caches the results.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_triton_for_gpu.py")


def _compile(*flags):
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("TRITON_INTERPRET", "FASTNL_TRITON_CONFIGS")}
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], env=environment, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "kernels compiled" in done.stdout


def test_pinned_configurations_compile_for_gpu():
    _compile()


@pytest.mark.slow
def test_every_kept_configuration_compiles_for_gpu():
    _compile("--all")
