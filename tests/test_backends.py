"""Every backend against fastnl.reference: forward and every gradient, over shapes and dtypes."""
import pytest
import torch
from conftest import assert_close_to_truth, cpu_backends

import fastnl
from fastnl import affinities, reference

KERNELS = affinities.names()  # every registered kernel

# (B, N, M, D, E); concat always runs with D = 1
SHAPES = [
    (1, 1, 1, 8, 16),  # a single position
    (2, 1, 37, 16, 1),  # N = 1, odd M, E = 1
    (2, 37, 37, 8, 16),  # odd N, one key tile
    (2, 300, 300, 16, 48),  # N = M over two 128-key tiles, not a multiple of one
    (1, 45, 513, 64, 16),  # M != N, five key tiles
    (3, 64, 17, 1, 48),  # D = 1
]
LOW_PRECISION_SHAPES = [SHAPES[2], SHAPES[3]]
OPERATIONS = ["aggregate", "diffuse_center", "diffuse_default"]


def make_inputs(shape, kernel, dtype, magnitude=1.0):
    batch, num_queries, num_keys, width, value_width = shape
    width = affinities.get(kernel).width or width
    query = magnitude * torch.randn(batch, num_queries, width, dtype=torch.float64)
    key = magnitude * torch.randn(batch, num_keys, width, dtype=torch.float64)
    value = torch.randn(batch, num_keys, value_width, dtype=torch.float64)
    center = torch.randn(batch, num_queries, value_width, dtype=torch.float64)
    return [t.to(dtype) for t in (query, key, value, center)]


def run(operation, inputs, kernel, scale, backend):
    """Forward of `operation`; returns (out, the tensors it differentiates)."""
    query, key, value, center = [t.detach().clone().requires_grad_() for t in inputs]
    if operation == "aggregate":
        out = fastnl.nonlocal_aggregate(query, key, value, kernel=kernel, scale=scale, backend=backend)
        return out, (query, key, value)
    if operation == "diffuse_center":
        out = fastnl.nonlocal_diffuse(query, key, value, center, kernel=kernel, scale=scale, backend=backend)
        return out, (query, key, value, center)
    out = fastnl.nonlocal_diffuse(query, key, value, kernel=kernel, scale=scale, backend=backend)
    return out, (query, key, value)


def compare(backend, operation, kernel, shape, dtype, magnitude=1.0):
    if operation == "diffuse_default" and shape[1] != shape[2]:
        shape = (shape[0], shape[1], shape[1], *shape[3:])
    scale = 0.5 if kernel == "softmax" else 1.5
    inputs = make_inputs(shape, kernel, dtype, magnitude)
    out, leaves = run(operation, inputs, kernel, scale, backend)
    ref_out, ref_leaves = run(operation, inputs, kernel, scale, "reference")
    truth_out, truth_leaves = run(operation, [t.double() for t in inputs], kernel, scale, "reference")
    assert out.dtype == dtype and out.shape == truth_out.shape
    assert_close_to_truth(out, ref_out, truth_out, f"{backend} {operation} forward")

    grad_out = torch.randn(truth_out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.to(dtype))
    truth_grads = torch.autograd.grad(truth_out, truth_leaves, grad_out)
    for name, grad, ref_grad, truth_grad in zip("query key value center".split(), grads, ref_grads, truth_grads):
        assert grad.dtype == dtype
        assert_close_to_truth(grad, ref_grad, truth_grad, f"{backend} {operation} grad {name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(backend, kernel, operation, shape, dtype):
    compare(backend, operation, kernel, shape, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("operation", ["aggregate", "diffuse_center"])
@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(backend, kernel, operation, shape, dtype):
    compare(backend, operation, kernel, shape, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 30.0])  # tiny values; logits up to ~1e4
def test_extreme_values_float64(backend, kernel, magnitude):
    compare(backend, "diffuse_center", kernel, (2, 37, 300, 16, 16), torch.float64, magnitude)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
def test_large_logits_float32(backend, kernel):
    """Logits of ~1e4 stay finite. The row statistic lse ~ 1e4 is stored in float32, so
    exp(s - lse) carries a relative error of about |lse| * eps(float32) = 1e-3: the
    tolerance is that bound, not the flash rule (PyTorch's softmax never stores lse)."""
    inputs = make_inputs((2, 37, 300, 16, 16), kernel, torch.float32, magnitude=30.0)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fastnl.nonlocal_diffuse(*leaves, kernel=kernel, scale=1.0, backend=backend)
    truth_leaves = [t.double().requires_grad_() for t in inputs]
    truth = reference.diffuse(*truth_leaves, kernel=kernel)
    max_logit = (truth_leaves[0] @ truth_leaves[1].transpose(1, 2)).abs().max().item()
    assert max_logit > 3000 or kernel == "concat"
    grad_out = torch.randn_like(truth)
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    truth_grads = torch.autograd.grad(truth, truth_leaves, grad_out)
    for name, actual, expected in zip("out query key value center".split(), (out, *grads), (truth, *truth_grads)):
        assert torch.isfinite(actual).all(), name
        bound = 4 * torch.finfo(torch.float32).eps * max(max_logit, 1.0) * max(1.0, expected.abs().max().item())
        assert (actual.double() - expected).abs().max().item() <= bound, name


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_center", [False, True])
def test_gradcheck(backend, kernel, with_center):
    query, key, value, center = [t.requires_grad_() for t in make_inputs((2, 7, 11, 3, 4), kernel, torch.float64)]
    if kernel == "concat":  # keep every q_i + k_j away from relu's kink
        query = (query.detach() + 0.05 * torch.sign(query.detach())).requires_grad_()
    def function(*inputs):
        if with_center:
            return fastnl.nonlocal_diffuse(*inputs, kernel=kernel, scale=0.7, backend=backend)
        return fastnl.nonlocal_aggregate(*inputs, kernel=kernel, scale=0.7, backend=backend)

    inputs = (query, key, value, center) if with_center else (query, key, value)
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("backend", cpu_backends())
def test_log_normalizer_reuse_is_exact(backend):
    """Passing the first call's statistics back (the stage's path) changes nothing."""
    query, key, value, center = make_inputs((2, 50, 300, 8, 16), "softmax", torch.float64)
    query.requires_grad_()
    out, log_normalizer = fastnl.nonlocal_attend(query, key, value, center, backend=backend)
    assert log_normalizer.shape == (2, 50) and log_normalizer.dtype == torch.float64
    expected_lse = torch.logsumexp(query.detach() @ key.transpose(1, 2), dim=-1)
    torch.testing.assert_close(log_normalizer, expected_lse)
    assert not log_normalizer.requires_grad
    reused, same = fastnl.nonlocal_attend(query, key, value, center, backend=backend, log_normalizer=log_normalizer)
    assert same is log_normalizer
    torch.testing.assert_close(reused, out, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, query, grad_out)
    (grad_reused,) = torch.autograd.grad(reused, query, grad_out)
    torch.testing.assert_close(grad_reused, grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_inputs(backend, kernel):
    query, key, value, center = make_inputs((2, 40, 40, 8, 6), kernel, torch.float64)
    strided = [torch.cat([t, t], dim=-1)[..., : t.shape[-1]] for t in (query, key, value, center)]
    assert not strided[0].is_contiguous()
    torch.testing.assert_close(
        fastnl.nonlocal_diffuse(*strided, kernel=kernel, backend=backend),
        reference.diffuse(query, key, value, center, kernel=kernel),
    )
