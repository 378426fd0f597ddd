"""The "triton" backend: fused Triton kernels (fastnl.kernels), the default on CUDA.

softmax runs FlashAttention-2-style kernels (kernels/softmax_fwd.py, softmax_bwd.py);
dot runs the O(N) associativity path with Triton products (kernels/dot.py);
concat is the torch backend's sort + suffix sums, reused as is: its cost is the sort,
which torch.sort already does on the GPU, and a Triton scan would only copy it.

On CPU tensors the kernels run only under Triton's interpreter (TRITON_INTERPRET=1
set before fastnl.kernels is imported), which is how the tests check them without a
GPU. Widths D and E up to 128; inputs float16, bfloat16 (GPU only: the interpreter
has no bfloat16), float32 and float64, accumulated in float32 (float64 for float64).
"""
import contextlib
import functools

import torch

from fastnl.backends import accumulate_dtype, refuse_widths_above
from fastnl.backends.torch_tiled import concat_backward, concat_forward  # noqa: F401

MAX_WIDTH = 128
refuses = refuse_widths_above(MAX_WIDTH)


def _kernels():
    """fastnl.kernels' launchers, imported on first use so that importing the backend
    module does not decide the interpreter mode."""
    from fastnl.kernels import _launch, dot, softmax_bwd, softmax_fwd

    return _launch, dot, softmax_fwd, softmax_bwd


def unavailable_reason(device_type):
    try:
        launch = _kernels()[0]
    except ImportError as error:
        return f"triton does not import: {error}"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if device_type == "cpu":
        if launch.INTERPRET:
            return None
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing fastnl"
    return f"Triton has no {device_type} target"


def _on_inputs_device(function):
    """Run `function` with the CUDA device of its first tensor current: Triton launches
    on the current device, which need not be the tensors' on a multi-GPU machine."""

    @functools.wraps(function)
    def wrapper(first, *args):
        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return function(first, *args)

    return wrapper


def _check(query, value):
    launch = _kernels()[0]
    if launch.INTERPRET and query.dtype == torch.bfloat16:
        raise TypeError("backend 'triton' under TRITON_INTERPRET=1 cannot compute bfloat16 "
                        "(the interpreter has no bfloat16); use float16/float32 or a GPU")
    refusal = refuses(query.shape[2], value.shape[2])
    if refusal is not None:
        raise ValueError(f"backend 'triton': {refusal}; use backend='torch'")


@_on_inputs_device
def softmax_forward(query, key, value, center, log_normalizer, scale):
    _check(query, value)
    launch, _, softmax_fwd, _ = _kernels()
    batch, num_queries = query.shape[:2]
    out = launch.new_output(value, (batch, num_queries, value.shape[2]))
    known = log_normalizer is not None
    if not known:
        log_normalizer = launch.new_output(query, (batch, num_queries), accumulate_dtype(query.dtype))
    softmax_fwd.softmax_forward(query, key, value, center, scale, out, log_normalizer, known)
    return out, log_normalizer


@_on_inputs_device
def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale):
    _check(query, value)
    launch, _, _, softmax_bwd = _kernels()
    delta = launch.new_output(query, query.shape[:2], accumulate_dtype(query.dtype))
    grads = tuple(launch.new_output(t, t.shape) for t in (query, key, value))
    softmax_bwd.softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale,
                                 delta, *grads)
    return grads


@_on_inputs_device
def dot_forward(query, key, value, center, scale):
    _check(query, value)
    dot = _kernels()[1]
    acc = accumulate_dtype(query.dtype)
    factor = scale / key.shape[1]
    state = dot.outer_sum(key, value)                                   # sum_j k_j v_j^T (B, D, E)
    out = dot.rows_times(query, state, factor, acc)
    # row_weight_i = factor q_i . sum_j k_j: a matrix-vector product, torch's
    row_weight = torch.bmm(query.to(acc), key.to(acc).sum(dim=1, keepdim=True).transpose(1, 2))
    row_weight = row_weight.squeeze(-1).mul_(factor)
    if center is not None:
        out.sub_(row_weight.unsqueeze(-1) * center.to(acc))
    return out.to(value.dtype), row_weight


@_on_inputs_device
def dot_backward(grad_out, query, key, value, center, scale):
    _check(query, value)
    dot = _kernels()[1]
    acc = accumulate_dtype(query.dtype)
    factor = scale / key.shape[1]
    grad_out = grad_out.to(acc).contiguous()
    state = dot.outer_sum(key, value)                                   # S = sum_j k_j v_j^T
    grad_state = dot.outer_sum(query, grad_out)                         # G = sum_i q_i dO_i^T
    grad_query = dot.rows_times(grad_out, state.transpose(1, 2), factor, acc)
    grad_key = dot.rows_times(value, grad_state.transpose(1, 2), factor, acc)
    grad_value = dot.rows_times(key, grad_state, factor, value.dtype)
    if center is not None:
        # the center's term -row_weight_i c_i: with g_i = dO_i . c_i, dq_i -= factor g_i sum_j k_j
        # and every dk_j -= factor sum_i g_i q_i (vector terms, torch's)
        center_grad = (grad_out * center.to(acc)).sum(dim=-1, keepdim=True)  # (B, N, 1)
        grad_query.sub_(factor * center_grad * key.to(acc).sum(dim=1, keepdim=True))
        grad_key.sub_(factor * (center_grad * query.to(acc)).sum(dim=1, keepdim=True))
    return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value
