"""BatchNorm on position rows, fused with the residual it is added to, for the modules'
W_z branch on the CPU: z + BN(W_z y) over rows (B, N, C), one C++ operator each way
(csrc/cpu/batch_norm.cpp). At the model's (128, 256, 32), fwd+bwd: float32 1.33 ms
against 2.53 for ATen's channels-last BatchNorm and the add, bf16 0.97 against 1.64
(benchmarks/test_training_bench.py times the whole stage).

It computes what `nn.BatchNorm*` computes in training (batch statistics; the running
statistics and `num_batches_tracked` updated as `F.batch_norm` updates them, momentum
None meaning the cumulative average) and returns the residual's gradient as it came.
`applies` says when it runs; everything else (eval with running statistics, a subclass
such as --sync-bn's, no affine parameters, another device, no cpp build) is left to the
module's own BatchNorm.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from fastnl import backends
from fastnl.backends import accumulate_dtype


@torch.library.custom_op("fastnl::batch_norm_rows", mutates_args=())
def _forward(rows: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
             eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(residual +) BatchNorm of rows (R, C) with batch statistics -> (out, mean, biased var, invstd)."""
    return tuple(torch.ops.fastnl_cpp.batch_norm_rows_forward(rows, weight, bias, residual, eps))


@_forward.register_fake
def _(rows, weight, bias, residual, eps):
    return rows.new_empty(rows.shape), *(weight.new_empty(weight.shape) for _ in range(3))


@torch.library.custom_op("fastnl::batch_norm_rows_backward", mutates_args=())
def _backward(grad_out: Tensor, rows: Tensor, weight: Tensor, mean: Tensor,
              invstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.ops.fastnl_cpp.batch_norm_rows_backward(grad_out, rows, weight, mean, invstd))


@_backward.register_fake
def _(grad_out, rows, weight, mean, invstd):
    return rows.new_empty(rows.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    rows, weight, _, residual, _ = inputs
    _, mean, _, invstd = output
    ctx.save_for_backward(rows, weight, mean, invstd)
    ctx.has_residual = residual is not None


def _grads(ctx, grad_out, _grad_mean, _grad_var, _grad_invstd):
    """The residual's gradient is grad_out itself; the statistics have none."""
    rows, weight, mean, invstd = ctx.saved_tensors
    grad_rows, grad_weight, grad_bias = _backward(grad_out.contiguous(), rows, weight, mean, invstd)
    return grad_rows, grad_weight, grad_bias, (grad_out if ctx.has_residual else None), None


_forward.register_autograd(_grads, setup_context=_setup_context)


@torch.compiler.assume_constant_result  # decided while tracing; no graph break
def _built():
    return backends.unavailable_reason("cpp", "cpu") is None


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def applies(bn, rows, residual):
    """Whether `batch_norm_rows` computes bn(rows) (+ residual) here: a plain
    nn.BatchNorm (a subclass, such as --sync-bn's, has a forward of its own) with batch
    statistics (training, or no running statistics), affine, CPU rows of float32,
    float64 or bfloat16 with the parameters in their accumulation dtype, a residual like
    the rows, more than one row per channel, and the cpp backend built."""
    batch_statistics = bn.training or bn.running_mean is None
    return (type(bn) in _PLAIN and batch_statistics and bn.affine and rows.device.type == "cpu"
            and rows.dtype in (torch.float32, torch.float64, torch.bfloat16)
            and bn.weight.dtype == accumulate_dtype(rows.dtype) and rows.numel() > rows.shape[-1]
            and (residual is None or (residual.dtype == rows.dtype and residual.shape == rows.shape))
            and _built())


def batch_norm_rows(bn, rows, residual=None):
    """residual + bn(rows) for rows (..., C) whose channels are bn's (see `applies`)."""
    shape = rows.shape
    flat = rows.reshape(-1, shape[-1]).contiguous()
    flat_residual = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
    out, mean, var, _ = _forward(flat, bn.weight, bn.bias, flat_residual, bn.eps)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * (flat.shape[0] / (flat.shape[0] - 1))
            bn.running_mean.copy_(factor * mean + (1 - factor) * bn.running_mean)
            bn.running_var.copy_(factor * unbiased + (1 - factor) * bn.running_var)
    return out.view(shape)
