"""fastnl.insert_nonlocal on torchvision's networks: identity at insertion, training,
state_dict round trips, torch.compile, DDP, and errors that name the place."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastnl
from fastnl.insert import NAME

torchvision = pytest.importorskip("torchvision")

# Wang et al.'s 5-block setting on ResNet-50: every other bottleneck of res3 and res4
RESNET50_FIVE = ["layer2.1", "layer2.3", "layer3.1", "layer3.3", "layer3.5"]


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _nonlocal_modules(model):
    return [m for m in model.modules() if isinstance(m, (fastnl.NonlocalBlock, fastnl.NonlocalStage))]


def test_resnet50_five_blocks_are_the_identity_then_train():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    before = model(images)
    fastnl.insert_nonlocal(model, RESNET50_FIVE, images, sub_sample=True)
    assert len(_nonlocal_modules(model)) == 5
    assert torch.equal(model(images), before)
    assert all(f"{place}.{NAME}.affinity.theta.weight" in model.state_dict() for place in RESNET50_FIVE)
    model.train()
    loss = F.cross_entropy(model(images), torch.tensor([1, 2]))
    loss.backward()
    bn = getattr(model.layer3[3], NAME).branches[0].bn
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0  # the block starts to learn


def test_a_stage_goes_after_a_sequential_as_its_last_child():
    model = _resnet18()
    images = torch.randn(2, 3, 64, 64)
    before = model(images)
    fastnl.insert_nonlocal(model, ["layer2"], images, num_blocks=3)
    stage = getattr(model.layer2, NAME)
    assert isinstance(stage, fastnl.NonlocalStage) and list(model.layer2.children())[-1] is stage
    assert torch.equal(model(images), before)


def test_stacked_blocks_are_a_sequential_in_a_row():
    model = _resnet18()
    images = torch.randn(2, 3, 64, 64)
    before = model(images)
    fastnl.insert_nonlocal(model, ["layer2.0"], images, stacked=3, mode="dot_product")
    stacked = getattr(model.layer2[0], NAME)
    assert isinstance(stacked, torch.nn.Sequential) and len(stacked) == 3
    assert all(isinstance(block, fastnl.NonlocalBlock) and block.mode == "dot_product" for block in stacked)
    assert torch.equal(model(images), before)
    with pytest.raises(TypeError, match="not both"):
        fastnl.insert_nonlocal(_resnet18(), ["layer2.0"], images, stacked=2, num_blocks=2)
    with pytest.raises(ValueError, match="at least 1"):
        fastnl.insert_nonlocal(_resnet18(), ["layer2.0"], images, stacked=0)


@pytest.mark.parametrize("network", ["r3d_18", "r2plus1d_18"])
def test_video_networks_get_3d_blocks_that_pool_space_only(network):
    torch.manual_seed(0)
    model = getattr(torchvision.models.video, network)(num_classes=5).eval()
    clips = torch.randn(1, 3, 4, 32, 32)
    before = model(clips)
    fastnl.insert_nonlocal(model, ["layer2.0", "layer3.0"], clips, sub_sample=True)
    assert torch.equal(model(clips), before)
    block = getattr(model.layer2[0], NAME)
    assert block.dimension == 3 and block.in_channels == 128
    features = torch.randn(1, 128, 4, 8, 8)
    query, key = block.query_key(features)
    assert query.shape[1] == 4 * 8 * 8 and key.shape[1] == 4 * 4 * 4  # time kept, space pooled 2x2


def test_state_dict_round_trip():
    images = torch.randn(2, 3, 32, 32)
    trained = fastnl.insert_nonlocal(_resnet18(), ["layer1.1", "layer3.0"], images)
    for module in _nonlocal_modules(trained):
        torch.nn.init.normal_(module.branches[0].bn.weight)
    fresh = fastnl.insert_nonlocal(_resnet18(), ["layer1.1", "layer3.0"], images)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(images), trained(images))


def test_under_torch_compile():
    images = torch.randn(2, 3, 32, 32)
    model = fastnl.insert_nonlocal(_resnet18(), ["layer2.1"], images)
    for module in _nonlocal_modules(model):
        torch.nn.init.normal_(module.branches[0].bn.weight)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-4)


def _ddp_step(rank, store_path, results):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    torch.set_num_threads(1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    model = fastnl.insert_nonlocal(_resnet18().train(), ["layer2.1"], images)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    F.cross_entropy(ddp(images), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    bn_weight = getattr(model.layer2[1], NAME).branches[0].bn.weight.detach().clone()
    results[rank] = bn_weight
    dist.destroy_process_group()


def test_one_ddp_step_on_two_gloo_ranks(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_step, args=(str(tmp_path / "store"), results), nprocs=2)
        first, second = results[0], results[1]
    assert torch.equal(first, second) and first.abs().sum() > 0  # averaged gradients: the ranks agree


@pytest.mark.parametrize("places, words", [
    (["layer9.1"], "no submodule 'layer9.1' in ResNet"),
    (["layer2.1", "layer2.1"], "twice"),
    (["fc"], r"outputs \(2, 10\)"),
])
def test_errors_name_the_place(places, words):
    with pytest.raises(ValueError, match=words):
        fastnl.insert_nonlocal(_resnet18(), places, torch.randn(2, 3, 32, 32))


def test_a_module_that_cannot_be_built_names_its_place():
    with pytest.raises(ValueError, match=r"at 'layer2.1' \(output \(2, 128, 4, 4\)\): mode must be one of"):
        fastnl.insert_nonlocal(_resnet18(), ["layer2.1"], torch.randn(2, 3, 32, 32), mode="cosine")


def test_inferred_arguments_are_refused_and_a_place_takes_one_module():
    model, images = _resnet18(), torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="infers in_channels"):
        fastnl.insert_nonlocal(model, ["layer2.1"], images, in_channels=128)
    fastnl.insert_nonlocal(model, ["layer2.1"], images)
    with pytest.raises(ValueError, match="already has a nonlocal module"):
        fastnl.insert_nonlocal(model, ["layer2.1"], images)
