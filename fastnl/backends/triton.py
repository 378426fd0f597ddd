"""The "triton" backend: fused Triton kernels (fastnl.kernels), the default on CUDA.

softmax runs FlashAttention-2-style kernels (kernels/softmax_fwd.py, softmax_bwd.py);
dot runs the O(N) associativity path with Triton products (kernels/linear.py);
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

from fastnl.backends.torch_tiled import accumulate_dtype, concat_backward, concat_forward  # noqa: F401

MAX_WIDTH = 128


def _kernels():
    """fastnl.kernels' launchers, imported on first use so that importing the backend
    module does not decide the interpreter mode."""
    from fastnl.kernels import _launch, linear, softmax_bwd, softmax_fwd

    return _launch, linear, softmax_fwd, softmax_bwd


def is_available(device_type):
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
    widths = {"D": query.shape[2], "E": value.shape[2]}
    if max(widths.values()) > MAX_WIDTH:
        raise ValueError(f"backend 'triton' supports widths up to {MAX_WIDTH}, got {widths}; "
                         f"use backend='torch'")


@_on_inputs_device
def softmax_forward(query, key, value, center, log_normalizer, scale):
    _check(query, value)
    softmax_fwd = _kernels()[2]
    batch, num_queries = query.shape[:2]
    out = value.new_empty(batch, num_queries, value.shape[2])
    stats = None
    if log_normalizer is None:
        stats = query.new_empty(batch, num_queries, dtype=accumulate_dtype(query.dtype))
    softmax_fwd.softmax_forward(query, key, value, center, log_normalizer, scale, out, stats)
    return out, (log_normalizer if log_normalizer is not None else stats)


@_on_inputs_device
def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale):
    _check(query, value)
    softmax_bwd = _kernels()[3]
    delta = query.new_empty(query.shape[:2], dtype=accumulate_dtype(query.dtype))
    grads = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    softmax_bwd.softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale,
                                 delta, *grads)
    return grads


def _with_column(rows, column):
    """(B, R, F), (B, R) -> (B, R, F + 1): the extra column carries a row-wise scalar
    through the same products, e.g. ones give sum_j k_j beside sum_j k_j v_j^T."""
    return torch.cat([rows, column.unsqueeze(-1).to(rows.dtype)], dim=-1)


@_on_inputs_device
def dot_forward(query, key, value, center, scale):
    _check(query, value)
    linear = _kernels()[1]
    acc = accumulate_dtype(query.dtype)
    width_v = value.shape[2]
    # state (B, D, E + 1) = [sum_j k_j v_j^T, sum_j k_j]
    state = linear.outer_sum(key, _with_column(value, torch.ones_like(value[..., 0])))
    sums = linear.rows_times(query, state, scale / key.shape[1], acc)
    # fresh contiguous tensors: a custom op's outputs may not alias, and must have the
    # strides its fake kernel promises
    out, row_weight = sums[..., :width_v].contiguous(), sums[..., width_v].contiguous()
    if center is not None:
        out.sub_(row_weight.unsqueeze(-1) * center.to(acc))
    return out.to(value.dtype), row_weight


@_on_inputs_device
def dot_backward(grad_out, query, key, value, center, scale):
    _check(query, value)
    linear = _kernels()[1]
    acc = accumulate_dtype(query.dtype)
    factor = scale / key.shape[1]
    width_v = value.shape[2]
    grad_out = grad_out.to(acc)
    # the center's term enters as an extra column -(dO_i . c_i) against sum_j k_j
    if center is None:
        center_grad = grad_out.new_zeros(grad_out.shape[:2])
    else:
        center_grad = (grad_out * center.to(acc)).sum(dim=-1)
    grad_rows = _with_column(grad_out, -center_grad)                     # (B, N, E + 1)
    value_rows = _with_column(value, torch.ones_like(value[..., 0]))      # (B, M, E + 1)
    state = linear.outer_sum(key, value_rows)                            # (B, D, E + 1)
    grad_state = linear.outer_sum(query, grad_rows)                      # (B, D, E + 1), / factor
    grad_query = linear.rows_times(grad_rows, state.transpose(1, 2), factor, query.dtype)
    grad_key = linear.rows_times(value_rows, grad_state.transpose(1, 2), factor, key.dtype)
    grad_value = linear.rows_times(key, grad_state[..., :width_v], factor, value.dtype)
    return grad_query, grad_key, grad_value
