"""What is particular to the cpp backend (csrc/cpu): determinism across thread counts,
strides, the denormal mode, its operators' own checks, and the build fallback. Its
comparison with the reference, tile edges included, is tests/test_backends.py's.

The first run compiles the kernels (torch's extension cache keeps them).
"""
import warnings

import pytest
import torch
from harness import backend_results, make_inputs

import fastnl
from fastnl import affinities, backends, reference
from fastnl.backends import cpp

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

KERNELS = affinities.names()  # every registered kernel


def forward_backward(inputs, kernel):
    """[out, grads] of diffuse on the cpp backend for (query, key, value, center, grad_out)."""
    return backend_results(kernel, "diffuse", "cpp", *inputs, 0.5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_and_two_threads_agree_bitwise(kernel):
    """Work is split by shape, never by thread count, and summed in a fixed order."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for shape in [(1, 700, 650, 8, 16), (3, 130, 300, 16, 48)]:
                inputs = make_inputs(shape, torch.float32, kernel=kernel)
                results.append(forward_backward(inputs, kernel))
    finally:
        torch.set_num_threads(threads)
    half = len(results) // 2
    for one_thread, two_threads in zip(results[:half], results[half:]):
        for a, b in zip(one_thread, two_threads):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_inputs(kernel):
    inputs = make_inputs((2, 50, 40, 8, 16), torch.float32, kernel=kernel)
    # the same values at every other element of a twice-as-wide buffer
    strided = [torch.stack([t, t], dim=-1).flatten(-2)[..., ::2] for t in inputs]
    assert not any(t.is_contiguous() for t in strided)
    for got, expected in zip(forward_backward(strided, kernel), forward_backward(inputs, kernel)):
        assert torch.equal(got, expected)


def test_denormal_mode_is_restored_after_the_kernels():
    # the softmax kernels flush denormals on their threads (tile_math.h, FlushDenormals);
    # the caller's thread, which runs a share of the work, must get its mode back
    forward_backward(make_inputs((2, 90, 70, 8, 16), torch.float32, magnitude=30.0), "softmax")
    tiny = torch.tensor([1e-39])  # a denormal float32
    assert (tiny * 2).item() == pytest.approx(2e-39, rel=1e-6)


def test_operator_checks_name_the_argument():
    query, key, value, _, _ = make_inputs((2, 5, 6, 8, 4), torch.float32)
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
    query, key, value, _, _ = make_inputs((1, 6, 6, 8, 4), torch.float32)
    with pytest.warns(RuntimeWarning, match="no C[+][+] compiler found.*\n.*falling back to the 'torch' backend"):
        assert backends.resolve(None, "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        out = fastnl.nonlocal_aggregate(query, key, value)
    torch.testing.assert_close(out, reference.aggregate(query, key, value))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available on cpu: building the C[+][+]"):
        fastnl.nonlocal_aggregate(query, key, value, backend="cpp")
