"""Shared test helpers: which backends run here, and the per-dtype comparison rule."""
import pytest
import torch

from fastnl import backends

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
    """Every registered backend that can run on CPU tensors in this process."""
    return [name for name in backends.names() if backends.unavailable_reason(name, "cpu") is None]


def assert_close_to_truth(actual, reference_in_dtype, truth, what=""):
    """|actual - truth| <= 2 |reference - truth| + floor * max(1, |truth|), elementwise max."""
    truth = truth.double()
    error = (actual.double() - truth).abs()
    reference_error = (reference_in_dtype.double() - truth).abs().max().item()
    allowed = 2 * reference_error + ERROR_FLOOR[actual.dtype] * max(1.0, truth.abs().max().item())
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
