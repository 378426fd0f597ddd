"""Architectures: standard parameter counts, every preset, the placement format, old checkpoints."""
import json
from pathlib import Path

import pytest
import torch

from fastnl import NonlocalBlock, NonlocalStage
from fastnl.insert import NAME
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
    baseline = build_model().eval()
    baseline.load_state_dict({key: value for key, value in model.state_dict().items() if NAME not in key})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), baseline(x), rtol=0, atol=0)  # new nonlocal modules are the identity


# state_dict keys of build_model(arch, placement) at commit 5df9750, when the nonlocal
# modules were items of `layers` between the residual blocks:
#   {f"{arch} {placement}": list(build_model(arch, placement).state_dict()) for ...}
KEYS_BEFORE_NESTING = json.loads((Path(__file__).parent / "data" / "model_keys_before_nesting.json").read_text())


@pytest.mark.parametrize("case", list(KEYS_BEFORE_NESTING))
def test_checkpoints_from_before_nesting_load(case):
    arch, placement = case.split(" ")
    torch.manual_seed(0)
    trained = build_model(arch, placement)
    with torch.no_grad():
        for tensor in trained.state_dict().values():
            tensor.copy_(torch.randint_like(tensor, 1000) if tensor.is_floating_point() else tensor + 7)
    state = trained.state_dict()
    # the same order then and now, which is what an optimizer's saved states rely on
    old = dict(zip(KEYS_BEFORE_NESTING[case], state.values(), strict=True))
    fresh = build_model(arch, placement)
    fresh.load_state_dict(old)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in trained.parameters()]


def test_a_checkpoint_of_another_placement_is_refused():
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key|Missing key"):
        build_model(placement="original-2").load_state_dict(build_model(placement="proposed-3").state_dict())


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
