"""fastnl.spectrum on small deterministic models with hand-set weights."""
import json

import pytest
import torch
from PIL import Image
from torch import nn

from fastnl import NonlocalBlock, NonlocalStage
from fastnl.app.checkpoint import save_checkpoint
from fastnl.app.spectrum import affinity_spectra, analyze, nonlocal_modules, weight_spectra
from fastnl.app.spectrum.__main__ import FIGURES, affinity_figure, main, unique_labels
from fastnl.app.spectrum.affinity import capture_inputs, disc_distance
from fastnl.app.spectrum.plot import save_affinity_figure, save_comparison_figure, save_weight_figure
from fastnl.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _orthogonal(size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]


def _set_branch(branch, product, bn_scale):
    """Make W_z W_g == product (C, C): W_g = I, W_z = product / bn_scale, BatchNorm scale bn_scale.

    BatchNorm's folded scale is weight / sqrt(running_var + eps); weight 1 and a chosen
    running_var give any positive per-channel scale, so the test also checks the folding.
    """
    channels = product.shape[0]
    with torch.no_grad():
        branch.g.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        branch.W_z.weight.copy_((product / bn_scale.unsqueeze(1)).view(channels, channels, 1, 1))
        branch.bn.weight.fill_(1.0)
        branch.bn.running_var.copy_(bn_scale.pow(-2) - branch.bn.eps)


def _stage_with_spectrum(eigenvalues, antisymmetric, seed=0):
    """A NonlocalStage (C' = C) whose one block has W = Q diag(eigenvalues) Q^T + A."""
    channels = len(eigenvalues)
    stage = NonlocalStage(channels, num_blocks=1, inter_channels=channels)
    basis = _orthogonal(channels, seed)
    product = basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T
    skew = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64) if antisymmetric else torch.zeros(channels, channels)
    bn_scale = torch.linspace(0.5, 2.0, channels, dtype=torch.float64)
    _set_branch(stage.branches[0], (product + skew - skew.T).float(), bn_scale.float())
    return stage


# (eigenvalues of the symmetric part, top, reported series, negative fraction of the series,
#  negative fraction of all, negative weight, max positive, max negative)
KNOWN_SPECTRA = [
    ([3.0, 1.0, 0.0, -0.5, -2.0], 5, [3.0, 1.0, 0.0, -0.5, -2.0], 2 / 5, 2 / 5, 2.5 / 6.5, 3.0, -2.0),
    # top 3 by magnitude: 3, -2, 1, then sorted descending
    ([3.0, 1.0, 0.0, -0.5, -2.0], 3, [3.0, 1.0, -2.0], 1 / 3, 2 / 5, 2.5 / 6.5, 3.0, -2.0),
    # damping only: no positive eigenvalue (the stable pattern the paper looks for)
    ([-0.25, -1.0, -4.0], 32, [-0.25, -1.0, -4.0], 1.0, 1.0, 1.0, None, -4.0),
    ([2.0, 0.5], 1, [2.0], 0.0, 0.0, 0.0, 2.0, None),
]


@pytest.mark.parametrize("antisymmetric", [False, True], ids=["symmetric W", "W with skew part"])
@pytest.mark.parametrize(
    "eigenvalues, top, series, fraction, fraction_all, negative_weight, max_positive, max_negative",
    KNOWN_SPECTRA)
def test_known_weight_spectrum(eigenvalues, top, series, fraction, fraction_all, negative_weight,
                               max_positive, max_negative, antisymmetric):
    [record] = weight_spectra(_stage_with_spectrum(eigenvalues, antisymmetric), top=top)
    assert record["num_eigenvalues"] == len(eigenvalues)
    assert record["eigenvalues"] == pytest.approx(series, abs=1e-5)
    assert record["negative_fraction"] == pytest.approx(fraction)
    assert record["negative_fraction_all"] == pytest.approx(fraction_all)
    assert record["negative_weight"] == pytest.approx(negative_weight, abs=1e-6)
    for key, expected in (("max_positive", max_positive), ("max_negative", max_negative)):
        assert (record[key] is None) if expected is None else record[key] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("channels, inter_channels", [(16, 8), (16, 4), (12, 3)])
def test_generic_bottleneck_has_balanced_inertia(channels, inter_channels):
    # Sylvester: sym(W_z W_g) of rank-r factors has r positive, r negative, C - 2r zero
    # eigenvalues; the zeros must not be counted as negative by rounding
    torch.manual_seed(channels + inter_channels)
    block = NonlocalBlock(channels, inter_channels=inter_channels)
    nn.init.normal_(block.branches[0].bn.weight)
    [record] = weight_spectra(block, top=channels)
    assert record["negative_fraction_all"] == inter_channels / channels
    assert sum(value > record["zero_tolerance"] for value in record["eigenvalues"]) == inter_channels
    assert 0.0 < record["negative_weight"] < 1.0


def test_new_block_has_zero_spectrum():
    # zero-initialised BatchNorm scale: W = 0, nothing counts as negative or positive
    [record] = weight_spectra(NonlocalBlock(8), top=4)
    assert record["eigenvalues"] == [0.0] * 4
    assert record["negative_fraction"] == 0.0 and record["negative_weight"] == 0.0
    assert record["max_positive"] is None and record["max_negative"] is None


def test_blocks_named_by_module_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), NonlocalStage(8, num_blocks=3),
                          nn.Sequential(NonlocalBlock(8), NonlocalBlock(8)))
    assert [path for path, _ in nonlocal_modules(model)] == ["1", "2.0", "2.1"]
    records = weight_spectra(model, top=2)
    assert [record["name"] for record in records] == [
        "1.branches.0", "1.branches.1", "1.branches.2", "2.0.branches.0", "2.1.branches.0"]
    assert [record["block"] for record in records] == [0, 1, 2, 0, 0]
    assert [record["type"] for record in records] == ["NonlocalStage"] * 3 + ["NonlocalBlock"] * 2
    assert [record["name"] for record in weight_spectra(NonlocalBlock(4))] == ["model.branches.0"]


def _randomize(model, seed, sharpness):
    """Non-trivial weights: BatchNorm scales away from zero, theta scaled by `sharpness` so
    the softmax logits grow, P is peaked and the eigenvalues of P - I spread towards the
    disc's edge."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, NonlocalStage | NonlocalBlock) and module.affinity.kernel == "softmax" \
                and module.mode != "gaussian":
            with torch.no_grad():
                module.affinity.theta.weight.mul_(sharpness)
    return model


@pytest.mark.parametrize("module", [
    NonlocalStage(8, num_blocks=2),
    NonlocalStage(8, num_blocks=1, mode="gaussian"),
    NonlocalBlock(8, use_scale=True),
], ids=["stage embedded_gaussian", "stage gaussian", "block scaled"])
# 30: nearly one-hot rows, a nearly reducible chain with several eigenvalues on the circle
@pytest.mark.parametrize("sharpness", [1.0, 30.0])
def test_softmax_affinity_is_markov_and_inside_disc(module, sharpness):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), module), seed=1, sharpness=sharpness)
    images = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    [(record, eigenvalues)] = affinity_spectra(model, images)
    assert record["markov"] and record["note"] is None
    assert (record["images"], record["positions"], record["keys"]) == (3, 36, 36)
    assert record["row_sum_error"] <= 1e-12
    assert record["min_entry"] >= 0.0
    assert eigenvalues.shape == (3, 36)
    # Gershgorin: every eigenvalue of P - I lies in |lambda + 1| <= 1
    assert record["disc_distance"] <= 1e-6
    # the constant vector is a right eigenvector of P with eigenvalue 1: P - I has a 0
    assert eigenvalues.abs().min(dim=1).values.max().item() <= 1e-8


def test_disc_distance_measures_outside_points():
    inside = torch.tensor([0j, -2 + 0j, -1 + 1j, -1 + 0.5j])
    assert disc_distance(inside) == 0.0
    assert disc_distance(torch.tensor([-1 + 0j, 0.5 + 0j])) == pytest.approx(0.5)
    assert disc_distance(torch.tensor([-1 + 2j])) == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["dot_product", "concatenation"])
def test_non_markov_modes_skip_the_disc(mode):
    model = _randomize(nn.Sequential(NonlocalStage(4, mode=mode)), seed=3, sharpness=1.0)
    [(record, eigenvalues)] = affinity_spectra(model, torch.randn(2, 4, 4, 4))
    assert eigenvalues is None
    assert not record["markov"]
    assert record["disc_distance"] is None and record["row_sum_error"] is None
    assert "not a Markov matrix" in record["note"]


def test_sub_sampled_affinity_has_no_spectrum():
    model = _randomize(nn.Sequential(NonlocalBlock(4, sub_sample=True)), seed=4, sharpness=1.0)
    [(record, eigenvalues)] = affinity_spectra(model, torch.randn(2, 4, 4, 4))
    assert eigenvalues is None
    assert (record["positions"], record["keys"]) == (16, 4)
    assert record["row_sum_error"] <= 1e-12  # still row-stochastic, only not square
    assert record["disc_distance"] is None
    assert "undefined" in record["note"]


def test_capture_sees_stage_input_and_restores_mode():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), NonlocalStage(4, num_blocks=2))
    model.train()
    images = torch.randn(2, 3, 4, 4)
    [(path, module, inputs)] = capture_inputs(model, images)
    assert path == "1" and module is model[1]
    torch.testing.assert_close(inputs, model[0](images))
    assert model.training
    assert not model[1]._forward_pre_hooks


def test_report_schema_is_json():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 1), NonlocalStage(8, num_blocks=2),
                                     NonlocalBlock(8, mode="dot_product")), seed=6, sharpness=1.0)
    report, spectra = analyze(model, top=3, images=torch.randn(2, 3, 4, 4))
    report = json.loads(json.dumps(report))
    assert set(report) == {"blocks", "affinity"}
    block_keys = {"name", "module", "type", "block", "mode", "channels", "num_eigenvalues", "eigenvalues",
                  "negative_fraction", "negative_fraction_all", "negative_weight", "max_positive",
                  "max_negative", "zero_tolerance"}
    assert [set(block) for block in report["blocks"]] == [block_keys] * 3
    assert all(len(block["eigenvalues"]) == 3 for block in report["blocks"])
    affinity_keys = {"module", "type", "mode", "kernel", "images", "positions", "keys", "markov",
                     "row_sum_error", "min_entry", "disc_distance", "note"}
    assert [set(record) for record in report["affinity"]] == [affinity_keys] * 2
    assert [record["module"] for record, _ in spectra] == ["1"]  # the dot block has no spectrum
    assert analyze(model, top=3)[0]["affinity"] is None


def test_figures_are_written(tmp_path):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 1), NonlocalStage(8, num_blocks=2), NonlocalBlock(8)),
                       seed=7, sharpness=2.0)
    report, spectra = analyze(model, top=4, images=torch.randn(2, 3, 4, 4))
    save_weight_figure(report["blocks"], "weights", tmp_path / "weights.png")
    save_comparison_figure([(report["blocks"], "a"), ([], "empty")], tmp_path / "comparison.png")
    save_affinity_figure(spectra, "affinity", tmp_path / "affinity.png")
    for name in ("weights.png", "comparison.png", "affinity.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def _image_folder(root, per_class):
    """A tiny CIFAR-shaped ImageFolder tree (train/, test/; two classes of 32x32 PNGs)."""
    generator = torch.Generator().manual_seed(8)
    for split in ("train", "test"):
        for label in ("airplane", "automobile"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{index:04d}.png")
    return root


def _checkpoint(path, placement, seed):
    options = {"arch": "preresnet20", "placement": placement, "num_classes": 10,
               "mode": "embedded_gaussian", "backend": None}
    model = _randomize(build_model(**options), seed=seed, sharpness=1.0)
    save_checkpoint(path, {"model": model.state_dict(),
                           "config": {"model": options, "dataset": "cifar10", "data_dir": "unused"}})
    return path


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTNL_CACHE_DIR", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "data", per_class=3)
    original = _checkpoint(tmp_path / "original-2" / "checkpoint.pt", "original-2", seed=9)
    proposed = _checkpoint(tmp_path / "proposed-2" / "checkpoint.pt", "proposed-2", seed=10)
    baseline = _checkpoint(tmp_path / "baseline" / "checkpoint.pt", "baseline", seed=11)
    out = tmp_path / "out"
    main([str(original), "--compare", str(proposed), str(baseline), "--top", "8", "--out", str(out),
          "--data", str(data), "--images", "2"])

    result = json.loads((out / "spectrum.json").read_text())
    assert result["top"] == 8
    # no affinity figure for the baseline: it has no nonlocal module
    assert result["figures"] == {**FIGURES, **dict(map(affinity_figure, (1, 2)))}
    for name in result["figures"].values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    first, second, third = result["checkpoints"]
    assert [entry["label"] for entry in result["checkpoints"]] == ["original-2", "proposed-2", "baseline"]
    assert third["blocks"] == [] and not third["affinity"]
    assert [block["name"] for block in first["blocks"]] == ["layers.4.nonlocal_module.0.branches.0",
                                                             "layers.4.nonlocal_module.1.branches.0"]
    assert [block["name"] for block in second["blocks"]] == ["layers.4.nonlocal_module.branches.0",
                                                              "layers.4.nonlocal_module.branches.1"]
    assert all(len(block["eigenvalues"]) == 8 for block in first["blocks"] + second["blocks"])
    assert first["images"] == {"dataset": "cifar10", "split": "test", "indices": [0, 5]}
    assert [record["module"] for record in first["affinity"]] == ["layers.4.nonlocal_module.0",
                                                                  "layers.4.nonlocal_module.1"]
    assert [record["module"] for record in second["affinity"]] == ["layers.4.nonlocal_module"]
    for record in first["affinity"] + second["affinity"]:
        assert (record["images"], record["positions"], record["keys"]) == (2, 256, 256)
        assert record["row_sum_error"] <= 1e-12 and record["disc_distance"] <= 1e-6
    printed = capsys.readouterr().out
    assert "layers.4.nonlocal_module.branches.1" in printed and "spectrum.json" in printed


def test_cli_weights_only(tmp_path):
    checkpoint = _checkpoint(tmp_path / "run" / "last.pt", "proposed-3", seed=11)
    main([str(checkpoint)])
    out = tmp_path / "run" / "spectrum"  # default: next to the checkpoint
    result = json.loads((out / "spectrum.json").read_text())
    assert result["figures"] == {"weights": FIGURES["weights"]}
    assert (out / FIGURES["weights"]).read_bytes()[:8] == PNG_MAGIC
    [entry] = result["checkpoints"]
    assert entry["affinity"] is None and "images" not in entry
    assert len(entry["blocks"]) == 3 and all(len(block["eigenvalues"]) == 32 for block in entry["blocks"])


def test_labels_name_the_model_and_tell_apart_checkpoints_of_the_same_one():
    def entry(path, placement=None, seed=None, amp=None):
        config = {"seed": seed, "amp": amp, "model": {"placement": placement}} if placement else {}
        return {"checkpoint": path, "config": config}

    entries = [entry("runs/original-4/seed-0/model.pt", "original-4", 0),
               entry("runs/proposed-4/seed-0/model.pt", "proposed-4", 0),
               entry("a/checkpoint.pt", "proposed-4", 1),
               entry("runs/table1-bf16/original-4/seed-0/model.pt", "original-4", 0, "bf16"),
               entry("b/checkpoint.pt", "baseline"), entry("c/checkpoint.pt", "baseline"),
               entry("table1/p/seed-0/model.pt", "proposed-2", 0), entry("table1-x/p/seed-0/model.pt", "proposed-2", 0),
               entry("weights/last.pt")]
    assert unique_labels(entries[:3]) == ["original-4 seed 0", "proposed-4 seed 0", "proposed-4 seed 1"]  # none shared
    assert unique_labels(entries) == [
        "original-4 seed 0", "proposed-4 seed 0", "proposed-4 seed 1", "original-4 seed 0 bf16",
        "baseline (b/checkpoint)", "baseline (c/checkpoint)",
        "proposed-2 seed 0 (table1/p/seed-0/model)", "proposed-2 seed 0 (table1-x/p/seed-0/model)", "weights/last"]
