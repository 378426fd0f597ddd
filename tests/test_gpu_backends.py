"""The triton and cuda backends against fastnl.reference on a real GPU (skipped without one).

The same table as the interpreter and host-math tests, at the paper's sizes and odd
ones, in float32, float16 and bfloat16 (which the interpreter cannot run). Under
torch's default float32 matmul precision ("highest") the fp32 dots are exact
("ieee"), so float32 is held to the same rule as on the CPU; with TF32 products
(precision "high") float32 is held to float16's rule, TF32 having float16's 10-bit
mantissa. The "cuda" backend implements softmax itself and reuses the torch backend
for dot/concat. Outputs start as NaN, and autotuning cannot hide a configuration that
skips a ragged tile: every configuration is run on its own, and the op is called
again after tuning. Run with `pytest -m gpu` on a machine with a CUDA device.
"""
import pytest
import torch
from harness import MODES, assert_matches_reference, backend_results, compare, make_inputs

import fastnl
from fastnl import affinities, backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("nan_outputs"),
]
RAGGED = (3, 333, 517, 8, 48)  # no tile size divides N or M

# (B, N, M, D, E)
SHAPES = [
    (16, 1024, 1024, 8, 16),  # the paper's sizes: D = 8 padded to 16 for tl.dot
    (16, 256, 256, 16, 32),
    (16, 64, 64, 32, 64),
    (3, 333, 517, 1, 48),     # odd N and M, D = 1: masked tiles everywhere
    (2, 100, 77, 128, 128),   # the widest rows
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(backend, kernel) for backend in ("triton", "cuda") for kernel in affinities.names()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, kernel", CASES)
def test_matches_reference_on_gpu(backend, kernel, shape, dtype, mode):
    compare(backend, kernel, mode, shape, dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_shared_statistics_on_gpu(backend, dtype):
    query, key, value, center, grad_out = make_inputs((4, 256, 256, 16, 32), dtype, "diffuse", device="cuda")
    _, log_normalizer = fastnl.nonlocal_attend(query, key, value, backend=backend)
    logits = query.double() @ key.double().transpose(1, 2)
    torch.testing.assert_close(log_normalizer.double(), torch.logsumexp(logits, dim=-1), atol=2e-2, rtol=1e-3)
    results = backend_results("softmax", "diffuse", backend, query, key, value, center, grad_out, 1.0,
                              log_normalizer=log_normalizer)
    assert_matches_reference(results, "softmax", "diffuse", query, key, value, center, grad_out, 1.0)


def test_triton_is_the_cuda_default():
    query, key, value, _, _ = make_inputs((1, 8, 8, 4, 4), torch.float32, "aggregate", device="cuda")
    assert backends.resolve(None, "cuda") == "triton"
    fastnl.nonlocal_aggregate(query, key, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_second_call_after_tuning(dtype):
    """The first call autotunes (every configuration writes the same outputs); the
    second runs the chosen one alone into fresh NaN outputs."""
    inputs = make_inputs(RAGGED, dtype, "diffuse", device="cuda")
    for _ in range(2):
        results = backend_results("softmax", "diffuse", "triton", *inputs, 0.5)
    assert_matches_reference(results, "softmax", "diffuse", *inputs, 0.5)


def _configuration_count():
    """How many configurations fit the ragged shape's tiles in the most-configured kernel
    (1 without Triton or under its interpreter), so that each index is its own test and
    xdist spreads the compiles."""
    try:
        from fastnl.kernels import _launch, dot, softmax_bwd, softmax_fwd
    except ImportError:
        return 1
    widths = {"BLOCK_D": 16, "BLOCK_E": 64, "BLOCK_L": 16, "BLOCK_RIGHT": 64, "BLOCK_R": 64,
              "BLOCK_P": 64, "BLOCK_Q": 64}  # D = 8 and E = 48 padded, both ways round
    return max(len(k.fitting(widths)) for module in (softmax_fwd, softmax_bwd, dot)
               for k in vars(module).values() if isinstance(k, _launch.Tuned))


@pytest.mark.parametrize("index", range(_configuration_count()))
@pytest.mark.parametrize("kernel", ["softmax", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_configuration_on_a_ragged_shape(kernel, dtype, index):
    """Configuration `index` of every tuned kernel (its last where it has fewer), alone."""
    from fastnl.kernels import _launch

    inputs = make_inputs(RAGGED, dtype, "diffuse", device="cuda")
    with _launch.pinned_config(index):
        results = backend_results(kernel, "diffuse", "triton", *inputs, 0.5)
    assert_matches_reference(results, kernel, "diffuse", *inputs, 0.5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bitwise_repeatable(backend):
    inputs = make_inputs(RAGGED, torch.float32, "diffuse", device="cuda")
    first, second = (backend_results("softmax", "diffuse", backend, *inputs, 0.5) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES[:2] + [RAGGED])
def test_tf32_products_within_float16s_rule(shape):
    inputs = make_inputs(shape, torch.float32, "diffuse", device="cuda")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        results = backend_results("softmax", "diffuse", "triton", *inputs, 0.5)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_matches_reference(results, "softmax", "diffuse", *inputs, 0.5, peer_dtype=torch.float16)
