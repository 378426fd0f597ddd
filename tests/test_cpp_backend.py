"""The cpp backend (csrc/cpu): against the reference at its own tile edges, gradcheck,
the stage path, determinism across thread counts, odd inputs, and the build fallback.

The first run compiles the kernels (about a minute, once; torch's extension cache
keeps them); after that this file takes seconds.
"""
import warnings

import pytest
import torch
from conftest import assert_close_to_truth

import fastnl
from fastnl import affinities, backends, reference
from fastnl.backends import cpp

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

KERNELS = affinities.names()  # every registered kernel

# (B, N, M, D, E); concat always runs with D = 1. The softmax tiles are 64 query rows x
# 128 keys forward, 32 x 128 backward (csrc/cpu/softmax.cpp), vectors of 16 floats / 8
# doubles.
SHAPES = [
    (1, 1, 1, 8, 1),  # N = M = 1: one row, one key, E narrower than a vector
    (2, 1, 300, 8, 16),  # N = 1 against a full and a partial forward key tile
    (2, 100, 77, 8, 16),  # D = 8: lane-wise dQ; N not a multiple of any tile; M != N
    (1, 200, 260, 16, 48),  # B = 1: backward split into query groups; E = 48 is three vectors
    (3, 70, 129, 64, 1),  # D = 64 at runtime depth; 129 keys = one backward tile + 1
    (2, 33, 40, 1, 16),  # D = 1
]
OPERATIONS = ["aggregate", "diffuse"]
# float32 against the float64 truth (tile sums are ordered differently from torch's)
FLOAT32_TOLERANCE = dict(atol=2e-5, rtol=1e-4)


def make_inputs(shape, kernel, dtype=torch.float64, magnitude=1.0, seed=0):
    batch, num_queries, num_keys, width, value_width = shape
    width = affinities.get(kernel).width or width
    generator = torch.Generator().manual_seed(seed)
    sizes = [(num_queries, width), (num_keys, width), (num_keys, value_width), (num_queries, value_width)]
    tensors = [torch.randn(batch, *size, generator=generator, dtype=torch.float64) for size in sizes]
    tensors[0], tensors[1] = magnitude * tensors[0], magnitude * tensors[1]
    return [t.to(dtype) for t in tensors]


def forward_backward(operation, inputs, kernel, backend, scale=0.5):
    """(out, gradients of every input used) for one forward and a fixed grad_out."""
    query, key, value, center = [t.detach().requires_grad_() for t in inputs]  # strides kept
    if operation == "aggregate":
        leaves = (query, key, value)
        out = fastnl.nonlocal_aggregate(query, key, value, kernel=kernel, scale=scale, backend=backend)
    else:
        leaves = (query, key, value, center)
        out = fastnl.nonlocal_diffuse(query, key, value, center, kernel=kernel, scale=scale, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype, kernel, operation, shape):
    inputs = make_inputs(shape, kernel)
    truth = forward_backward(operation, inputs, kernel, "reference")
    actual = forward_backward(operation, [t.to(dtype) for t in inputs], kernel, "cpp")
    tolerance = dict(atol=1e-11, rtol=1e-9) if dtype == torch.float64 else FLOAT32_TOLERANCE
    for name, got, expected in zip(["out", "grad query", "grad key", "grad value", "grad center"], actual, truth):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), expected, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_within_twice_torchs_own_error(kernel, shape):
    inputs = make_inputs(shape, kernel)
    truth = forward_backward("diffuse", inputs, kernel, "reference")
    low = [t.to(torch.bfloat16) for t in inputs]
    actual = forward_backward("diffuse", low, kernel, "cpp")
    torch_own = forward_backward("diffuse", low, kernel, "reference")
    for name, got, own, expected in zip(["out", "dq", "dk", "dv", "dc"], actual, torch_own, truth):
        assert got.dtype == torch.bfloat16
        assert_close_to_truth(got, own, expected, what=f"{kernel} {name}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_float64(kernel):
    query, key, value, center = [t.requires_grad_() for t in make_inputs((2, 9, 11, 3, 4), kernel)]

    def diffuse(query, key, value, center):
        return fastnl.nonlocal_diffuse(query, key, value, center, kernel=kernel, scale=0.7, backend="cpp")

    assert torch.autograd.gradcheck(diffuse, (query, key, value, center))


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]], ids=str)
def test_stage_path_equals_the_no_stats_path(shape):
    """Passing the first call's log-sum-exp back (a stage's later blocks) gives the same
    output and gradients, and the statistic is the true row log-sum-exp."""
    query, key, value, center = make_inputs(shape, "softmax", torch.float32)
    out, log_normalizer = fastnl.nonlocal_attend(query, key, value, center, scale=0.5, backend="cpp")
    expected_lse = torch.logsumexp(0.5 * query.double() @ key.double().transpose(1, 2), dim=-1)
    assert log_normalizer.dtype == torch.float32 and log_normalizer.shape == shape[:2]
    torch.testing.assert_close(log_normalizer.double(), expected_lse, **FLOAT32_TOLERANCE)

    def grads(**stats):
        leaves = [t.clone().requires_grad_() for t in (query, key, value, center)]
        result, _ = fastnl.nonlocal_attend(*leaves, scale=0.5, backend="cpp", **stats)
        result.backward(torch.ones_like(result))
        return [result.detach()] + [leaf.grad for leaf in leaves]

    for with_stats, without in zip(grads(log_normalizer=log_normalizer), grads()):
        torch.testing.assert_close(with_stats, without, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_and_two_threads_agree_bitwise(kernel):
    """Work is split by shape, never by thread count, and summed in a fixed order."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for shape in [(1, 700, 650, 8, 16), (3, 130, 300, 16, 48)]:
                inputs = make_inputs(shape, kernel, torch.float32)
                results.append(forward_backward("diffuse", inputs, kernel, "cpp"))
    finally:
        torch.set_num_threads(threads)
    half = len(results) // 2
    for one_thread, two_threads in zip(results[:half], results[half:]):
        for a, b in zip(one_thread, two_threads):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_inputs(kernel):
    query, key, value, center = make_inputs((2, 50, 40, 8, 16), kernel, torch.float32)
    # the same values at every other element of a twice-as-wide buffer
    strided = [torch.stack([t, t], dim=-1).flatten(-2)[..., ::2] for t in (query, key, value, center)]
    assert not any(t.is_contiguous() for t in strided)
    for got, expected in zip(forward_backward("diffuse", strided, kernel, "cpp"),
                             forward_backward("diffuse", [query, key, value, center], kernel, "cpp")):
        assert torch.equal(got, expected)


def test_logits_of_ten_thousand_stay_finite():
    # D = 1 and |q|, |k| ~ 100: logits up to about +-1e4
    query, key, value, center = make_inputs((2, 90, 70, 1, 16), "softmax", torch.float32, magnitude=100.0)
    outputs = forward_backward("diffuse", [query, key, value, center], "softmax", "cpp", scale=1.0)
    assert all(torch.isfinite(t).all() for t in outputs)
    truth = forward_backward("diffuse", [t.double() for t in (query, key, value, center)], "softmax",
                             "reference", scale=1.0)
    torch.testing.assert_close(outputs[0].double(), truth[0], **FLOAT32_TOLERANCE)


def test_denormal_mode_is_restored_after_the_kernels():
    # the softmax kernels flush denormals on their threads (tile_math.h, FlushDenormals);
    # the caller's thread, which runs a share of the work, must get its mode back
    inputs = make_inputs((2, 90, 70, 8, 16), "softmax", torch.float32, magnitude=30.0)
    forward_backward("diffuse", inputs, "softmax", "cpp")
    tiny = torch.tensor([1e-39])  # a denormal float32
    assert (tiny * 2).item() == pytest.approx(2e-39, rel=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("where", [0, 1, 2], ids=["query", "key", "value"])
def test_nan_in_gives_nan_out(kernel, where):
    inputs = make_inputs((2, 40, 30, 8, 16), kernel, torch.float32)
    inputs[where][1, 3, 0] = float("nan")
    out = fastnl.nonlocal_aggregate(*inputs[:3], kernel=kernel, backend="cpp")
    expected = reference.aggregate(*inputs[:3], kernel=kernel)
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))


def test_operator_checks_name_the_argument():
    query, key, value, _ = make_inputs((2, 5, 6, 8, 4), "softmax", torch.float32)
    with pytest.raises(RuntimeError, match="key must have shape"):
        torch.ops.fastnl_cpp.softmax_forward(query, key[:, :, :3], value, None, None, 1.0)
    with pytest.raises(RuntimeError, match="query must be float32 or float64"):
        torch.ops.fastnl_cpp.dot_forward(query.half(), key.half(), value.half(), None, 1.0)
    with pytest.raises(RuntimeError, match="log_normalizer must have shape"):
        torch.ops.fastnl_cpp.softmax_forward(query, key, value, None, torch.zeros(2, 4), 1.0)


def test_other_devices_are_unavailable():
    assert "CPU" in cpp.unavailable_reason("cuda")
    assert cpp.unavailable_reason("cpu") is None


@pytest.fixture
def broken_build(monkeypatch):
    """The loader fails as a missing compiler would; the real state comes back after."""

    def fail(verbose=False):
        raise RuntimeError("Error building extension: no C++ compiler found")

    def forget():
        cpp._build_failure.cache_clear()
        backends.unavailable_reason.cache_clear()

    monkeypatch.setattr(cpp, "build", fail)
    forget()
    yield
    monkeypatch.undo()
    forget()


def test_failed_build_falls_back_to_torch_with_one_warning(broken_build):
    query, key, value, _ = make_inputs((1, 6, 6, 8, 4), "softmax", torch.float32)
    with pytest.warns(RuntimeWarning, match="no C[+][+] compiler found.*\n.*falling back to the 'torch' backend"):
        assert backends.resolve(None, "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        out = fastnl.nonlocal_aggregate(query, key, value)
    torch.testing.assert_close(out, reference.aggregate(query, key, value))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available on cpu: building the C[+][+]"):
        fastnl.nonlocal_aggregate(query, key, value, backend="cpp")
