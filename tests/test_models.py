"""Architectures: standard parameter counts, every preset, the placement format."""
import pytest
import torch

from fastnl import NonlocalBlock, NonlocalStage
from fastnl.models import ARCHS, PRESETS, build_model
from fastnl.models.placement import parse


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, parameters", [
    # 267,696 conv + 2,560 projection shortcuts + 650 fc + 1,376 BatchNorm
    ("preresnet20", 272_282),
    # the same plus BatchNorm in the two projection shortcuts (64 + 128)
    ("resnet20", 272_474),
])
def test_parameter_counts(arch, parameters):
    assert _count(build_model(arch, num_classes=10)) == parameters


@pytest.mark.parametrize("arch, depth", [("preresnet20", 20), ("preresnet56", 56), ("preresnet110", 110),
                                         ("resnet20", 20)])
def test_archs_depth(arch, depth):
    model = build_model(arch, num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth == ARCHS[arch][0]  # 3x3 convolutions plus the classifier
    assert model.fc.out_features == 100


def test_forward_shape():
    assert build_model("resnet20")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_and_start_as_baseline(preset):
    torch.manual_seed(0)
    model = build_model(placement=preset).eval()
    x = torch.randn(1, 3, 32, 32)
    body = model.stem(x)
    for layer in model.layers:
        out = layer(body)
        if isinstance(layer, (NonlocalStage, torch.nn.Sequential)):
            torch.testing.assert_close(out, body)  # same shape; new nonlocal modules are the identity
        body = out
    assert model(x).shape == (1, 10)


@pytest.mark.parametrize("preset, blocks, stages", [
    ("baseline", 0, 0), ("original-4", 4, 0), ("proposed-5", 0, 1), ("original-3-diff", 3, 0),
    ("proposed-3-diff", 0, 3),
])
def test_preset_contents(preset, blocks, stages):
    modules = list(build_model(placement=preset).modules())
    assert sum(isinstance(m, NonlocalBlock) for m in modules) == blocks
    assert sum(isinstance(m, NonlocalStage) for m in modules) == stages


def test_spec_equals_preset():
    assert parse("proposed:3@2.2") == parse("proposed-3")
    assert [(p.stage, p.block) for p in parse("original-3-diff")] == [(1, 2), (2, 2), (3, 2)]


@pytest.mark.parametrize("spec, message", [
    ("proposed3@2.2", "expected KIND"), ("sideways:2@2.2", "kind"), ("original@2.2,proposed@2.2", "twice"),
    ("original@4.1", "stage 4"), ("original@2.9", "no slot"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_model(placement=spec)
