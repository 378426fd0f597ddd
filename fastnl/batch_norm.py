"""The modules' W_z branch in training on CPU rows: residual + BatchNorm(y W^T + b), the
BatchNorm with batch statistics, computed without ever storing the projection u = y W^T + b.

u's channel means are W mean(y) + b and its variances diag(W Cov(y) W^T), so the
statistics come from y's own moments (one pass over the narrow y: E = C' columns
against C), and the normalised result is one more projection of y with the BatchNorm
folded into its weight: out = residual + y (s W)^T + t, s = gamma / std, t = beta -
s W mean(y). The backward's sums over rows are grad^T y, and the gradient of y is again
a projection: grad (s W) + y M + c. Two passes over the narrow rows each way, in one
C++ operator each (csrc/cpu/batch_norm.cpp), where the projection and nn.BatchNorm
write u and pass over it twice more. Sums and statistics are float32 (float64 for float64 rows).
The projections of bfloat16 rows run on the CPU's bf16 products (vdpbf16ps) where the
softmax kernels' do (`fastnl.backends.cpp.bfloat16_path()`): their operands rounded to
bfloat16, as a matmul under autocast rounds them, products and sums float32 (stage
fwd+bwd 1.03-1.04x under bf16 autocast, paired); elsewhere in float32. y is centred on
its first row before its products are summed, so a mean far from zero costs no digits
(E[y y^T] - mean mean^T would lose them all).

In a stage, the operator also gives the next block's values g(out) = out W_g^T + b_g
from the out it has just written, and its backward adds their gradient to the one
reaching out directly, the accumulation autograd would do as one more pass, and gives
W_g's and b_g's: the next g is no layer of its own (stage fwd+bwd 1.03-1.06x in
float32, the same speed under bf16 autocast, paired).

It computes what the 1x1 convolution and `nn.BatchNorm*` compute in training (batch
statistics; the running statistics and `num_batches_tracked` updated as `F.batch_norm`
updates them, momentum None meaning the cumulative average); the bias b, which
BatchNorm subtracts again, gets a zero gradient, as it does there up to rounding.
`applies` says when it runs; everything else (eval with running statistics, a subclass
such as --sync-bn's, no affine parameters, another device, no cpp build) is left to the
module's own convolution and BatchNorm.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from fastnl import cpu_rows
from fastnl.backends import accumulate_dtype


@torch.library.custom_op("fastnl::projected_batch_norm", mutates_args=())
def _forward(rows: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
             eps: float, next_weight: Optional[Tensor] = None, next_bias: Optional[Tensor] = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """residual + BatchNorm(rows weight^T + bias) -> (out, the next block's values out
    next_weight^T + next_bias ((0, 0) without them), u's mean and biased variance, the
    rows' mean less their first row, their covariance, invstd)."""
    return tuple(torch.ops.fastnl_cpp.projected_batch_norm_forward(
        rows, residual, weight, bias, gamma, beta, eps, next_weight, next_bias, cpu_rows.bfloat16_products(rows)))


@_forward.register_fake
def _(rows, residual, weight, bias, gamma, beta, eps, next_weight=None, next_bias=None):
    channels, width = weight.shape
    next_values = rows.new_empty(rows.shape[0], next_weight.shape[0]) if next_weight is not None else \
        rows.new_empty(0, 0)
    return (rows.new_empty(rows.shape[0], channels), next_values, *(weight.new_empty(channels) for _ in range(2)),
            weight.new_empty(width), weight.new_empty(width, width), weight.new_empty(channels))


@torch.library.custom_op("fastnl::projected_batch_norm_backward", mutates_args=())
def _backward(grad_out: Tensor, rows: Tensor, weight: Tensor, gamma: Tensor, offset: Tensor, covariance: Tensor,
              invstd: Tensor, grad_next_values: Optional[Tensor] = None, out: Optional[Tensor] = None,
              next_weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_rows, grad_weight, grad_gamma, grad_beta, and with the next values: the
    gradient reaching out from both its uses, grad_next_weight, grad_next_bias)."""
    return tuple(torch.ops.fastnl_cpp.projected_batch_norm_backward(grad_out, rows, weight, gamma, offset, covariance,
                                                                    invstd, grad_next_values, out, next_weight,
                                                                    cpu_rows.bfloat16_products(rows)))


@_backward.register_fake
def _(grad_out, rows, weight, gamma, offset, covariance, invstd, grad_next_values=None, out=None, next_weight=None):
    next_rows, next_width = (rows.shape[0], next_weight.shape[0]) if next_weight is not None else (0, 0)
    return (rows.new_empty(rows.shape), weight.new_empty(weight.shape), gamma.new_empty(gamma.shape),
            gamma.new_empty(gamma.shape), grad_out.new_empty(next_rows, grad_out.shape[1]),
            weight.new_empty(next_width, weight.shape[0] if next_weight is not None else 0),
            weight.new_empty(next_width))


def _setup_context(ctx, inputs, output):
    rows, residual, weight, _, gamma, _, _, next_weight, _ = inputs
    out, _, _, _, offset, covariance, invstd = output
    ctx.has_next = next_weight is not None
    following = (out, next_weight) if ctx.has_next else ()
    ctx.save_for_backward(rows, weight, gamma, offset, covariance, invstd, *following)
    ctx.has_residual = residual is not None


def _grads(ctx, grad_out, grad_next_values, *_statistics):
    """The residual's gradient is what reaches out, the bias's zero (BatchNorm subtracts
    it again); the statistics have none."""
    rows, weight, gamma, offset, covariance, invstd, *next_operands = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    take_next = ctx.has_next and grad_next_values is not None
    operands = (grad_next_values.contiguous(), *next_operands) if take_next else (None, None, None)
    grad_rows, grad_weight, grad_gamma, grad_beta, grad_total, grad_next_weight, grad_next_bias = _backward(
        grad_out, rows, weight, gamma, offset, covariance, invstd, *operands)
    if not take_next:
        grad_total, grad_next_weight, grad_next_bias = grad_out, None, None
    return (grad_rows, grad_total if ctx.has_residual else None, grad_weight, torch.zeros_like(grad_beta), grad_gamma,
            grad_beta, None, grad_next_weight, grad_next_bias)


_forward.register_autograd(_grads, setup_context=_setup_context)


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def applies(weight, bias, bn, rows, residual):
    """Whether `projected_batch_norm` computes bn(rows weight^T + b) (+ residual) here: a
    plain nn.BatchNorm (a subclass, such as --sync-bn's, has a forward of its own) with
    batch statistics (training, or no running statistics), affine, CPU rows (R, E) of
    float32, float64 or bfloat16 with the weight (C, E) and BatchNorm's parameters in
    their accumulation dtype, a residual (R, C) like the rows, more than one row, and
    the cpp backend built. The 1x1 convolution W_z has a bias (the modules' always do)."""
    batch_statistics = bn.training or bn.running_mean is None
    statistics = accumulate_dtype(rows.dtype)
    output = (rows.shape[0], bn.num_features)
    return (type(bn) in _PLAIN and batch_statistics and bn.affine and rows.device.type == "cpu"
            and rows.dtype in (torch.float32, torch.float64, torch.bfloat16) and rows.dim() == 2
            and rows.shape[0] > 1 and bias is not None and weight.dtype == bn.weight.dtype == bias.dtype == statistics
            and weight.shape == (bn.num_features, rows.shape[1])
            and (residual is None or (residual.dtype == rows.dtype and residual.shape == output))
            and cpu_rows.built())


def projected_batch_norm(weight, bias, bn, rows, residual=None, next_weight=None, next_bias=None):
    """residual + bn(rows weight^T + bias) for rows (R, E), weight (C, E), bias (C) (see
    `applies`); with next_weight (F, C) and next_bias (F) in the weight's dtype, also the
    next block's values out next_weight^T + next_bias (R, F), from the same operator each
    way: -> (out, next values)."""
    out, next_values, mean, var, *_ = _forward(rows.contiguous(), None if residual is None else residual.contiguous(),
                                               weight, bias, bn.weight, bn.bias, bn.eps, next_weight, next_bias)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * (rows.shape[0] / (rows.shape[0] - 1))
            bn.running_mean.copy_(factor * mean + (1 - factor) * bn.running_mean)
            bn.running_var.copy_(factor * unbiased + (1 - factor) * bn.running_var)
    return out if next_weight is None else (out, next_values)
