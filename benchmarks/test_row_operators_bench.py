"""The modules' CPU row operators against what they replace, at the rows of a
`NonlocalStage(32, num_blocks=3)` in a PreResNet-20's stage 2 (B = 128 on 16x16: 32768
rows, C = 32, C' = 16), forward+backward:

- the embeddings: `fastnl.linear_parts` (theta, phi and the first g as one operator,
  each part written contiguous) against F.linear, split and copied, in float32 (the
  operator takes float32 and float64 rows; bf16 autocast keeps the GEMM);
- a block's W_z branch: `fastnl.batch_norm.projected_batch_norm` with the next block's
  values against F.linear, nn.BatchNorm1d, the residual add and the next F.linear, in
  float32 and with bfloat16 rows under bf16 autocast.

    pytest benchmarks/test_row_operators_bench.py --benchmark-only

The summary prints each operator's speed-up over what it replaces: the ratio of the
medians, and paired, the median over PAIRS alternating steps.
"""
import contextlib

import pytest
import summary
import torch
import torch.nn.functional as F
from torch import nn

from fastnl import backends, batch_norm, linear_parts

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

ROWS, CHANNELS, WIDTH = 128 * 16 * 16, 32, 16
PAIRS = 15
EMBEDDINGS = "stage embeddings (theta, phi, g) fwd+bwd, 32768 rows 32 -> 3 x 16"
W_Z = "W_z branch with the next values fwd+bwd, 32768 rows 16 -> 32 -> 16"


def _tensor(generator, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()


def _embedding_step(implementation):
    generator = torch.Generator().manual_seed(0)
    rows = _tensor(generator, ROWS, CHANNELS)
    weight, bias = _tensor(generator, 3 * WIDTH, CHANNELS, scale=CHANNELS ** -0.5), _tensor(generator, 3 * WIDTH)
    grads = [torch.randn(ROWS, WIDTH, generator=generator) for _ in range(3)]
    widths = [WIDTH] * 3

    def step():
        if implementation == "linear_parts":
            parts = linear_parts.parts(rows, weight, bias, widths)
        else:
            parts = [part.contiguous() for part in F.linear(rows, weight, bias).split(widths, dim=-1)]
        torch.autograd.backward(parts, grads)

    return step


def _w_z_step(implementation, precision):
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    y, residual = _tensor(generator, ROWS, WIDTH, dtype=dtype), _tensor(generator, ROWS, CHANNELS, dtype=dtype)
    weight, bias = _tensor(generator, CHANNELS, WIDTH, scale=WIDTH ** -0.5), _tensor(generator, CHANNELS)
    next_weight = _tensor(generator, WIDTH, CHANNELS, scale=CHANNELS ** -0.5)
    next_bias = _tensor(generator, WIDTH)
    bn = nn.BatchNorm1d(CHANNELS)
    grads = [torch.randn(ROWS, CHANNELS, generator=generator).to(dtype),
             torch.randn(ROWS, WIDTH, generator=generator).to(dtype)]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext():
            if implementation == "projected_batch_norm":
                outs = batch_norm.projected_batch_norm(weight, bias, bn, y, residual, next_weight, next_bias)
            else:
                out = residual + bn(F.linear(y, weight, bias))
                outs = (out, F.linear(out, next_weight, next_bias))
        torch.autograd.backward(outs, [grad.to(out.dtype) for grad, out in zip(grads, outs)])

    return step


# (group, operator, what it replaces, builder of a step by implementation)
COMPARISONS = {
    "embeddings, float32": (EMBEDDINGS, "linear_parts", "F.linear, split", _embedding_step),
    "W_z branch, float32": (f"{W_Z} float32", "projected_batch_norm", "F.linear + BatchNorm",
                            lambda implementation: _w_z_step(implementation, "float32")),
    "W_z branch, bf16": (f"{W_Z} bf16", "projected_batch_norm", "F.linear + BatchNorm",
                         lambda implementation: _w_z_step(implementation, "bf16")),
}


@pytest.mark.parametrize("side", ["operator", "replaced"])
@pytest.mark.parametrize("comparison", list(COMPARISONS))
def test_row_operator(benchmark, record, comparison, side):
    group, operator, replaced, builder = COMPARISONS[comparison]
    implementation = operator if side == "operator" else replaced
    benchmark.group = group
    benchmark.pedantic(builder(implementation), rounds=10, warmup_rounds=3)
    record(benchmark, implementation)


@pytest.mark.parametrize("comparison", list(COMPARISONS))
def test_row_operator_paired(benchmark, comparison):
    """What the operator replaces against the operator, alternately (one untimed pair when
    benchmarks are disabled)."""
    _, operator, replaced, builder = COMPARISONS[comparison]
    summary.record_paired(benchmark, comparison, builder(replaced), builder(operator), PAIRS)


@summary.section("fastnl row operators: speed-up over what they replace (medians, and paired)")
def _speed_ups():
    lines = []
    for comparison, (group, operator, replaced, _) in COMPARISONS.items():
        ratio, paired = summary.ratio(group, replaced, operator), summary.paired(comparison)
        if ratio is not None:
            paired_cell = "-" if paired is None else f"{paired:.2f}"
            lines.append(f"{comparison + ': ' + operator + ' vs ' + replaced:<72}{ratio:>8.2f}{paired_cell:>8}")
    return [f"{'operator vs what it replaces':<72}{'medians':>8}{'paired':>8}"] + lines if lines else []
