"""The modules' embeddings on CPU rows: theta, phi (and the first block's g) of the same
rows x (R, C) as one projection, each part written to contiguous rows of its own, in one
operator each way (csrc/cpu/linear_parts.cpp).

One GEMM's joined (R, Q) result has to be split and each part copied, since the
nonlocal operators read contiguous rows; its backward concatenates the parts'
gradients, a copy of narrow rows, before two more GEMMs. Here the forward writes each
part where it goes, and the backward is dx = sum_k g_k W_k in one pass over the parts'
gradients, with dW_k = g_k^T x and db_k = the column sums of g_k as the moments
fastnl.batch_norm takes. `NonlocalStage(32, num_blocks=3)`'s embeddings at B=128,
16x16, fwd+bwd in float32: 1.29-1.70x faster (paired, Zen 4;
benchmarks/test_row_operators_bench.py).

float32 and float64 rows only: under bf16 autocast the GEMM's bf16 products (oneDNN)
with its split and concatenation were as fast as this operator's on vdpbf16ps (paired,
0.94-0.97x), so autocast, bfloat16 rows, other devices and a missing cpp build go to
F.linear, split and copied.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from fastnl import cpu_rows


@torch.library.custom_op("fastnl::linear_parts", mutates_args=())
def _forward(rows: Tensor, weight: Tensor, bias: Tensor, widths: list[int]) -> list[Tensor]:
    """[rows weight_k^T + bias_k] for the row blocks weight_k of weight (Q, P) of `widths`."""
    return torch.ops.fastnl_cpp.linear_parts_forward(rows, weight, bias, widths)


@_forward.register_fake
def _(rows, weight, bias, widths):
    return [rows.new_empty(rows.shape[0], width) for width in widths]


@torch.library.custom_op("fastnl::linear_parts_backward", mutates_args=())
def _backward(grads: list[Tensor], rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The parts' gradients -> (grad_rows, grad_weight, grad_bias)."""
    return tuple(torch.ops.fastnl_cpp.linear_parts_backward(grads, rows, weight))


@_backward.register_fake
def _(grads, rows, weight):
    return rows.new_empty(rows.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    rows, weight, _, _ = inputs
    ctx.save_for_backward(rows, weight)


def _grads(ctx, grads):
    rows, weight = ctx.saved_tensors
    grad_rows, grad_weight, grad_bias = _backward([grad.contiguous() for grad in grads], rows, weight)
    return grad_rows, grad_weight, grad_bias, None


_forward.register_autograd(_grads, setup_context=_setup_context)


def applies(rows, weight, bias):
    """Whether the operator projects `rows` here: CPU rows (R, P) of float32 or float64,
    the weight (Q, P) and bias (Q) like them, and the cpp backend built."""
    return (rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64) and rows.dim() == 2
            and bias is not None and weight.dtype == bias.dtype == rows.dtype and weight.dim() == 2
            and weight.shape[1] == rows.shape[1] and cpu_rows.built())


def parts(rows, weight, bias, widths):
    """rows (..., P), weight (Q, P), bias (Q) -> [rows weight_k^T + bias_k (..., width_k)]
    for the row blocks weight_k of `widths`, each contiguous. Under autocast, which casts
    float32 rows to its dtype, F.linear computes them."""
    autocast = torch.is_autocast_enabled(rows.device.type) and rows.dtype != torch.float64
    flat = rows.flatten(0, -2) if rows.dim() >= 2 else None
    if not autocast and flat is not None and applies(flat, weight, bias):
        outs = _forward(flat.contiguous(), weight.contiguous(), bias.contiguous(), list(widths))
        return [part.view(*rows.shape[:-1], width) for part, width in zip(outs, widths)]
    return [part.contiguous() for part in F.linear(rows, weight, bias).split(list(widths), dim=-1)]
