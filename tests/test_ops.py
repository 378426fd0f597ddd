"""The custom-op contract: opcheck, torch.compile without graph breaks, stage statistics."""
import pytest
import torch
from harness import cpu_backends

import fastnl
from fastnl import affinities, backends, ops

# the mean-normalised kernels, each with its own pair of ops (softmax ones share theirs)
MEAN_KERNELS = [name for name in affinities.names() if affinities.get(name).normalisation == "mean"]


def sample(kernel, dtype=torch.float64, requires_grad=True, square=False):
    width = affinities.get(kernel).width_qk or 8
    num_keys = 13 if square else 21
    tensors = (
        torch.randn(2, 13, width, dtype=dtype),
        torch.randn(2, num_keys, width, dtype=dtype),
        torch.randn(2, num_keys, 5, dtype=dtype),
        torch.randn(2, 13, 5, dtype=dtype),
    )
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("with_center", [False, True])
def test_opcheck_forward_ops(backend, with_center):
    for kernel, op in [("softmax", ops.softmax_forward)] + [(k, ops.mean_ops(k)[0]) for k in MEAN_KERNELS]:
        query, key, value, center = sample(kernel)
        torch.library.opcheck(op, (query, key, value, center if with_center else None, 0.5, backend))
    query, key, value, center = sample("softmax")
    _, log_normalizer = ops.softmax_forward(query, key, value, center, 0.5, backend)
    torch.library.opcheck(ops.softmax_forward_with_log_normalizer,
                          (query, key, value, center if with_center else None, log_normalizer.detach(), 0.5, backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_backward_ops(backend):
    query, key, value, center = sample("softmax", requires_grad=False)
    out, log_normalizer = ops.softmax_forward(query, key, value, center, 0.5, backend)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.softmax_backward, (grad, query, key, value, center, out, log_normalizer, 0.5, backend))
    for kernel in MEAN_KERNELS:
        op = ops.mean_ops(kernel)[1]
        query, key, value, center = sample(kernel, requires_grad=False)
        torch.library.opcheck(op, (grad, query, key, value, center, 0.5, backend))


def test_opcheck_shared_backward_ops():
    """The stage's two backward ops (fastnl.shared_affinity), on the backends that have them."""
    for backend in cpu_backends():
        if not hasattr(backends.get(backend), "softmax_shared_backward"):
            continue
        query, key, value, center = sample("softmax", requires_grad=False)
        out, log_normalizer = ops.softmax_forward(query, key, value, center, 0.5, backend)
        grad = torch.randn_like(out)
        torch.library.opcheck(ops.softmax_values_backward, (grad, query, key, log_normalizer, 0.5, backend))
        torch.library.opcheck(ops.softmax_shared_backward, ([grad, 2 * grad], query, key, [value, -value],
                                                            [center, center], [out, out], log_normalizer, 0.5,
                                                            backend))
        torch.library.opcheck(ops.softmax_shared_backward, ([grad], query, key, [value], [], [out],
                                                            log_normalizer, 0.5, backend))


def _transposed(tensor):
    """The same values in a (B, N, C) view of a (B, C, N) tensor, as a caller may pass them."""
    return tensor.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_ops_on_transposed_inputs(backend):
    # the fake kernels must give the real outputs' strides for any input strides
    query, key, value, center = (_transposed(t) for t in sample("softmax", requires_grad=False))
    assert not query.is_contiguous()
    out, log_normalizer = ops.softmax_forward(query, key, value, center, 0.5, backend)
    grad = _transposed(torch.randn_like(out))
    torch.library.opcheck(ops.softmax_forward, (query, key, value, center, 0.5, backend))
    torch.library.opcheck(ops.softmax_backward, (grad, query, key, value, center, out, log_normalizer, 0.5, backend))
    for kernel in MEAN_KERNELS:
        forward, backward = ops.mean_ops(kernel)
        query, key, value, center = (_transposed(t) for t in sample(kernel, requires_grad=False))
        torch.library.opcheck(forward, (query, key, value, center, 0.5, backend))
        torch.library.opcheck(backward, (grad, query, key, value, center, 0.5, backend))


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
def test_compile_fullgraph_has_no_graph_break(mode):
    """A stage under torch.compile(fullgraph=True): forward and backward match eager."""
    torch._dynamo.reset()
    stage = fastnl.NonlocalStage(8, num_blocks=2, mode=mode, sub_sample=True).double()
    for branch in stage.branches:  # make the blocks non-trivial
        torch.nn.init.normal_(branch.bn.weight)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    eager_out = stage(x)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    compiled_out = torch.compile(stage, fullgraph=True, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), x)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product"])
def test_compile_with_inductor_forward_and_backward(mode):
    # inductor checks every custom op's real output strides against its fake kernel's
    torch._dynamo.reset()
    stage = fastnl.NonlocalStage(8, num_blocks=2, mode=mode).double()  # float64: no reordering noise
    for branch in stage.branches:
        torch.nn.init.normal_(branch.bn.weight)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    eager_out = stage(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *stage.parameters()])
    compiled_out = torch.compile(stage, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), [x, *stage.parameters()])
    torch.testing.assert_close(compiled_out, eager_out)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager)


def test_statistics_output_is_not_differentiable():
    query, key, value, center = sample("softmax")
    _, log_normalizer = fastnl.nonlocal_attend(query, key, value, center, backend="torch")
    assert not log_normalizer.requires_grad
