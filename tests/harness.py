"""The one comparison harness: inputs, a call through the public functions, and the rule.

Every backend test on every device compares with fastnl.reference through these:
`make_inputs` draws one random problem, `backend_results` runs it forward and backward
through the public functions (on any backend, device and dtype), and
`assert_matches_reference` applies the one tolerance rule, `assert_close_to_truth`:
against the float64 truth, at most twice the error of fastnl.reference computed in the
same dtype on the same device, plus a floor per dtype. `compare` is all three at once.
`on_one_and_two_threads` checks that a computation does not depend on the thread count.
"""
import torch

import fastnl
from fastnl import affinities, backends

# how the operator is called: aggregate; diffuse with an explicit center; diffuse with
# the value itself as center (M == N), whose gradient then sums both roles
MODES = ("aggregate", "diffuse", "diffuse_value")
NAMES = ("out", "grad_query", "grad_key", "grad_value", "grad_center")

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
    """Every registered backend that runs natively on CPU tensors in this process.

    "triton" on CPU tensors is Triton's interpreter: too slow for these tables and
    without bfloat16; tests/test_triton_backend.py checks it at interpreter sizes.
    """
    return [name for name in backends.available("cpu") if name != "triton"]


def default_scale(kernel):
    """Softmax logits stay O(1) at 0.5; the mean kernels' weights are linear, 1.5 tests scaling."""
    return 0.5 if kernel == "softmax" else 1.5


def make_inputs(shape, dtype, mode="diffuse", *, kernel="softmax", magnitude=1.0, device="cpu", seed=0):
    """query, key, value, center (a tensor only in mode "diffuse"), grad_out for
    (B, N, M, D, E); D is the kernel's own width if it needs one (concat: 1), M = N for
    "diffuse_value"; query and key are scaled by `magnitude`."""
    batch, num_queries, num_keys, width_qk, width_v = shape
    width_qk = affinities.get(kernel).width_qk or width_qk
    if mode == "diffuse_value":
        num_keys = num_queries
    generator = torch.Generator().manual_seed(seed)

    def draw(*size, factor=1.0):
        tensor = factor * torch.randn(*size, generator=generator, dtype=torch.float64)
        return tensor.to(device=device, dtype=dtype)

    query = draw(batch, num_queries, width_qk, factor=magnitude)
    key = draw(batch, num_keys, width_qk, factor=magnitude)
    value = draw(batch, num_keys, width_v)
    center = draw(batch, num_queries, width_v) if mode == "diffuse" else None
    return query, key, value, center, draw(batch, num_queries, width_v)


def backend_results(kernel, mode, backend, query, key, value, center, grad_out, scale, log_normalizer=None,
                    dtype=None, device=None):
    """[out, grads of query, key, value (, center)] through the public functions, with
    the inputs cast to `dtype` and moved to `device` when given (strides kept otherwise)."""
    inputs = [t.detach().to(device=device or t.device, dtype=dtype or t.dtype).requires_grad_()
              for t in (query, key, value, center) if t is not None]
    if mode == "diffuse_value":
        out = fastnl.nonlocal_diffuse(*inputs, inputs[2], kernel=kernel, scale=scale, backend=backend)
    else:
        out, _ = fastnl.nonlocal_attend(*inputs, kernel=kernel, scale=scale, backend=backend,
                                        log_normalizer=log_normalizer)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=out.device, dtype=out.dtype))
    return [out.detach(), *grads]


def assert_close_to_truth(actual, reference_in_dtype, truth, what="", magnitude=None):
    """|actual - truth| <= 2 |reference - truth| + floor * max(1, magnitude), elementwise max;
    the floor is that of the reference's dtype (usually actual's), `magnitude` that of
    the terms the result is formed from (default: |truth|)."""
    if truth.numel() == 0:
        return
    truth = truth.double()
    error = (actual.double() - truth).abs()
    reference_error = (reference_in_dtype.double() - truth).abs().max().item()
    magnitude = truth.abs().max().item() if magnitude is None else magnitude
    allowed = 2 * reference_error + ERROR_FLOOR[reference_in_dtype.dtype] * max(1.0, magnitude)
    worst = error.argmax()
    index = tuple(int(i) for i in torch.unravel_index(worst, error.shape))
    assert error.max().item() <= allowed, (
        f"{what}: max error {error.max().item():.3e} at {index} "
        f"(got {actual.flatten()[worst].item()}, truth {truth.flatten()[worst].item()}), "
        f"allowed {allowed:.3e} (reference in {actual.dtype} errs {reference_error:.3e})"
    )


def assert_within_statistic_rounding(actual, truth, max_logit, what=""):
    """float32 at large logits: the row log_normalizer ~ max_logit is stored in float32, so
    exp(s - log_normalizer) carries a relative error of about |log_normalizer| eps(float32)
    (PyTorch's softmax never stores it); allowed 4 eps max(|logit|, 1) max(1, |truth|)."""
    bound = 4 * torch.finfo(torch.float32).eps * max(max_logit, 1.0) * max(1.0, truth.abs().max().item())
    error = (actual.double() - truth.double()).abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3e}, allowed {bound:.3e}"


def assert_matches_reference(results, kernel, mode, query, key, value, center, grad_out, scale, peer_dtype=None):
    """Compare [out, grads...] (on the inputs' device and dtype) with the float64 truth,
    allowing twice the error of the reference computed in `peer_dtype` (the inputs')."""
    operands = (query, key, value, center, grad_out)
    truth = backend_results(kernel, mode, "reference", *operands, scale, dtype=torch.float64, device="cpu")
    peer = backend_results(kernel, mode, "reference", *operands, scale, dtype=peer_dtype)
    assert len(results) == len(truth)
    for name, actual, in_dtype, exact in zip(NAMES, results, peer, truth):
        assert actual.dtype == query.dtype, f"{name} has dtype {actual.dtype}, inputs {query.dtype}"
        assert actual.shape == exact.shape, f"{name} has shape {tuple(actual.shape)}, truth {tuple(exact.shape)}"
        magnitude = None
        if name == "out" and mode != "aggregate" and exact.numel():
            # a diffusion is aggregate - weighted center: a backend that forms the two and
            # subtracts (the mean kernels' exact paths) rounds at their size, not the result's
            aggregate = backend_results(kernel, "aggregate", "reference", *operands, scale, dtype=torch.float64,
                                        device="cpu")[0]
            magnitude = max(exact.abs().max().item(), aggregate.abs().max().item())
        assert_close_to_truth(actual.cpu(), in_dtype.cpu(), exact, f"{kernel} {mode} {name}", magnitude)


def compare(backend, kernel, mode, shape, dtype, *, magnitude=1.0, scale=None, device="cpu"):
    """One problem through `backend`, checked against the reference by the rule above."""
    scale = default_scale(kernel) if scale is None else scale
    inputs = make_inputs(shape, dtype, mode, kernel=kernel, magnitude=magnitude, device=device)
    results = backend_results(kernel, mode, backend, *inputs, scale)
    assert_matches_reference(results, kernel, mode, *inputs, scale)


def on_one_and_two_threads(function):
    """function()'s tensors on 1 and on 2 threads, checked bitwise equal: -> the first."""
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(list(function()))
    finally:
        torch.set_num_threads(threads)
    assert len(results[0]) == len(results[1])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    return results[0]
