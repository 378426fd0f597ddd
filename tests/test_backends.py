"""Every CPU backend against fastnl.reference: forward and every gradient, over shapes
and dtypes, through the one harness (tests/harness.py)."""
import pytest
import torch
from harness import MODES, assert_within_statistic_rounding, compare, cpu_backends, make_inputs

import fastnl
from fastnl import affinities, backends, reference

KERNELS = affinities.names()  # every registered kernel

# (B, N, M, D, E); a kernel that needs a width gets it (concat: D = 1), "diffuse_value"
# runs with M = N. The cpp softmax tiles are 64 query rows x 128 keys forward, 32 x 128
# backward (csrc/cpu/softmax_tiles.h; bf16 on AMX: 128 x 256 forward where N >= 128, 128 x 256 backward),
# in vectors of 16 floats / 8 doubles; the torch backend's key tiles are 128
# (fastnl/backends/torch_tiled.py).
SHAPES = [
    (1, 1, 1, 8, 1),  # N = M = 1: one row, one key; E narrower than a vector
    (2, 1, 300, 8, 16),  # N = 1 against two full key tiles and a partial one
    (2, 1, 37, 16, 1),  # N = 1, odd M, E = 1
    (2, 37, 37, 8, 16),  # odd N, one partial key tile
    (2, 100, 77, 8, 16),  # cpp D = 8: dQ contracted lane-wise; N a multiple of no tile; M != N
    (1, 200, 260, 16, 48),  # B = 1: cpp's backward splits the queries into groups; E = three vectors
    (2, 300, 300, 16, 48),  # N = M over two 128-key tiles and a partial one
    (3, 70, 129, 64, 1),  # cpp D = 64: the runtime-width product; 129 keys = one tile + 1
    (1, 45, 513, 64, 16),  # M >> N: five key tiles
    (3, 64, 17, 1, 48),  # D = 1: the width a dot/softmax rarely sees, concat's own
    (16, 50, 70, 16, 16),  # B = 16: cpp's backward keeps one query group a batch, which writes its dK, dV itself
]
LOW_PRECISION_SHAPES = [SHAPES[3], SHAPES[4], SHAPES[6], SHAPES[10]]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(backend, kernel, mode, shape, dtype):
    compare(backend, kernel, mode, shape, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["aggregate", "diffuse"])
@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_reference_low_precision(backend, kernel, mode, shape, dtype):
    compare(backend, kernel, mode, shape, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 30.0])  # tiny values; logits up to ~1e4
def test_extreme_values_float64(backend, kernel, magnitude):
    compare(backend, kernel, "diffuse", (2, 37, 300, 16, 16), torch.float64, magnitude=magnitude)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
def test_large_logits_float32(backend, kernel):
    """Logits of ~1e4 stay finite. The row log_normalizer ~ 1e4 is stored in float32, so
    exp(s - log_normalizer) carries a relative error of about |log_normalizer| * eps(float32)
    = 1e-3: the tolerance is that bound, not the flash rule (PyTorch's softmax never
    stores it)."""
    inputs = make_inputs((2, 37, 300, 16, 16), torch.float32, kernel=kernel, magnitude=30.0)[:4]
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
        assert_within_statistic_rounding(actual, expected, max_logit, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_center", [False, True])
def test_gradcheck(backend, kernel, with_center):
    query, key, value, center = [t.requires_grad_() for t in make_inputs((2, 7, 11, 3, 4), torch.float64,
                                                                         kernel=kernel)[:4]]
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
    query, key, value, center, _ = make_inputs((2, 50, 300, 8, 16), torch.float64)
    query.requires_grad_()
    out, log_normalizer = fastnl.nonlocal_attend(query, key, value, center, backend=backend)
    assert log_normalizer.shape == (2, 50) and log_normalizer.dtype == torch.float64
    expected_log_normalizer = torch.logsumexp(query.detach() @ key.transpose(1, 2), dim=-1)
    torch.testing.assert_close(log_normalizer, expected_log_normalizer)
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
    query, key, value, center, _ = make_inputs((2, 40, 40, 8, 6), torch.float64, kernel=kernel)
    strided = [torch.cat([t, t], dim=-1)[..., : t.shape[-1]] for t in (query, key, value, center)]
    assert not strided[0].is_contiguous()
    torch.testing.assert_close(
        fastnl.nonlocal_diffuse(*strided, kernel=kernel, backend=backend),
        reference.diffuse(query, key, value, center, kernel=kernel),
    )


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", KERNELS)
def test_value_as_its_own_center(backend, kernel):
    """The stage's call, diffuse(q, k, v, v): gradcheck in float64, and in float32 the same
    gradient bit for bit as for a separate copy of v as the center (the two gradients summed)."""
    query, key, value = [t.requires_grad_() for t in make_inputs((2, 7, 7, 3, 4), torch.float64, kernel=kernel)[:3]]
    if kernel == "concat":  # keep every q_i + k_j away from relu's kink
        query = (query.detach() + 0.05 * torch.sign(query.detach())).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: fastnl.nonlocal_diffuse(q, k, v, v, kernel=kernel, scale=0.7, backend=backend),
        (query, key, value))
    query, key, value, _, _ = make_inputs((2, 40, 40, 8, 6), torch.float32, kernel=kernel)
    value, copy = value.clone().requires_grad_(), value.clone().requires_grad_()
    grad_out = torch.randn(2, 40, 6)
    out = fastnl.nonlocal_diffuse(query, key, value, value, kernel=kernel, backend=backend)
    (grad,) = torch.autograd.grad(out, value, grad_out)
    separate = fastnl.nonlocal_diffuse(query, key, value, copy, kernel=kernel, backend=backend)
    grad_value, grad_center = torch.autograd.grad(separate, (value, copy), grad_out)
    assert torch.equal(separate, out) and torch.equal(grad, grad_value + grad_center)


def test_bfloat16_path_names_the_choice_where_a_backend_makes_one():
    """The cpp backend chooses how it computes bf16 (its bfloat16_path); the others, and
    "reference", have one way and say None."""
    assert backends.bfloat16_path("torch") is None and backends.bfloat16_path("reference") is None
    if backends.unavailable_reason("cpp", "cpu") is None:
        from fastnl.backends import cpp

        assert backends.bfloat16_path("cpp") == cpp.bfloat16_path()
