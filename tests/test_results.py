"""The committed results (docs/results/, docs/results.md) are what the project computes from
the committed logs: tables regenerated and compared, records consistent, no machine paths,
one code version per table, the weights load into the models their configs name."""
import csv
import json
from pathlib import Path

import pytest
import torch

from fastnl.app.checkpoint import load_model
from fastnl.app.reproduce import PAPER_TABLE1, markdown_table, read_run
from fastnl.app.results import RECORDS, WEIGHTS, embedded_table
from fastnl.app.spectrum import weight_spectra

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"
TABLES = sorted(path.parent for path in RESULTS.glob("*/table1.md"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def runs_of(table_dir):
    """{row: [run folders, by seed]} in the paper's row order: how `reproduce --export` was run."""
    runs = {row: sorted(table_dir.glob(f"{row}/seed-*"), key=_seed) for row in PAPER_TABLE1}
    return {row: folders for row, folders in runs.items() if folders}


def _seed(run):
    return int(run.name.removeprefix("seed-"))


def all_runs():
    return [run for table in TABLES for folders in runs_of(table).values() for run in folders]


def _run_id(run):
    return str(run.relative_to(RESULTS))


def test_the_float32_table_is_committed_and_every_folder_is_a_table_of_known_rows():
    assert RESULTS / "table1" in TABLES
    assert {path for path in RESULTS.iterdir() if path.is_dir()} == set(TABLES)
    for table_dir in TABLES:
        rows = {path.name for path in table_dir.iterdir() if path.is_dir() and path.name != "spectrum"}
        assert rows == set(runs_of(table_dir)), table_dir.name


@pytest.mark.parametrize("table_dir", TABLES, ids=lambda path: path.name)
def test_table_is_what_reproduce_computes_from_the_committed_logs(table_dir):
    runs = {row: [read_run(folder) for folder in folders] for row, folders in runs_of(table_dir).items()}
    assert markdown_table(runs) == (table_dir / "table1.md").read_text()
    assert (table_dir / "table1.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("table_dir", TABLES, ids=lambda path: path.name)
def test_results_page_embeds_the_committed_table(table_dir):
    assert embedded_table(PAGE.read_text(), table_dir.name) == (table_dir / "table1.md").read_text()


@pytest.mark.parametrize("table_dir", TABLES, ids=lambda path: path.name)
def test_one_table_is_trained_by_one_code_version_and_one_setting(table_dir):
    configs = [read_run(folder)["config"] for folders in runs_of(table_dir).values() for folder in folders]
    assert len({config["run"]["code_version"] for config in configs}) == 1
    shared = ("dataset", "arch", "mode", "epochs", "milestones", "lr", "momentum", "gamma", "weight_decay",
              "batch_size", "amp", "channels_last", "compile", "train_subset", "max_steps")
    assert len({json.dumps([config[key] for key in shared] + [config["run"]["device"]]) for config in configs}) == 1
    assert all((config["train_subset"], config["max_steps"]) == (None, None) for config in configs)  # whole epochs


def test_the_float32_and_bf16_tables_differ_only_in_precision():
    if not (RESULTS / "table1-bf16").is_dir():
        pytest.skip("the bf16 rows are not committed yet")
    base, bf16 = runs_of(RESULTS / "table1"), runs_of(RESULTS / "table1-bf16")
    assert set(bf16) <= set(base)
    for row, folders in bf16.items():
        for folder in folders:
            ours, theirs = read_run(folder)["config"], read_run(RESULTS / "table1" / row / folder.name)["config"]
            assert (theirs["amp"], ours["amp"]) == (None, "bf16")
            assert theirs["run"]["code_version"] == ours["run"]["code_version"]
            ignored = ("amp", "out", "run", "resume")
            assert {key for key in theirs if key not in ignored and theirs[key] != ours[key]} == set()


@pytest.mark.parametrize("run", all_runs(), ids=_run_id)
def test_run_records_are_whole_consistent_and_portable(run):
    for name in RECORDS:
        assert (run / name).exists(), name
    record = read_run(run)
    config, history, final = record["config"], record["history"], record["final"]
    row, seed = run.parent.name, _seed(run)
    assert (config["placement"], config["seed"], config["out"]) == (row, seed, f"{row}/seed-{seed}")
    assert [entry["epoch"] for entry in history] == list(range(1, config["epochs"] + 1))
    assert final["epoch"] == config["epochs"]
    assert final["test_error"] == pytest.approx(100 * (1 - history[-1]["test_acc"]))
    with open(run / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["test_acc"]) for row in rows] == [entry["test_acc"] for entry in history]
    for name in ("config.json", "log.json", "final.json"):
        text = (run / name).read_text()
        assert str(ROOT) not in text
        assert not [value for value in _values(json.loads(text)) if str(value).startswith(("/", "~"))]
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC


def _values(tree):
    if isinstance(tree, dict):
        return [value for item in tree.values() for value in _values(item)]
    if isinstance(tree, list):
        return [value for item in tree for value in _values(item)]
    return [tree]


@pytest.mark.parametrize("run", [run for run in all_runs() if (run / WEIGHTS).exists()], ids=_run_id)
def test_committed_weights_are_the_run_model(run):
    model, config = load_model(run / WEIGHTS)
    recorded = read_run(run)["config"]  # config.json: the same settings, plus what the run found
    assert {key: value for key, value in recorded.items() if key != "run"} == config
    assert sum(p.numel() for p in model.parameters()) == recorded["run"]["parameters"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    assert sorted(torch.load(run / WEIGHTS, weights_only=True)) == ["config", "model"]  # no optimizer state


def test_spectra_are_of_the_committed_weights():
    spectrum_dir = RESULTS / "table1" / "spectrum"
    result = json.loads((spectrum_dir / "spectrum.json").read_text())
    labels = [entry["label"] for entry in result["checkpoints"]]
    assert labels == ["original-2 seed 0", "original-4 seed 0", "proposed-4 seed 0"]
    for entry in result["checkpoints"]:
        assert not Path(entry["checkpoint"]).is_absolute()
        model, config = load_model(ROOT / entry["checkpoint"])
        assert entry["config"] == config
        recomputed = weight_spectra(model, result["top"])  # the weights' spectra, not a stale copy
        assert [block["name"] for block in recomputed] == [block["name"] for block in entry["blocks"]]
        for ours, committed in zip(recomputed, entry["blocks"]):
            assert ours["eigenvalues"] == pytest.approx(committed["eigenvalues"], rel=1e-6, abs=1e-9)
        assert all(record["disc_distance"] <= 1e-6 for record in entry["affinity"])
    for name in result["figures"].values():
        assert (spectrum_dir / name).read_bytes()[:8] == PNG_MAGIC
