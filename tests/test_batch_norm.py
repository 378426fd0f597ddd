"""fastnl.batch_norm (the modules' W_z branch on CPU rows: projection, BatchNorm with
batch statistics and residual in one operator) against the 1x1 projection and
nn.BatchNorm in float64: outputs, every gradient, the running statistics, and the
module paths that take it; gradcheck in float64, thread-count determinism, the checks."""
import pytest
import torch
from harness import on_one_and_two_threads
from torch import nn

import fastnl
from fastnl import backends, batch_norm, cpu_rows
from fastnl.backends import cpp

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

# (R, E, C): three rows (two would make dx vanish, x_hat = +-1), one row short of a
# reduction chunk (256 rows) and past it, widths below, at and over a vector of 16
# floats, odd ones, and the model's stage-2 shape
SHAPES = [(3, 2, 3), (255, 5, 7), (1000, 16, 16), (513, 17, 33), (32768, 16, 32)]
# max |error| / max |truth| against float64: float32 a few ulps of the largest terms,
# bfloat16 one rounding of the inputs and the result (2^-8 each)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make(shape, dtype, residual=True, seed=0, mean=1.0):
    """Rows (R, E) with the given mean (std 3), a residual (R, C), the output's gradient,
    and the branch's parameters: W (C, E), b (C), a BatchNorm with random affine."""
    rows_count, width, channels = shape
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(rows_count, width, generator=generator, dtype=torch.float64) * 3 + mean
    res = torch.randn(rows_count, channels, generator=generator, dtype=torch.float64) if residual else None
    grad = torch.randn(rows_count, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(channels, width, generator=generator, dtype=torch.float64) / width ** 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    bn = nn.BatchNorm1d(channels).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        bn.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return rows.to(dtype), None if res is None else res.to(dtype), grad.to(dtype), weight, bias, bn


def truth(bn, weight, bias, rows, residual, grad):
    """The projection and nn.BatchNorm in float64: the result and the gradients of
    (rows, weight, bias, BatchNorm weight, BatchNorm bias, residual)."""
    bn = _copy(bn).double()
    leaves = [t.double().requires_grad_() for t in (rows, weight, bias)]
    leaves += [residual.double().requires_grad_()] if residual is not None else []
    out = bn(leaves[0] @ leaves[1].t() + leaves[2]) + (leaves[3] if residual is not None else 0)
    grads = torch.autograd.grad(out, [*leaves[:3], bn.weight, bn.bias, *leaves[3:]], grad.double())
    return out, grads, bn


def fused(bn, weight, bias, rows, residual, grad):
    statistics = backends.accumulate_dtype(rows.dtype)
    bn = _copy(bn).to(statistics)
    leaves = [rows.clone().requires_grad_(), weight.to(statistics).requires_grad_(),
              bias.to(statistics).requires_grad_()]
    leaves += [residual.clone().requires_grad_()] if residual is not None else []
    res = leaves[3] if residual is not None else None
    assert batch_norm.applies(leaves[1], leaves[2], bn, leaves[0], res)
    out = batch_norm.projected_batch_norm(leaves[1], leaves[2], bn, leaves[0], res)
    grads = torch.autograd.grad(out, [*leaves[:3], bn.weight, bn.bias, *leaves[3:]], grad)
    return out, grads, bn


def _copy(bn):
    copy = nn.BatchNorm1d(bn.num_features, momentum=bn.momentum).to(bn.weight.dtype)
    copy.load_state_dict(bn.state_dict())
    return copy


NAMES = ["out", "grad_rows", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias", "grad_residual"]


def assert_matches(dtype, actual, expected, bias_scale):
    """Relative errors within the dtype's tolerance; b's gradient, zero in truth up to
    rounding, against the scale of the other parameters' gradients."""
    for name, got, exact in zip(NAMES, actual, expected):
        scale = bias_scale if name == "grad_bias" else exact.abs().max().item()
        error = (got.double() - exact).abs().max().item() / scale
        assert error <= TOLERANCE.get(dtype, 1e-12), f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "alone"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_projection_and_batch_norm(dtype, shape, residual):
    rows, res, grad, weight, bias, bn = make(shape, dtype, residual)
    expected_out, expected_grads, expected_bn = truth(bn, weight, bias, rows, res, grad)
    out, grads, got_bn = fused(bn, weight, bias, rows, res, grad)
    assert out.dtype == dtype and grads[0].dtype == dtype and all(g.dtype == got_bn.weight.dtype for g in grads[1:5])
    assert_matches(dtype, (out, *grads), (expected_out, *expected_grads), expected_grads[1].abs().max().item())
    assert torch.count_nonzero(grads[2]) == 0  # BatchNorm subtracts b again: exactly no gradient
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(got_bn, name).double(), getattr(expected_bn, name), rtol=1e-5, atol=1e-6)
    assert got_bn.num_batches_tracked.item() == expected_bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_mean_far_from_zero_loses_no_more_than_the_unfused_branch(dtype):
    """Rows with mean 1e4 and std 3. The variance from the raw moments, E[y y^T] - mean
    mean^T, would lose every digit in float32; centred on the first row, the branch
    loses no more than the projection and nn.BatchNorm in the same dtype. The truth is
    taken from the rows less their mean: BatchNorm's result and du do not change, and
    dW = du^T y gains (sum of du) mean^T = 0, while float64's own cancellation of u's
    mean would leave errors of 1e-7 in dW."""
    rows, res, grad, weight, bias, bn = make((2000, 8, 12), dtype, mean=1e4)
    expected_out, expected_grads, _ = truth(bn, weight, bias, rows.double() - 1e4, res, grad)
    out, grads, _ = fused(bn, weight, bias, rows, res, grad)
    unfused = _copy(bn).to(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in (rows, weight, bias, res)]
    plain = unfused(leaves[0] @ leaves[1].t() + leaves[2]) + leaves[3]
    plain_grads = torch.autograd.grad(plain, [*leaves[:3], unfused.weight, unfused.bias, leaves[3]], grad)
    for name, got, baseline, exact in zip(NAMES, (out, *grads), (plain, *plain_grads), (expected_out, *expected_grads)):
        if name == "grad_bias":
            continue
        error, baseline_error = ((t.double() - exact).abs().max().item() for t in (got, baseline))
        assert error <= 4 * baseline_error + 1e-13 * exact.abs().max().item(), \
            f"{name}: error {error:.2e}, the unfused branch's {baseline_error:.2e}"


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative"])
def test_running_statistics_follow_batch_norm_over_steps(momentum):
    ours, theirs = nn.BatchNorm1d(7, momentum=momentum).double(), nn.BatchNorm1d(7, momentum=momentum).double()
    weight, bias = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    for step in range(3):
        rows = torch.randn(300, 5, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(batch_norm.projected_batch_norm(weight, bias, ours, rows),
                                   theirs(rows @ weight.t() + bias), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-12)
    assert ours.num_batches_tracked.item() == 3


def next_truth(bn, weight, bias, rows, residual, grad, next_weight, next_bias, grad_next):
    """(out, next values) of the projection, nn.BatchNorm and the next projection in float64,
    and the gradients of (rows, weight, BatchNorm weight, BatchNorm bias, residual, next
    weight, next bias)."""
    bn = _copy(bn).double()
    leaves = [t.double().requires_grad_() for t in (rows, weight, bias, residual, next_weight, next_bias)]
    out = bn(leaves[0] @ leaves[1].t() + leaves[2]) + leaves[3]
    following = out @ leaves[4].t() + leaves[5]
    wanted = [leaves[0], leaves[1], bn.weight, bn.bias, leaves[3], leaves[4], leaves[5]]
    return [out, following], torch.autograd.grad([out, following], wanted, [grad.double(), grad_next.double()])


NEXT_NAMES = ["out", "next values", "grad_rows", "grad_weight", "grad_bn_weight", "grad_bn_bias", "grad_residual",
              "grad_next_weight", "grad_next_bias"]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_the_next_values_match_the_unfused_branch(dtype, shape):
    """With the next block's values (out W_next^T + b_next) from the same operator: both
    outputs and every gradient against the three layers in float64, within the dtype's
    tolerance; the gradient reaching out sums both its uses."""
    rows, res, grad, weight, bias, bn = make(shape, dtype)
    generator = torch.Generator().manual_seed(1)
    width = max(1, shape[1] - 1)  # another width than the rows'
    next_weight = torch.randn(width, shape[2], generator=generator, dtype=torch.float64) / shape[2] ** 0.5
    next_bias = torch.randn(width, generator=generator, dtype=torch.float64)
    grad_next = torch.randn(shape[0], width, generator=generator, dtype=torch.float64).to(dtype)
    expected_outs, expected_grads = next_truth(bn, weight, bias, rows, res, grad, next_weight, next_bias, grad_next)
    statistics = backends.accumulate_dtype(dtype)
    got_bn = _copy(bn).to(statistics)
    leaves = [rows.clone().requires_grad_(), *(t.to(statistics).requires_grad_() for t in (weight, bias)),
              res.clone().requires_grad_(), *(t.to(statistics).requires_grad_() for t in (next_weight, next_bias))]
    outs = batch_norm.projected_batch_norm(leaves[1], leaves[2], got_bn, leaves[0], leaves[3], leaves[4], leaves[5])
    assert [out.dtype for out in outs] == [dtype, dtype]
    grads = torch.autograd.grad(outs, [leaves[0], leaves[1], got_bn.weight, got_bn.bias, *leaves[3:]],
                                [grad, grad_next])
    for name, got, exact in zip(NEXT_NAMES, [*outs, *grads], [*expected_outs, *expected_grads]):
        error = (got.double() - exact).abs().max().item() / exact.abs().max().item()
        assert error <= TOLERANCE.get(dtype, 1e-12), f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("products", ["bfloat16", "float32"])
def test_bfloat16_rows_either_way(products, monkeypatch):
    """bfloat16 rows projected on vdpbf16ps (where the softmax kernels' products are bf16)
    or in float32: both within bfloat16's tolerance of the float64 branch, with the next
    values too, and bitwise the same for 1 and 2 threads."""
    if products == "bfloat16" and not cpu_rows.bfloat16_products(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip(f"bfloat16 rows are projected in float32 here: {cpp.bfloat16_path()}")
    if products == "float32":
        monkeypatch.setattr(cpu_rows, "bfloat16_products", lambda rows: False)
    rows, res, grad, weight, bias, bn = make((3000, 17, 33), torch.bfloat16)
    expected_out, expected_grads, _ = truth(bn, weight, bias, rows, res, grad)
    results = on_one_and_two_threads(lambda: fused_results(bn, weight, bias, rows, res, grad))
    assert_matches(torch.bfloat16, results, (expected_out, *expected_grads), expected_grads[1].abs().max().item())


def test_bfloat16_products_are_not_the_float32_projection(monkeypatch):
    if not cpu_rows.bfloat16_products(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip(f"bfloat16 rows are projected in float32 here: {cpp.bfloat16_path()}")
    rows, res, grad, weight, bias, bn = make((500, 16, 32), torch.bfloat16)
    native = fused(bn, weight, bias, rows, res, grad)[0]
    monkeypatch.setattr(cpu_rows, "bfloat16_products", lambda rows: False)
    assert not torch.equal(native, fused(bn, weight, bias, rows, res, grad)[0])


def test_unused_next_values_leave_the_residual_its_gradient():
    rows, res, grad, weight, bias, bn = make((50, 4, 6), torch.float64)
    leaves = [t.clone().requires_grad_() for t in (rows, res)]
    next_weight, next_bias = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out, _ = batch_norm.projected_batch_norm(weight, bias, bn, leaves[0], leaves[1], next_weight, next_bias)
    grad_rows, grad_residual = torch.autograd.grad(out, leaves, grad)
    expected_rows = torch.autograd.grad(batch_norm.projected_batch_norm(weight, bias, _copy(bn), leaves[0], leaves[1]),
                                        leaves[0], grad)[0]
    torch.testing.assert_close(grad_residual, grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_rows, expected_rows, rtol=0, atol=0)


def test_gradcheck_with_the_next_values():
    rows, res, _, weight, bias, bn = make((30, 3, 5), torch.float64)

    def function(rows, residual, weight, gamma, beta, next_weight, next_bias):
        out, following, *_ = batch_norm._forward(rows, residual, weight, bias, gamma, beta, bn.eps, next_weight,
                                                 next_bias)
        return out, following

    inputs = [t.detach().clone().requires_grad_() for t in (rows, res, weight, bn.weight, bn.bias)]
    inputs += [torch.randn(2, 5, dtype=torch.float64, requires_grad=True),
               torch.randn(2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "alone"])
def test_gradcheck_float64(residual):
    rows, res, _, weight, bias, bn = make((40, 3, 5), torch.float64, residual)

    def function(rows, weight, bias, gamma, beta, *residual):
        return batch_norm._forward(rows, residual[0] if residual else None, weight, bias, gamma, beta, bn.eps)[0]

    inputs = [t.detach().clone().requires_grad_() for t in (rows, weight, bias, bn.weight, bn.bias)]
    inputs += [res.clone().requires_grad_()] if residual else []
    assert torch.autograd.gradcheck(function, inputs)


def fused_results(bn, weight, bias, rows, residual, grad):
    """[out, *grads] of the fused branch."""
    out, grads, _ = fused(bn, weight, bias, rows, residual, grad)
    return [out, *grads]


def test_one_and_two_threads_agree_bitwise():
    rows, res, grad, weight, bias, bn = make((3000, 16, 32), torch.float32)
    on_one_and_two_threads(lambda: fused_results(bn, weight, bias, rows, res, grad))


def test_applies_to_batch_statistics_on_cpu_rows_only():
    rows, weight, bias, residual = torch.randn(50, 3), torch.randn(4, 3), torch.randn(4), torch.randn(50, 4)
    bn = nn.BatchNorm1d(4)
    assert batch_norm.applies(weight, bias, bn, rows, None) and batch_norm.applies(weight, bias, bn, rows, residual)
    assert not batch_norm.applies(weight, bias, bn.eval(), rows, None)  # running statistics: the module's own
    bn.train()
    assert not batch_norm.applies(weight, bias, bn, rows.half(), None)
    assert not batch_norm.applies(weight, bias, bn, rows, residual.double())
    assert not batch_norm.applies(weight, bias, bn, rows, residual[:, :3])
    assert not batch_norm.applies(weight.double(), bias, bn, rows, None)
    assert not batch_norm.applies(weight, None, bn, rows, None)
    assert not batch_norm.applies(weight[:, :2], bias, bn, rows, None)
    assert not batch_norm.applies(weight, bias, bn, rows[:1], None)  # one row: nn.BatchNorm's own error
    assert not batch_norm.applies(weight, bias, nn.BatchNorm1d(4, affine=False), rows, None)

    class Synchronised(nn.BatchNorm1d):  # as --sync-bn's CPUSyncBatchNorm: a forward of its own
        pass

    assert not batch_norm.applies(weight, bias, Synchronised(4), rows, None)


def test_operator_checks():
    rows, weight, channels = torch.randn(10, 3), torch.randn(4, 3), torch.ones(4)
    forward = torch.ops.fastnl_cpp.projected_batch_norm_forward
    with pytest.raises(RuntimeError, match="batch statistics need more than one row"):
        forward(rows[:1], None, weight, channels, channels, channels, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have dtype Float"):
        forward(rows, None, weight.double(), channels, channels, channels, 1e-5)
    with pytest.raises(RuntimeError, match="gamma must have shape"):
        forward(rows, None, weight, channels, channels[:3], channels, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        forward(rows, rows, weight, channels, channels, channels, 1e-5)
    with pytest.raises(RuntimeError, match="y must be float32, float64 or bfloat16"):
        forward(rows.half(), None, weight, channels, channels, channels, 1e-5)
    with pytest.raises(RuntimeError, match="y must be contiguous"):
        forward(torch.randn(3, 10).t(), None, weight, channels, channels, channels, 1e-5)


@pytest.mark.parametrize("module", ["block", "stage"])
def test_modules_compute_the_same_either_way(module, monkeypatch):
    """A training step of a block and of a stage gives the same outputs, gradients and
    running statistics with the fused branch as with the projection and nn.BatchNorm
    (float64)."""
    torch.manual_seed(0)
    make_module = {"block": lambda: fastnl.NonlocalBlock(8), "stage": lambda: fastnl.NonlocalStage(8, num_blocks=3)}
    reference_module = make_module[module]().double()
    for parameter in reference_module.parameters():  # BatchNorm's zero init would hide its gradients
        nn.init.normal_(parameter)
    fused_module = make_module[module]().double()
    fused_module.load_state_dict(reference_module.state_dict())
    x = torch.randn(4, 8, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    results = []
    for model, fuse in ((fused_module, True), (reference_module, False)):
        with monkeypatch.context() as patch:
            if not fuse:
                patch.setattr(batch_norm, "applies", lambda *args: False)
            leaf = x.clone().requires_grad_()
            out = model(leaf)
            out.backward(torch.ones_like(out))
        results.append([out, leaf.grad, *(p.grad for p in model.parameters()), *model.buffers()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "alone"])
def test_opcheck(residual):
    rows, res, grad, weight, bias, bn = make((300, 5, 6), torch.float32, residual)
    weight, bias, gamma, beta = (t.detach().float().requires_grad_() for t in (weight, bias, bn.weight, bn.bias))
    leaf = rows.requires_grad_()
    arguments = (leaf, res, weight, bias, gamma, beta, 1e-5)
    torch.library.opcheck(batch_norm._forward, arguments)
    _, _, _, _, offset, covariance, invstd = batch_norm._forward(*(a.detach() if torch.is_tensor(a) else a
                                                                 for a in arguments))
    torch.library.opcheck(batch_norm._backward, (grad, rows.detach(), weight.detach(), gamma.detach(), offset,
                                                 covariance, invstd))
    # with the next block's values
    next_weight, next_bias = torch.randn(4, 6, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.library.opcheck(batch_norm._forward, (*arguments, next_weight, next_bias))
    out, _, _, _, offset, covariance, invstd = batch_norm._forward(
        *(a.detach() if torch.is_tensor(a) else a for a in arguments), next_weight.detach(), next_bias.detach())
    torch.library.opcheck(batch_norm._backward, (grad, rows.detach(), weight.detach(), gamma.detach(), offset,
                                                 covariance, invstd, torch.randn(300, 4), out, next_weight.detach()))


def test_a_training_stage_compiles_without_graph_breaks():
    stage = fastnl.NonlocalStage(8, num_blocks=2)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(stage)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
