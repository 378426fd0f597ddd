"""What the backend tests share: inputs, the float64 truth, and the comparison rule.

Every backend is checked the same way (STYLE.md, "Tests are tables"): one random input
is cloned into the reference (in float64) and the backend, both are backpropagated
with the same grad_out, and the output and every gradient are compared. For float16
and bfloat16 the rule is flash-attention's: the backend's error against the float64
truth may be at most twice the error of fastnl.reference computed in the same dtype,
plus a small floor.
"""
import torch

import fastnl
from fastnl import reference

# dtype -> (atol, rtol) for exact-arithmetic dtypes, or the floor of the 2x rule
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 0.0),
    torch.bfloat16: (1e-2, 0.0),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


# how the operator is called: aggregate; diffuse with an explicit center; diffuse with
# center=None, i.e. the value itself (M == N), whose gradient then sums both roles
MODES = ("aggregate", "diffuse", "diffuse_value")


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


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors if t is not None]


def reference_results(kernel, mode, query, key, value, center, grad_out, scale, dtype=torch.float64):
    """fastnl.reference's output and input gradients, computed in `dtype`."""
    inputs = _leaves((query, key, value, center), dtype)
    if mode == "aggregate":
        out = reference.aggregate(*inputs, kernel=kernel, scale=scale)
    else:
        out = reference.diffuse(*inputs, kernel=kernel, scale=scale)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(dtype))]


def backend_results(kernel, mode, backend, query, key, value, center, grad_out, scale, log_normalizer=None):
    """The backend's output and input gradients through the public functions."""
    inputs = _leaves((query, key, value, center))
    if mode == "diffuse_value":
        out = fastnl.nonlocal_diffuse(*inputs, kernel=kernel, scale=scale, backend=backend)
    else:
        out, _ = fastnl.nonlocal_attend(*inputs, kernel=kernel, scale=scale, backend=backend,
                                        log_normalizer=log_normalizer)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


NAMES = ("out", "grad_query", "grad_key", "grad_value", "grad_center")


def assert_matches_reference(results, kernel, mode, query, key, value, center, grad_out, scale):
    """Compare [out, grads...] (any device, the inputs' dtype) with the float64 truth."""
    dtype = query.dtype
    truth = reference_results(kernel, mode, query, key, value, center, grad_out, scale)
    peer = None
    if dtype in LOW_PRECISION:
        peer = reference_results(kernel, mode, query, key, value, center, grad_out, scale, dtype)
    floor, rtol = TOLERANCES[dtype]
    for index, (name, actual, expected) in enumerate(zip(NAMES, results, truth)):
        error = (actual.double().cpu() - expected).abs()
        if peer is None:
            allowed = floor + rtol * expected.abs()
        else:
            allowed = 2 * (peer[index].double().cpu() - expected).abs().max() + floor
        worst = (error - allowed).argmax()
        assert bool((error <= allowed).all()), (
            f"{name}: error {error.flatten()[worst]:.3g} > allowed {torch.as_tensor(allowed).expand_as(error).flatten()[worst]:.3g} "
            f"at flat index {worst.item()} (expected {expected.flatten()[worst]:.4g}, "
            f"got {actual.flatten()[worst].item():.4g})"
        )
