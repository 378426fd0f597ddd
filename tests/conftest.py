"""Shared test helpers: which backends run here, and the per-dtype comparison rule.

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

from fastnl import backends  # noqa: E402  (after TRITON_INTERPRET is settled)

# Low precision follows FlashAttention's rule: against a float64 truth, a backend may
# err at most 2x PyTorch's own computation in that dtype, plus this floor times the
# output's magnitude (the floor covers outputs the reference happens to get exactly).
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def cpu_backends():
    """Every registered backend that runs natively on CPU tensors in this process.

    "triton" on CPU tensors is Triton's interpreter: too slow for these tables and
    without bfloat16; tests/test_triton_backend.py checks it at interpreter sizes.
    """
    return [name for name in backends.names()
            if name != "triton" and backends.unavailable_reason(name, "cpu") is None]


def assert_close_to_truth(actual, reference_in_dtype, truth, what=""):
    """|actual - truth| <= 2 |reference - truth| + floor * max(1, |truth|), elementwise max;
    the floor is that of the reference's dtype (usually actual's)."""
    truth = truth.double()
    error = (actual.double() - truth).abs()
    reference_error = (reference_in_dtype.double() - truth).abs().max().item()
    allowed = 2 * reference_error + ERROR_FLOOR[reference_in_dtype.dtype] * max(1.0, truth.abs().max().item())
    worst = error.argmax()
    index = tuple(int(i) for i in torch.unravel_index(worst, error.shape)) if error.numel() else ()
    assert error.numel() == 0 or error.max().item() <= allowed, (
        f"{what}: max error {error.max().item():.3e} at {index} "
        f"(got {actual.flatten()[worst].item()}, truth {truth.flatten()[worst].item()}), "
        f"allowed {allowed:.3e} (reference in {actual.dtype} errs {reference_error:.3e})"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_outputs(monkeypatch):
    """The Triton backend's outputs start as NaN (FASTNL_TRITON_FILL_NAN), so a kernel
    or configuration that leaves an element unwritten fails the comparison."""
    from fastnl.kernels import _launch

    monkeypatch.setattr(_launch, "FILL_NAN", True)
