"""The modules' layout: position rows inside, the caller's memory format outside, and no
copies a caller did not ask for (fastnl/modules.py, "Layout")."""
import pytest
import torch
from test_modules import randomize
from torch.utils._python_dispatch import TorchDispatchMode

import fastnl
from fastnl.models import build_model
from fastnl.modules import MODES

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


class Copies(TorchDispatchMode):
    """The shapes of every tensor copy dispatched below autograd (forward and backward)."""

    COPIES = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.COPIES:
            self.shapes.append(tuple(out.shape))
        return out


def channels_last(x):
    return x.to(memory_format=FORMATS[x.dim()]) if x.dim() in FORMATS else x


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 4)], ids=["2d", "3d"])
def test_each_memory_format_gives_the_same_result_in_that_format(mode, sub_sample, spatial):
    dimension = len(spatial)
    stage = randomize(fastnl.NonlocalStage(8, num_blocks=2, mode=mode, sub_sample=sub_sample,
                                            dimension=dimension)).double()
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    x_last = channels_last(x).requires_grad_()
    x = x.requires_grad_()
    out, out_last = stage(x), stage(x_last)
    assert out.is_contiguous()
    assert out_last.is_contiguous(memory_format=FORMATS[x.dim()])
    torch.testing.assert_close(out_last, out, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, grad)
    (actual,) = torch.autograd.grad(out_last, x_last, grad)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", ["block", "stage"])
def test_channels_last_is_served_without_layout_copies(module):
    """No activation is copied: theta, phi and g write their own contiguous rows
    (fastnl.linear_parts; the 1x1 weights' gradients are copied into their parameters'
    strides). The gradient is dense, as in training: an expanded one (of a .sum()) would
    be materialised once, by the fused BatchNorm's backward."""
    layer = fastnl.NonlocalBlock(16) if module == "block" else fastnl.NonlocalStage(16, num_blocks=3)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    with Copies() as seen:
        layer(x).backward(grad)
    weights = {tuple(parameter.shape) for parameter in layer.parameters()}
    assert [shape for shape in seen.shapes if shape not in weights] == []


def test_a_contiguous_input_is_copied_once_in_and_once_out():
    stage = fastnl.NonlocalStage(16, num_blocks=3)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with Copies() as seen:
        stage(x).sum().backward()
    full = [shape for shape in seen.shapes if shape in {(2, 64, 16), (2, 16, 8, 8)}]
    # forward: into rows, out of rows; backward: the gradient into rows, and out into x's layout
    assert len(full) == 4, seen.shapes


def test_a_checkpoint_does_not_depend_on_the_layout_it_was_trained_in():
    torch.manual_seed(0)
    trained = build_model("preresnet20", placement="proposed-2").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    images = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    trained(images).logsumexp(1).sum().backward()
    optimizer.step()
    fresh = build_model("preresnet20", placement="proposed-2")
    fresh.load_state_dict(trained.state_dict())
    trained.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images.contiguous()), trained(images), rtol=1e-5, atol=1e-5)


def test_channels_last_gradients_keep_the_parameters_strides():
    """DDP's buckets follow the parameters' strides; a gradient in other strides is
    copied, with a warning."""
    stage = fastnl.NonlocalStage(16, num_blocks=2, sub_sample=True).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    stage(x).backward(torch.randn_like(x))
    for name, parameter in stage.named_parameters():
        assert parameter.grad.stride() == parameter.stride(), name


@pytest.mark.parametrize("make", [lambda x: x[..., ::2], lambda x: x.transpose(2, 3)], ids=["sliced", "transposed"])
def test_other_strided_inputs_get_a_contiguous_result(make):
    stage = randomize(fastnl.NonlocalStage(8, num_blocks=2)).double()
    x = make(torch.randn(2, 8, 6, 10, dtype=torch.float64))
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out = stage(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, stage(x.contiguous()), rtol=1e-12, atol=1e-12)


def test_one_dimensional_and_empty_batches():
    block = randomize(fastnl.NonlocalBlock(8, dimension=1, sub_sample=True)).double()
    x = torch.randn(2, 8, 9, dtype=torch.float64)
    assert block(x).shape == x.shape
    x_last = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, C, L) with C innermost
    torch.testing.assert_close(block(x_last), block(x), rtol=1e-12, atol=1e-12)
    empty = torch.randn(0, 8, 4, 4)
    assert fastnl.NonlocalStage(8)(empty).shape == empty.shape
