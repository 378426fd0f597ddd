"""The fused operators as `torch.library` custom ops, with autograd and fake kernels.

The softmax ops (forward without and with a known log_normalizer, backward, and the two
backward halves of a stage's shared affinity: fastnl.shared_affinity) serve every
softmax-normalised kernel; each mean-normalised kernel of fastnl.affinities gets its own
forward and backward pair (`mean_ops`). Each takes the backend's name and calls that module
(`fastnl.backends`); the ops own the contract with PyTorch (shapes, autograd,
torch.compile), the backends own the arithmetic.

Layout contract: the ops take inputs of any strides (they hand the backends contiguous
copies where needed) and return contiguous tensors, and the fake kernels say exactly
that. Inductor checks the real strides against the fake ones, and callers may pass
transposed views (a (B, C, N) tensor seen as (B, N, C)).
"""
from typing import Optional

import torch
from torch import Tensor

from fastnl import backends


def _contiguous(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _call(backend, function, *args):
    """backends.get(backend).function on contiguous copies of the tensors in `args` (and
    in its lists of tensors), returning contiguous tensors. Autocast is off inside: an op computes in its inputs'
    dtype (fastnl.functional casts them under autocast), and a backend's own products
    in the accumulator dtype stay there."""
    args = [arg.contiguous() if isinstance(arg, Tensor) else [t.contiguous() for t in arg] if isinstance(arg, list)
            else arg for arg in args]
    device = next(arg for arg in args if isinstance(arg, Tensor)).device
    with torch.autocast(device.type, enabled=False):
        result = getattr(backends.get(backend), function)(*args)
    return _contiguous(*result) if isinstance(result, tuple) else result.contiguous()


def _empty(*tensors):
    """Contiguous tensors shaped like `tensors`: what the backward ops return."""
    return tuple(t.new_empty(t.shape) for t in tensors)


# --- softmax ---------------------------------------------------------------------


@torch.library.custom_op("fastnl::softmax_forward", mutates_args=())
def softmax_forward(
    query: Tensor, key: Tensor, value: Tensor, center: Optional[Tensor], scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """(out, log_normalizer): out_i = sum_j softmax_j(scale q_i.k_j) v_j [- c_i]; log_normalizer (B, N)
    the row log-sum-exp."""
    return _call(backend, "softmax_forward", query, key, value, center, None, scale)


@softmax_forward.register_fake
def _(query, key, value, center, scale, backend):
    out = value.new_empty(query.shape[0], query.shape[1], value.shape[2])
    return out, query.new_empty(query.shape[:2], dtype=backends.accumulate_dtype(query.dtype))


@torch.library.custom_op("fastnl::softmax_forward_with_log_normalizer", mutates_args=())
def softmax_forward_with_log_normalizer(
    query: Tensor, key: Tensor, value: Tensor, center: Optional[Tensor], log_normalizer: Tensor,
    scale: float, backend: str,
) -> Tensor:
    """As softmax_forward, with the row log-sum-exp already known: a single pass."""
    return _call(backend, "softmax_forward", query, key, value, center, log_normalizer, scale)[0]


@softmax_forward_with_log_normalizer.register_fake
def _(query, key, value, center, log_normalizer, scale, backend):
    torch._check(log_normalizer.shape == query.shape[:2], lambda: "log_normalizer must be (B, N)")
    return value.new_empty(query.shape[0], query.shape[1], value.shape[2])


@torch.library.custom_op("fastnl::softmax_backward", mutates_args=())
def softmax_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, center: Optional[Tensor],
    out: Tensor, log_normalizer: Tensor, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _call(backend, "softmax_backward", grad_out, query, key, value, center, out, log_normalizer, scale)


@softmax_backward.register_fake
def _(grad_out, query, key, value, center, out, log_normalizer, scale, backend):
    return _empty(query, key, value)


def value_and_center_grads(grad_value, grad_out, has_center, center_is_value):
    """(grad_value, grad_center) of a softmax call: the center's gradient is -grad_out. The
    stage's call has g(z) as both, so its one gradient is the value's minus grad_out,
    written in place (a - b is a + (-b) bit for bit), without a negated copy for autograd
    to add."""
    if center_is_value:
        return grad_value.sub_(grad_out), None
    return grad_value, (-grad_out if has_center else None)


def _softmax_grads(ctx, grad_out, out, log_normalizer):
    query, key, value, center = ctx.saved_tensors[:4]
    grad_query, grad_key, grad_value = softmax_backward(
        grad_out, query, key, value, center, out, log_normalizer, ctx.scale, ctx.backend
    )
    return grad_query, grad_key, *value_and_center_grads(grad_value, grad_out, center is not None,
                                                         ctx.center_is_value)


def _setup_softmax(ctx, inputs, output):
    query, key, value, center, scale, backend = inputs
    out, log_normalizer = output
    ctx.save_for_backward(query, key, value, center, out, log_normalizer)
    ctx.scale, ctx.backend, ctx.center_is_value = scale, backend, center is value
    ctx.mark_non_differentiable(log_normalizer)


def _backward_softmax(ctx, grad_out, grad_log_normalizer):
    out, log_normalizer = ctx.saved_tensors[4:]
    return *_softmax_grads(ctx, grad_out, out, log_normalizer), None, None


def _setup_softmax_with_log_normalizer(ctx, inputs, output):
    query, key, value, center, log_normalizer, scale, backend = inputs
    ctx.save_for_backward(query, key, value, center, output, log_normalizer)
    ctx.scale, ctx.backend, ctx.center_is_value = scale, backend, center is value


def _backward_softmax_with_log_normalizer(ctx, grad_out):
    out, log_normalizer = ctx.saved_tensors[4:]
    # log_normalizer is a cache of query/key: their gradient is already in dq, dk
    grad_query, grad_key, grad_value, grad_center = _softmax_grads(ctx, grad_out, out, log_normalizer)
    return grad_query, grad_key, grad_value, grad_center, None, None, None


@torch.library.custom_op("fastnl::softmax_values_backward", mutates_args=())
def softmax_values_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, log_normalizer: Tensor, scale: float, backend: str
) -> Tensor:
    """grad_value = P^T grad_out alone (a stage's later blocks: fastnl.shared_affinity)."""
    return _call(backend, "softmax_values_backward", grad_out, query, key, log_normalizer, scale)


@softmax_values_backward.register_fake
def _(grad_out, query, key, log_normalizer, scale, backend):
    return grad_out.new_empty(key.shape[0], key.shape[1], grad_out.shape[2])


@torch.library.custom_op("fastnl::softmax_shared_backward", mutates_args=())
def softmax_shared_backward(
    grad_outs: list[Tensor], query: Tensor, key: Tensor, values: list[Tensor], centers: list[Tensor],
    outs: list[Tensor], log_normalizer: Tensor, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_query, grad_key) of K calls sharing query, key and log_normalizer, and the first
    call's grad_value (fastnl.shared_affinity); centers empty or one per call."""
    return _call(backend, "softmax_shared_backward", grad_outs, query, key, values, centers, outs, log_normalizer,
                 scale)


@softmax_shared_backward.register_fake
def _(grad_outs, query, key, values, centers, outs, log_normalizer, scale, backend):
    return _empty(query, key, values[0])


softmax_forward.register_autograd(_backward_softmax, setup_context=_setup_softmax)
softmax_forward_with_log_normalizer.register_autograd(
    _backward_softmax_with_log_normalizer, setup_context=_setup_softmax_with_log_normalizer
)


# --- the mean-normalised kernels (dot, concat, ...): C_i = M, exact without the N x M matrix ---


def _define_mean_kernel(name):
    """Register fastnl::{name}_forward / {name}_backward with autograd for kernel `name`."""

    def forward_impl(query: Tensor, key: Tensor, value: Tensor, center: Optional[Tensor], scale: float,
                     backend: str) -> tuple[Tensor, Tensor]:
        return _call(backend, f"{name}_forward", query, key, value, center, scale)

    def backward_impl(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, center: Optional[Tensor],
                      scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        return _call(backend, f"{name}_backward", grad_out, query, key, value, center, scale)

    forward_op = torch.library.custom_op(f"fastnl::{name}_forward", forward_impl, mutates_args=())
    backward_op = torch.library.custom_op(f"fastnl::{name}_backward", backward_impl, mutates_args=())

    @forward_op.register_fake
    def _(query, key, value, center, scale, backend):
        out = value.new_empty(query.shape[0], query.shape[1], value.shape[2])
        return out, query.new_empty(query.shape[:2], dtype=backends.accumulate_dtype(query.dtype))

    @backward_op.register_fake
    def _(grad_out, query, key, value, center, scale, backend):
        return _empty(query, key, value)

    def setup_context(ctx, inputs, output):
        query, key, value, center, scale, backend = inputs
        ctx.save_for_backward(query, key, value, center, output[1])
        ctx.scale, ctx.backend = scale, backend
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out, grad_row_weight):
        query, key, value, center, row_weight = ctx.saved_tensors
        grads = backward_op(grad_out, query, key, value, center, ctx.scale, ctx.backend)
        grad_center = None
        if center is not None:
            grad_center = -(row_weight.unsqueeze(-1) * grad_out).to(center.dtype)
        return *grads, grad_center, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op


_MEAN_OPS = {}  # kernel name -> (forward, backward); a plain dict, which torch.compile reads


def mean_ops(name):
    """(forward, backward): the custom ops of the mean-normalised kernel `name`, defined
    on first request (fastnl.affinities.register makes it when the kernel is added)."""
    if name not in _MEAN_OPS:
        _MEAN_OPS[name] = _define_mean_kernel(name)
    return _MEAN_OPS[name]
