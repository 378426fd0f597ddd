"""NonlocalBlock and NonlocalStage: shapes, identity at init, the stage's shared affinity."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastnl
from fastnl import reference
from fastnl.modules import MODES

SPATIAL = {1: (9,), 2: (6, 5), 3: (3, 4, 4)}


class OpNames(TorchDispatchMode):
    """Records the name of every operator dispatched below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def randomize(module):
    """Non-zero BatchNorm scales so blocks stop being the identity."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    return module


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dimension", [1, 2, 3])
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("bn_layer", [False, True])
def test_new_modules_are_the_identity_and_keep_shape(mode, dimension, sub_sample, bn_layer):
    x = torch.randn(2, 8, *SPATIAL[dimension])
    block = fastnl.NonlocalBlock(8, mode=mode, sub_sample=sub_sample, bn_layer=bn_layer, dimension=dimension)
    stage = fastnl.NonlocalStage(8, num_blocks=3, mode=mode, sub_sample=sub_sample, bn_layer=bn_layer,
                                 dimension=dimension)
    assert torch.equal(block(x), x) and torch.equal(stage(x), x)
    randomize(block).eval()
    randomize(stage).eval()
    for module in (block, stage):
        if not bn_layer:
            for branch in module.branches:
                torch.nn.init.normal_(branch.W_z.weight)
        y = module(x)
        assert y.shape == x.shape and not torch.equal(y, x)
        y.sum().backward()


def test_sub_sampling_pools_keys_and_values_only():
    block = fastnl.NonlocalBlock(8, sub_sample=True)
    x = torch.randn(2, 8, 6, 6)
    query, key = block.query_key(x)
    value, center = block.branches[0].values(x.flatten(2).transpose(1, 2), x.shape[2:])
    assert query.shape == (2, 36, 4) and key.shape == (2, 9, 4)
    assert value.shape == (2, 9, 4) and center.shape == (2, 36, 4)
    three_d = fastnl.NonlocalBlock(8, sub_sample=True, dimension=3)  # time is not pooled
    assert three_d.query_key(torch.randn(1, 8, 3, 4, 4))[1].shape == (1, 12, 4)


def test_block_is_wang_et_al_formula():
    block = randomize(fastnl.NonlocalBlock(6, mode="embedded_gaussian", use_scale=True)).eval().double()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    theta = block.affinity.theta(x).flatten(2).transpose(1, 2)
    phi = block.affinity.phi(x).flatten(2).transpose(1, 2)
    branch = block.branches[0]
    g = branch.g(x).flatten(2).transpose(1, 2)
    y = reference.aggregate(theta, phi, g, scale=3 ** -0.5).transpose(1, 2).reshape(2, 3, 4, 5)
    torch.testing.assert_close(block(x), x + branch.bn(branch.W_z(y)))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_stage_uses_the_stage_input_affinity(mode):
    """Every block's affinity comes from X = Z^0; recomputing it from Z^n gives another result."""
    stage = randomize(fastnl.NonlocalStage(6, num_blocks=3, mode=mode)).eval().double()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    kernel, scale = stage.affinity.kernel, stage.affinity.scale

    def rows(t):
        return t.flatten(2).transpose(1, 2)

    def run(affinity_from_current):
        z = rows(x)
        for branch in stage.branches:
            query, key = stage.affinity(z if affinity_from_current else rows(x), x.shape[2:])
            value, center = branch.values(z, x.shape[2:])
            y = reference.diffuse(query, key, value, center, kernel=kernel, scale=scale)
            z = branch.project(y, x.shape[2:], z)
        return z.transpose(1, 2).reshape(x.shape)

    out = stage(x)
    torch.testing.assert_close(out, run(affinity_from_current=False))
    assert not torch.allclose(out, run(affinity_from_current=True))


def test_stage_computes_statistics_once():
    """One statistics pass for the whole stage; later blocks take the shared log_normalizer."""
    stage = randomize(fastnl.NonlocalStage(8, num_blocks=4, backend="torch"))
    with OpNames() as seen:
        stage(torch.randn(2, 8, 5, 5)).sum().backward()
    fastnl_ops = [name for name in seen.names if name.startswith("fastnl.")]
    assert fastnl_ops.count("fastnl.softmax_forward.default") == 1
    assert fastnl_ops.count("fastnl.softmax_forward_with_log_normalizer.default") == 3
    assert fastnl_ops.count("fastnl.softmax_backward.default") == 4


def test_weight_products_fold_batch_norm():
    stage = randomize(fastnl.NonlocalStage(6, num_blocks=2, inter_channels=4))
    for branch in stage.branches:
        branch.bn.running_var.uniform_(0.5, 2.0)
    for branch, product in zip(stage.branches, stage.weight_products()):
        bn_scale = branch.bn.weight / torch.sqrt(branch.bn.running_var + branch.bn.eps)
        expected = torch.diag(bn_scale) @ branch.W_z.weight[:, :, 0, 0] @ branch.g.weight[:, :, 0, 0]
        assert product.shape == (6, 6)
        torch.testing.assert_close(product, expected)


def test_backends_agree_inside_a_stage():
    stage = randomize(fastnl.NonlocalStage(8, num_blocks=2, sub_sample=True)).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    expected = stage(x)
    stage.backend = "reference"
    torch.testing.assert_close(stage(x), expected)


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "cosine"}, "mode must be one of"),
    ({"dimension": 4}, "dimension must be 1, 2 or 3"),
    ({"inter_channels": 0}, "inter_channels must be positive"),
])
def test_bad_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        fastnl.NonlocalBlock(8, **kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"expects \(B, 8, \*, \*\) input"):
        fastnl.NonlocalStage(8)(torch.randn(2, 7, 4, 4))
