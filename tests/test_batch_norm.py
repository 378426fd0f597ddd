"""fastnl.batch_norm (the modules' fused BatchNorm + residual on CPU rows) against
nn.BatchNorm in training: outputs, every gradient, the running statistics, and the
module paths that take it; gradcheck in float64, thread-count determinism, the checks."""
import pytest
import torch
from torch import nn

import fastnl
from fastnl import backends, batch_norm

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

# (R, C): three rows (two would make dx vanish, x_hat = +-1), one row short of a
# reduction chunk (256 rows) and past it, odd C below, at and over a vector of 16
# floats, and the model's stage-2 shape
SHAPES = [(3, 3), (255, 5), (1000, 16), (513, 33), (32768, 32)]
# max |error| / max |truth| against float64: float32 a few ulps of the largest terms,
# bfloat16 one rounding of the inputs and the result (2^-8 each)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make(shape, dtype, residual=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1
    res = torch.randn(shape, generator=generator, dtype=torch.float64) if residual else None
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    bn = nn.BatchNorm1d(shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(shape[1], generator=generator, dtype=torch.float64))
        bn.bias.copy_(torch.randn(shape[1], generator=generator, dtype=torch.float64))
    return rows.to(dtype), None if res is None else res.to(dtype), grad.to(dtype), bn


def truth(bn, rows, residual, grad):
    """nn.BatchNorm's result and gradients in float64 (rows, weight, bias, residual)."""
    bn = _copy(bn).double()
    leaves = [rows.double().requires_grad_()] + ([residual.double().requires_grad_()] if residual is not None else [])
    out = bn(leaves[0]) + (leaves[1] if residual is not None else 0)
    grads = torch.autograd.grad(out, [leaves[0], bn.weight, bn.bias, *leaves[1:]], grad.double())
    return out, grads, bn


def fused(bn, rows, residual, grad):
    bn = _copy(bn).to(batch_norm.accumulate_dtype(rows.dtype))
    leaves = [rows.clone().requires_grad_()] + ([residual.clone().requires_grad_()] if residual is not None else [])
    assert batch_norm.applies(bn, leaves[0], leaves[1] if residual is not None else None)
    out = batch_norm.batch_norm_rows(bn, *leaves)
    grads = torch.autograd.grad(out, [leaves[0], bn.weight, bn.bias, *leaves[1:]], grad)
    return out, grads, bn


def _copy(bn):
    copy = nn.BatchNorm1d(bn.num_features, momentum=bn.momentum).to(bn.weight.dtype)
    copy.load_state_dict(bn.state_dict())
    return copy


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "alone"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_batch_norm(dtype, shape, residual):
    rows, res, grad, bn = make(shape, dtype, residual)
    expected_out, expected_grads, expected_bn = truth(bn, rows, res, grad)
    out, grads, got_bn = fused(bn, rows, res, grad)
    assert out.dtype == dtype and all(g.dtype in (dtype, got_bn.weight.dtype) for g in grads)
    names = ["out", "grad_rows", "grad_weight", "grad_bias", "grad_residual"]
    for name, actual, exact in zip(names, (out, *grads), (expected_out, *expected_grads)):
        error = (actual.double() - exact).abs().max().item() / exact.abs().max().item()
        assert error <= TOLERANCE.get(dtype, 1e-12), f"{name}: relative error {error:.2e}"
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(got_bn, name).double(), getattr(expected_bn, name), rtol=1e-5, atol=1e-6)
    assert got_bn.num_batches_tracked.item() == expected_bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative"])
def test_running_statistics_follow_batch_norm_over_steps(momentum):
    ours, theirs = nn.BatchNorm1d(7, momentum=momentum).double(), nn.BatchNorm1d(7, momentum=momentum).double()
    for step in range(3):
        rows = torch.randn(300, 7, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(batch_norm.batch_norm_rows(ours, rows), theirs(rows), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-12)
    assert ours.num_batches_tracked.item() == 3


def test_gradcheck_float64():
    rows, res, _, bn = make((40, 5), torch.float64)
    bn = bn.train()

    def function(rows, weight, bias, residual):
        return batch_norm._forward(rows, weight, bias, residual, bn.eps)[0]

    inputs = [t.detach().clone().requires_grad_() for t in (rows, bn.weight, bn.bias, res)]
    assert torch.autograd.gradcheck(function, inputs)


def test_one_and_two_threads_agree_bitwise():
    rows, res, grad, bn = make((3000, 32), torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out, grads, _ = fused(bn, rows, res, grad)
            results.append([out, *grads])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_applies_to_batch_statistics_on_cpu_rows_only():
    rows = torch.randn(50, 4)
    bn = nn.BatchNorm1d(4)
    assert batch_norm.applies(bn, rows, None) and batch_norm.applies(bn, rows, torch.randn(50, 4))
    assert not batch_norm.applies(bn.eval(), rows, None)  # running statistics: the module's own BatchNorm
    bn.train()
    assert not batch_norm.applies(bn, rows.half(), None)
    assert not batch_norm.applies(bn, rows, torch.randn(50, 4, dtype=torch.float64))
    assert not batch_norm.applies(bn, rows[:1], None)  # one row: nn.BatchNorm's own error
    assert not batch_norm.applies(nn.BatchNorm1d(4, affine=False), rows, None)

    class Synchronised(nn.BatchNorm1d):  # as --sync-bn's CPUSyncBatchNorm: a forward of its own
        pass

    assert not batch_norm.applies(Synchronised(4), rows, None)


def test_operator_checks():
    rows, weight = torch.randn(10, 4), torch.ones(4)
    with pytest.raises(RuntimeError, match="batch statistics need more than one row"):
        torch.ops.fastnl_cpp.batch_norm_rows_forward(rows[:1], weight, weight, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have dtype Float"):
        torch.ops.fastnl_cpp.batch_norm_rows_forward(rows, weight.double(), weight, None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.fastnl_cpp.batch_norm_rows_forward(rows, weight, weight, rows[:5], 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, float64 or bfloat16"):
        torch.ops.fastnl_cpp.batch_norm_rows_forward(rows.half(), weight, weight, None, 1e-5)


@pytest.mark.parametrize("module", ["block", "stage"])
def test_modules_compute_the_same_either_way(module, monkeypatch):
    """A training step of a block and of a stage gives the same outputs, gradients and
    running statistics with the fused BatchNorm as with nn.BatchNorm (float64)."""
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
    rows, res, grad, bn = make((300, 6), torch.float32, residual)
    weight, bias = bn.weight.detach().float().requires_grad_(), bn.bias.detach().float().requires_grad_()
    leaf = rows.requires_grad_()
    torch.library.opcheck(batch_norm._forward, (leaf, weight, bias, res, 1e-5))
    _, mean, _, invstd = batch_norm._forward(rows.detach(), weight.detach(), bias.detach(), res, 1e-5)
    torch.library.opcheck(batch_norm._backward, (grad, rows.detach(), weight.detach(), mean, invstd))


def test_a_training_stage_compiles_without_graph_breaks():
    stage = fastnl.NonlocalStage(8, num_blocks=2)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(stage)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
