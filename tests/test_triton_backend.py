"""The Triton backend against fastnl.reference, on CPU tensors through Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a CUDA device, before
fastnl.kernels is imported; elsewhere this module skips and tests/test_gpu_backends.py
runs the same kernels compiled. The interpreter executes each program in numpy, one
after another, so shapes stay small (N around 64) and it uses 16 x 16 tiles: the cases
below still span several query and key tiles. It has no bfloat16 (it reads bf16 as
garbage), so bfloat16 is checked only on a GPU; here the backend must refuse it.
"""
import pytest
import test_ops
import torch
from harness import MODES, assert_matches_reference, backend_results, compare, make_inputs

import fastnl
from fastnl import affinities, backends

pytestmark = [
    pytest.mark.skipif(
        backends.unavailable_reason("triton", "cpu") is not None,
        reason=f"Triton interpreter off: {backends.unavailable_reason('triton', 'cpu')}",
    ),
    pytest.mark.usefixtures("nan_outputs"),
]

# (B, N, M, D, E); concat uses D = 1, diffuse_value uses M = N
SHAPES = [
    (2, 64, 64, 16, 16),  # whole 16-wide tiles, no padding: the plain path
    (2, 37, 50, 8, 48),   # odd N, M != N: masked query and key tiles; D=8, E=48 padded to 16, 64
    (1, 61, 23, 1, 1),    # widths 1 padded to 16; M just over one key tile
    (2, 50, 37, 16, 1),   # M < N; E = 1
    (1, 17, 64, 8, 16),   # one partial query tile against four key tiles
]
DTYPES = [torch.float32, torch.float16]
KERNELS = affinities.names()  # every registered kernel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference(kernel, shape, dtype, mode):
    compare("triton", kernel, mode, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_shared_statistics(shape, dtype):
    """A stage's later blocks: log_normalizer from one call, then a single-pass diffuse that reuses it."""
    query, key, value, center, grad_out = make_inputs(shape, dtype, "diffuse")
    _, log_normalizer = fastnl.nonlocal_attend(query, key, value, backend="triton")
    logits = query.double() @ key.double().transpose(1, 2)
    torch.testing.assert_close(log_normalizer.double(), torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-5)
    results = backend_results("softmax", "diffuse", "triton", query, key, value, center, grad_out, 1.0,
                              log_normalizer=log_normalizer)
    assert_matches_reference(results, "softmax", "diffuse", query, key, value, center, grad_out, 1.0)


def test_float64_accumulates_in_float64():
    inputs = make_inputs((1, 20, 33, 8, 16), torch.float64, "diffuse")
    results = backend_results("softmax", "diffuse", "triton", *inputs, 1.0)
    assert_matches_reference(results, "softmax", "diffuse", *inputs, 1.0)


def test_bfloat16_refused_by_interpreter():
    query, key, value, _, _ = make_inputs((1, 16, 16, 8, 8), torch.bfloat16, "aggregate")
    with pytest.raises(TypeError, match="interpreter has no bfloat16"):
        fastnl.nonlocal_aggregate(query, key, value, backend="triton")


@pytest.mark.parametrize("with_center", [False, True])
def test_opcheck_forward_ops(with_center):
    """The custom-op contract (fake kernels, no aliasing, autograd registration) with this backend."""
    test_ops.test_opcheck_forward_ops("triton", with_center)


def test_opcheck_backward_ops():
    test_ops.test_opcheck_backward_ops("triton")


def test_every_configuration_is_checked(monkeypatch):
    """pinned_config runs each configuration of a tuned kernel, not only the first: here
    the forward with 16- and 32-row query tiles on a ragged shape (N = 37)."""
    import triton

    from fastnl.kernels import _launch, softmax_fwd

    class Recording:
        """The jit kernel, noting the query tile of each launch."""

        def __init__(self, kernel):
            self.kernel, self.tiles = kernel, []

        def __getitem__(self, grid):
            launch = self.kernel[grid]
            return lambda *args, **meta: self.tiles.append(meta["BLOCK_N"]) or launch(*args, **meta)

    kernel = Recording(softmax_fwd._softmax_forward_kernel.kernel)
    tiles = [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16}), triton.Config({"BLOCK_N": 32, "BLOCK_M": 16})]
    monkeypatch.setattr(softmax_fwd, "_softmax_forward_kernel",
                        _launch.Tuned(kernel, tiles, key=[], live_values=lambda meta: 0))
    query, key, value, center, _ = make_inputs((2, 37, 50, 8, 16), torch.float32, "diffuse")
    truth = fastnl.nonlocal_diffuse(query, key, value, center, backend="reference")
    for index in range(len(tiles)):
        with _launch.pinned_config(index):
            out = fastnl.nonlocal_diffuse(query, key, value, center, backend="triton")
        torch.testing.assert_close(out, truth, atol=1e-5, rtol=1e-5)
    assert kernel.tiles == [16, 32]


def test_widths_beyond_the_tiles_fall_back_with_the_reason(monkeypatch):
    """backend=None passes over a backend that refuses the widths (Wang et al.'s video
    blocks reach C' = 512), with one warning naming why; naming it explicitly raises."""
    monkeypatch.setitem(backends._PREFERENCE, "cpu", ["triton", "torch"])
    backends._warn_passed_over.cache_clear()
    query, key, value, _, _ = make_inputs((1, 20, 20, 130, 4), torch.float32, "aggregate")
    with pytest.warns(RuntimeWarning, match=r"backend 'triton' passed over \(widths D and E up to 128, "
                                            r"got D=130, E=4\); using 'torch'"):
        out = fastnl.nonlocal_aggregate(query, key, value)
    torch.testing.assert_close(out, fastnl.nonlocal_aggregate(query, key, value, backend="reference"))
    with pytest.raises(ValueError, match="backend 'triton' cannot take these operands: widths D and E up to 128"):
        fastnl.nonlocal_aggregate(query, key, value, backend="triton")


def test_wide_values_split_over_column_tiles():
    """E = 100 pads to 128, over the 64-column tiles of rows_times: the dot path's third
    grid axis, forward and backward."""
    inputs = make_inputs((1, 40, 40, 8, 100), torch.float32, "diffuse")
    results = backend_results("dot", "diffuse", "triton", *inputs, 1.0)
    assert_matches_reference(results, "dot", "diffuse", *inputs, 1.0)
