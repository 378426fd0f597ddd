"""A stage's query and key gradients formed once for all its blocks (fastnl.shared_affinity,
the cpp backend's softmax_values_backward and softmax_shared_backward): K chained blocks
against the reference in float64, float32 and bfloat16, gradcheck, the stage either way,
and where it falls back to one backward per block."""
import pytest
import torch
from harness import assert_close_to_truth

import fastnl
from fastnl import backends, ops, reference
from fastnl.backends import cpp
from fastnl.shared_affinity import SharedAffinity

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

SCALE = 0.7


def bfloat16_native():
    return cpp._bfloat16_kernels()


def draw(shape, blocks, dtype, seed=0):
    """query, key, K values, K centers, K grad_outs of (B, N, M, D, E), in float64 then `dtype`."""
    batch, num_queries, num_keys, width_qk, width_v = shape
    generator = torch.Generator().manual_seed(seed)

    def tensor(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(dtype)

    query, key = tensor(batch, num_queries, width_qk), tensor(batch, num_keys, width_qk)
    values = [tensor(batch, num_keys, width_v) for _ in range(blocks)]
    centers = [tensor(batch, num_queries, width_v) for _ in range(blocks)]
    grads = [tensor(batch, num_queries, width_v) for _ in range(blocks)]
    return query, key, values, centers, grads


def chained(attend, query, key, values, centers, value_is_center):
    """The blocks as a stage chains them: block k's center (its value too, where the value
    is the center) is its own plus block k-1's out, so block k-1's backward waits for k's."""
    outs = []
    for value, center in zip(values, centers):
        if outs:
            center = center + outs[-1]
        if value_is_center:
            value = center
        outs.append(attend(query, key, value, center))
    return outs


def shared_attend(backend):
    shared = {}

    def attend(query, key, value, center):
        if "blocks" not in shared:
            shared["blocks"] = SharedAffinity(query, key, SCALE, backend)
        return shared["blocks"].attend(value, center)

    return attend


def reference_attend(query, key, value, center):
    return reference.diffuse(query, key, value, center, scale=SCALE)


def results(attend, tensors, value_is_center, dtype=None):
    """[outs..., grads of query, key, values (unless they are the centers)..., centers...]
    of the chained blocks."""
    query, key, values, centers, grads = tensors

    def leaf(tensor):
        return tensor.detach().to(dtype or tensor.dtype).requires_grad_()

    query, key, centers = leaf(query), leaf(key), [leaf(center) for center in centers]
    values = [] if value_is_center else [leaf(value) for value in values]
    outs = chained(attend, query, key, values or [None] * len(centers), centers, value_is_center)
    found = torch.autograd.grad(outs, [query, key, *values, *centers], [g.to(outs[0].dtype) for g in grads])
    return [out.detach() for out in outs] + list(found)


SHAPES = [
    (2, 13, 13, 5, 3),        # odd everything, B < 16: query groups summed afterwards
    (3, 37, 29, 8, 8),        # M != N (a sub-sampled stage), D = 8 on the lane path
    (1, 130, 130, 16, 16),    # N past the float32 query tile and off it
    (16, 67, 259, 7, 5),      # one group a batch, past a key tile
    (2, 300, 300, 32, 24),    # past a bf16 query tile and key tile
]


@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_chained_blocks_match_the_reference(dtype, shape, blocks):
    """Every out and gradient against the float64 truth, within twice the reference's own
    error in the dtype plus the harness's floor (the per-dtype tolerance of tests/harness.py)."""
    if dtype == torch.bfloat16 and not bfloat16_native():
        pytest.skip("no native bfloat16 kernels here")
    value_is_center = shape[1] == shape[2]
    tensors = draw(shape, blocks, dtype)
    actual = results(shared_attend("cpp"), tensors, value_is_center)
    truth = results(reference_attend, tensors, value_is_center, dtype=torch.float64)
    peer = results(reference_attend, tensors, value_is_center)
    assert len(actual) == len(truth)
    for index, (got, in_dtype, exact) in enumerate(zip(actual, peer, truth)):
        assert got.dtype == dtype and got.shape == exact.shape, index
        assert_close_to_truth(got, in_dtype, exact, f"output {index} of {len(actual)}")


@pytest.mark.parametrize("value_is_center", [False, True])
def test_gradcheck(value_is_center):
    query, key, values, centers, _ = draw((2, 9, 9, 3, 2), 3, torch.float64)
    inputs = [t.requires_grad_() for t in (query, key, *values, *centers)]

    def function(query, key, *rest):
        values, centers = rest[:3], rest[3:]
        return tuple(chained(shared_attend("cpp"), query, key, values, centers, value_is_center))

    assert torch.autograd.gradcheck(function, inputs)


def test_a_backward_run_twice_gives_the_same_gradients():
    query, key, values, centers, grads = draw((2, 11, 11, 4, 3), 3, torch.float64)
    query.requires_grad_()
    outs = chained(shared_attend("cpp"), query, key, values, centers, True)
    first = torch.autograd.grad(outs, query, grads, retain_graph=True)[0]
    second = torch.autograd.grad(outs, query, grads)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_an_earlier_out_alone_takes_no_later_block():
    """Block 0's out differentiated alone: the later blocks are not reached, and add nothing."""
    query, key, values, centers, grads = draw((2, 11, 11, 4, 3), 3, torch.float64)
    query.requires_grad_()
    outs = chained(shared_attend("cpp"), query, key, values, centers, True)
    expected = chained(reference_attend, query, key, values, centers, True)
    torch.testing.assert_close(torch.autograd.grad(outs[0], query, grads[0])[0],
                               torch.autograd.grad(expected[0], query, grads[0])[0])


def _stage_results(stage, x, grad, shared, monkeypatch, autocast=None):
    """out, dx and the parameters' gradients of one training step of `stage`, with the
    shared backward (shared=True) or with one backward per block."""
    with monkeypatch.context() as patch:
        if not shared:
            patch.setattr(SharedAffinity, "for_stage", classmethod(lambda cls, *args: None))
        stage.zero_grad()
        x = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = stage(x)
        out.backward(grad.to(out.dtype))
    return [out.detach(), x.grad] + [p.grad for p in stage.parameters()]


def _trained_stage(sub_sample, dtype=torch.float64):
    torch.manual_seed(0)
    stage = fastnl.NonlocalStage(8, num_blocks=3, sub_sample=sub_sample).to(dtype)
    for branch in stage.branches:  # no longer the identity
        torch.nn.init.normal_(branch.bn.weight)
        torch.nn.init.normal_(branch.bn.bias)
    return stage


@pytest.mark.parametrize("sub_sample", [False, True])
def test_a_stage_trains_the_same_either_way(sub_sample, monkeypatch):
    stage = _trained_stage(sub_sample)
    x, grad = torch.randn(3, 8, 6, 7, dtype=torch.float64), torch.randn(3, 8, 6, 7, dtype=torch.float64)
    calls, shared_backward = [], ops.softmax_shared_backward

    def counted(*args):
        calls.append(len(args[0]))
        return shared_backward(*args)

    monkeypatch.setattr(ops, "softmax_shared_backward", counted)
    shared = _stage_results(stage, x, grad, True, monkeypatch)
    assert calls == [3]  # one call, for the stage's three blocks
    one_by_one = _stage_results(stage, x, grad, False, monkeypatch)
    assert calls == [3]
    for index, (got, expected) in enumerate(zip(shared, one_by_one)):
        # phi's bias gets no gradient in exact arithmetic (a shift of every key): rounding both ways
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"output {index}")


@pytest.mark.skipif(not bfloat16_native(), reason="no native bfloat16 kernels here")
def test_a_stage_under_bfloat16_autocast_is_no_less_accurate(monkeypatch):
    """The shared backward sums dQ, dK over the blocks before rounding them to bf16: against
    the float64 step, its errors are at most those of one backward per block (x 1.25)."""
    stage = _trained_stage(False)
    x, grad = torch.randn(4, 8, 8, 8, dtype=torch.float64), torch.randn(4, 8, 8, 8, dtype=torch.float64)
    truth = _stage_results(stage, x, grad, True, monkeypatch)
    stage = stage.float()
    shared = _stage_results(stage, x.float(), grad.float(), True, monkeypatch, torch.bfloat16)
    one_by_one = _stage_results(stage, x.float(), grad.float(), False, monkeypatch, torch.bfloat16)
    names = ["out", "dx"] + [name for name, _ in stage.named_parameters()]
    for name, got, other, exact in zip(names, shared, one_by_one, truth):
        scale = exact.abs().max().item()
        if name == "affinity.phi.bias" or name.endswith("W_z.bias"):
            continue  # no gradient in exact arithmetic (a shift of every key; BatchNorm's mean): rounding
        error = (got.double() - exact).abs().max().item() / scale
        other_error = (other.double() - exact).abs().max().item() / scale
        assert error <= 1.25 * other_error + 1e-3, f"{name}: {error:.2e} against {other_error:.2e}"


@pytest.mark.parametrize("reason", ["no grad", "reference", "torch backend", "dot product", "compiling"])
def test_where_the_blocks_run_one_by_one(reason, monkeypatch):
    query, key = torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    kernel, backend = ("dot" if reason == "dot product" else "softmax"), {"reference": "reference",
                                                                          "torch backend": "torch"}.get(reason)
    assert SharedAffinity.for_stage(query, key, 2, "softmax", 1.0, None) is not None  # cpp, training
    if reason == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.set_grad_enabled(reason != "no grad"):
        assert SharedAffinity.for_stage(query, key, 2, kernel, 1.0, backend) is None


def test_the_operators_check_their_arguments():
    query, key, values, _, grads = draw((1, 5, 5, 2, 3), 2, torch.float32)
    log_normalizer = torch.zeros(1, 5)
    with pytest.raises(RuntimeError, match="one value, out"):
        torch.ops.fastnl_cpp.softmax_shared_backward(grads, query, key, values[:1], [], grads, log_normalizer, 1.0)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.fastnl_cpp.softmax_shared_backward([grads[0], grads[1][:, :4]], query, key, values, [], grads,
                                                     log_normalizer, 1.0)
    with pytest.raises(RuntimeError, match="log_normalizer must have shape"):
        torch.ops.fastnl_cpp.softmax_values_backward(grads[0], query, key, log_normalizer[:, :4], 1.0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_stage_gets_the_same_gradients(reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward: the hand-over still
    reaches the first block (the stage's structure, not autograd's order, guarantees it)."""
    stage = _trained_stage(False)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)

    def gradients(run):
        stage.zero_grad()
        leaf = x.clone().requires_grad_()
        out = run(leaf)
        out.backward(torch.ones_like(out))
        return [leaf.grad] + [parameter.grad for parameter in stage.parameters()]

    plain = gradients(stage)
    checkpointed = gradients(lambda leaf: torch.utils.checkpoint.checkpoint(stage, leaf, use_reentrant=reentrant))
    for got, expected in zip(checkpointed, plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
