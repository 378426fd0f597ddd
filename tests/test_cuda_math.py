"""The CUDA kernels' arithmetic (csrc/cuda/nonlocal_math.h) against fastnl.reference, on the CPU.

csrc/cuda/host_math.cpp compiles the same __host__ __device__ functions the kernels
call with the host compiler and runs them in loops that mirror the kernels (rows
against tiles of 64), with the backend contract's signatures, and dispatches the same
width buckets (SHAPES covers each of 16, 32, 64, 128). What this cannot check
is the GPU-only plumbing: shared-memory staging, launch, half-precision loads; the
`gpu` tests in test_gpu_backends.py do. The first run compiles the host build.
"""
import pytest
import torch
from harness import MODES, assert_matches_reference, make_inputs

from fastnl.backends import _cuda_build

# (B, N, M, D, E)
SHAPES = [
    (2, 64, 64, 16, 16),   # exactly one tile each way
    (2, 37, 150, 8, 48),   # M > 2 tiles with a partial one: online rescaling across tiles
    (1, 130, 23, 1, 1),    # N over two query tiles, widths 1
    (1, 20, 20, 128, 128), # the widest rows the kernels hold
    # just past a width bucket's bound (16, 32, 64: nonlocal_math.h's dispatch_width), from D or E
    (1, 19, 70, 17, 5),    # bucket 32 for D = 17
    (1, 24, 40, 32, 32),   # bucket 32 exactly full
    (1, 21, 33, 20, 33),   # bucket 64 for E = 33
    (1, 18, 30, 100, 65),  # bucket 128 for D = 100, E = 65
]


@pytest.fixture(scope="module")
def host_math():
    return _cuda_build.host_math_extension()


def _contract_results(host_math, mode, query, key, value, center, grad_out, scale, log_normalizer=None):
    """[out, grads...] with the center's gradient formed as fastnl.ops does (-grad_out)."""
    center_arg = value if mode == "diffuse_value" else center
    out, log_normalizer = host_math.softmax_forward(query, key, value, center_arg, log_normalizer, scale)
    grads = list(host_math.softmax_backward(grad_out, query, key, value, center_arg, out, log_normalizer, scale))
    if mode == "diffuse_value":
        grads[2] = grads[2] - grad_out  # value is also the center
    elif mode == "diffuse":
        grads.append(-grad_out)
    return [out, *grads], log_normalizer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_math_matches_reference(host_math, shape, dtype, mode):
    inputs = make_inputs(shape, dtype, mode)
    results, log_normalizer = _contract_results(host_math, mode, *inputs, 0.5)
    assert_matches_reference(results, "softmax", mode, *inputs, 0.5)
    logits = 0.5 * inputs[0].double() @ inputs[1].double().transpose(1, 2)
    torch.testing.assert_close(log_normalizer.double(), torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_known_statistics_single_pass(host_math, shape):
    """With the log_normalizer given, the one-pass path gives the same output and gradients."""
    inputs = make_inputs(shape, torch.float64, "diffuse")
    _, log_normalizer = host_math.softmax_forward(*inputs[:3], None, None, 1.0)
    results, returned = _contract_results(host_math, "diffuse", *inputs, 1.0, log_normalizer=log_normalizer)
    assert returned is log_normalizer
    assert_matches_reference(results, "softmax", "diffuse", *inputs, 1.0)


def test_checks_name_the_argument(host_math):
    query, key, value, _, _ = make_inputs((1, 8, 8, 4, 4), torch.float32, "aggregate")
    with pytest.raises(RuntimeError, match="value must have shape"):
        host_math.softmax_forward(query, key, value[:, :4], None, None, 1.0)
    with pytest.raises(RuntimeError, match="log_normalizer must have dtype"):
        host_math.softmax_forward(query, key, value, None, torch.zeros(1, 8, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="at most 128"):
        host_math.softmax_forward(query, key, torch.zeros(1, 8, 129), None, None, 1.0)
