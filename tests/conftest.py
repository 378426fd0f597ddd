"""Fixtures for every test file (the comparison harness is tests/harness.py).

It also makes a choice that has to happen before fastnl's Triton kernels are imported.
Triton decides when a kernel is decorated (`triton.jit`, i.e. when fastnl.kernels is
first imported) whether it is compiled for the GPU or run by its CPU interpreter, and
reads TRITON_INTERPRET to decide. pytest imports this file before any test module, so
setting the variable here is reliable:

- no CUDA device visible and TRITON_INTERPRET unset: set TRITON_INTERPRET=1, so the
  Triton backend runs on CPU tensors and tests/test_triton_backend.py checks it;
- a CUDA device visible: leave it unset, so the kernels compile for the GPU, the
  `gpu`-marked tests run them, and the interpreter tests skip (force them with
  `TRITON_INTERPRET=1 pytest tests/test_triton_backend.py`).

The variable changes nothing else in the suite: PyTorch's CPU code (eager and
torch.compile's C++ backend) does not use Triton.
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from data_fixtures import image_folder, official_cifar10  # noqa: E402,F401  (fixtures for every test file)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_outputs(monkeypatch):
    """The Triton backend's outputs start as NaN (FASTNL_TRITON_FILL_NAN), so a kernel
    or configuration that leaves an element unwritten fails the comparison."""
    from fastnl.kernels import _launch

    monkeypatch.setattr(_launch, "FILL_NAN", True)
