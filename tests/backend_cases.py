"""Backend-vs-reference checks on any device and with cached row statistics.

tests/test_backends.py compares the native CPU backends on CPU tensors; the Triton
interpreter tests, the host build of the CUDA math and the GPU tests need the same
comparison with a device, the stage's log_normalizer, or a non-PyTorch entry point,
so it is written once here. The rule is conftest.assert_close_to_truth: against the
float64 truth, at most twice the error of fastnl.reference computed in the same dtype
on the same device, plus a floor. One random input is cloned into every computation
and all are backpropagated with the same grad_out.
"""
import torch
from conftest import assert_close_to_truth

import fastnl

# how the operator is called: aggregate; diffuse with an explicit center; diffuse with
# center=None, i.e. the value itself (M == N), whose gradient then sums both roles
MODES = ("aggregate", "diffuse", "diffuse_value")
NAMES = ("out", "grad_query", "grad_key", "grad_value", "grad_center")


def make_inputs(shape, dtype, mode, *, device="cpu", seed=0):
    """query, key, value, center (a tensor only in mode "diffuse"), grad_out for (B, N, M, D, E)."""
    batch, num_queries, num_keys, width_qk, width_v = shape
    generator = torch.Generator().manual_seed(seed)

    def draw(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    query, key = draw(batch, num_queries, width_qk), draw(batch, num_keys, width_qk)
    value = draw(batch, num_keys, width_v)
    center = draw(batch, num_queries, width_v) if mode == "diffuse" else None
    return query, key, value, center, draw(batch, num_queries, width_v)


def backend_results(kernel, mode, backend, query, key, value, center, grad_out, scale, log_normalizer=None,
                    dtype=None, device=None):
    """[out, grads of query, key, value (, center)] through the public functions, with
    the inputs cast to `dtype` and moved to `device` when given."""
    inputs = [t.detach().to(device=device or t.device, dtype=dtype or t.dtype).requires_grad_()
              for t in (query, key, value, center) if t is not None]
    if mode == "diffuse_value":
        out = fastnl.nonlocal_diffuse(*inputs, kernel=kernel, scale=scale, backend=backend)
    else:
        out, _ = fastnl.nonlocal_attend(*inputs, kernel=kernel, scale=scale, backend=backend,
                                        log_normalizer=log_normalizer)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=out.device, dtype=out.dtype))
    return [out.detach(), *grads]


def assert_matches_reference(results, kernel, mode, query, key, value, center, grad_out, scale, peer_dtype=None):
    """Compare [out, grads...] (on the inputs' device and dtype) with the float64 truth,
    allowing twice the error of the reference computed in `peer_dtype` (the inputs')."""
    operands = (query, key, value, center, grad_out)
    truth = backend_results(kernel, mode, "reference", *operands, scale, dtype=torch.float64, device="cpu")
    peer = backend_results(kernel, mode, "reference", *operands, scale, dtype=peer_dtype)
    assert len(results) == len(truth)
    for name, actual, in_dtype, exact in zip(NAMES, results, peer, truth):
        assert actual.dtype == query.dtype, f"{name} has dtype {actual.dtype}, inputs {query.dtype}"
        assert_close_to_truth(actual.cpu(), in_dtype.cpu(), exact, f"{kernel} {mode} {name}")
