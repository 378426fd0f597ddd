"""python -m fastnl.train end to end on tiny generated data: logs, resume, NaN stop."""
import csv
import json
import re
import sys

import pytest
import torch

from fastnl import backends
from fastnl.app import engine
from fastnl.app.checkpoint import load_model
from fastnl.app.engine import train
from fastnl.app.runlog import COLUMNS
from fastnl.app.train import EXIT_NON_FINITE, config_for, config_from_args, main, parser

QUICK = ["--device", "cpu", "--batch-size", "8", "--epochs", "2", "--milestones", "1"]


def _config(data_dir, out, *extra):
    """A TrainConfig parsed from the command line, as main builds it (2 steps an epoch)."""
    return config_from_args(parser().parse_args(["--data-dir", str(data_dir), "--out", str(out), *QUICK,
                                                 "--train-subset", "16", *extra]))


def _weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("layout, preset", [("image_folder", "proposed-2"), ("official_cifar10", "baseline")])
def test_train_resume_and_records(layout, preset, request, tmp_path):
    data_dir, out = request.getfixturevalue(layout), tmp_path / "run"
    assert main(["--data-dir", str(data_dir), "--out", str(out), "--preset", preset, *QUICK,
                 "--epochs", "1", "--max-steps", "3"]) == 0
    with pytest.raises(FileExistsError, match="--resume"):
        main(["--data-dir", str(data_dir), "--out", str(out), "--preset", preset, *QUICK])
    assert main(["--data-dir", str(data_dir), "--out", str(out), "--preset", preset, *QUICK,
                 "--max-steps", "5", "--resume"]) == 0
    with open(out / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == COLUMNS and [row["epoch"] for row in rows] == ["1", "2"]
    assert [row["steps"] for row in rows] == ["3", "2"] and float(rows[1]["lr"]) == pytest.approx(0.01)
    assert json.loads((out / "log.json").read_text())[1]["test_acc"] == pytest.approx(float(rows[1]["test_acc"]))
    config = json.loads((out / "config.json").read_text())
    assert config["placement"] == preset and config["lr"] == 0.1 and config["run"]["device"] == "cpu"
    default_cpu_backend = backends.resolve(None, "cpu")  # "cpp", or "torch" where it did not build
    assert config["run"]["nonlocal_backend"] == (None if preset == "baseline" else default_cpu_backend)
    model, saved = load_model(out / "checkpoint.pt")
    assert saved["model"]["placement"] == preset and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "config"} <= set(state) and state["epoch"] == 2


def test_resume_is_bit_identical(image_folder, tmp_path):
    straight = train(_config(image_folder, tmp_path / "straight", "--preset", "proposed-2"))
    train(_config(image_folder, tmp_path / "split", "--preset", "proposed-2", "--epochs", "1"))
    resumed = train(_config(image_folder, tmp_path / "split", "--preset", "proposed-2", "--resume"))
    for name, tensor in _weights(tmp_path / "straight").items():
        assert torch.equal(tensor, _weights(tmp_path / "split")[name]), name
    assert resumed["test_loss"] == straight["test_loss"]


def test_resume_refuses_other_settings(image_folder, tmp_path):
    train(_config(image_folder, tmp_path, "--epochs", "1", "--max-steps", "1"))
    with pytest.raises(ValueError, match="lr"):
        train(_config(image_folder, tmp_path, "--lr", "0.2", "--resume"))


def test_resume_restores_the_runs_settings(image_folder, tmp_path):
    """--out DIR --resume alone continues the run as it was set up; a longer --epochs is
    accepted, a flag that changes what is computed is refused by name."""
    out = tmp_path / "run"
    assert main(["--data-dir", str(image_folder), "--out", str(out), "--preset", "proposed-2", *QUICK,
                 "--lr", "0.05", "--train-subset", "16", "--epochs", "1"]) == 0
    resumed = config_for(["--out", str(out), "--resume", "--epochs", "2"])
    assert (resumed.placement, resumed.lr, resumed.batch_size, resumed.train_subset, resumed.data_dir,
            resumed.epochs, resumed.resume) == ("proposed-2", 0.05, 8, 16, str(image_folder), 2, True)
    assert main(["--out", str(out), "--resume", "--epochs", "2", "--backend", "torch"]) == 0
    assert [row["epoch"] for row in json.loads((out / "log.json").read_text())] == [1, 2]
    with pytest.raises(ValueError, match="--resume: --lr differ from the checkpoint's settings"):
        main(["--out", str(out), "--resume", "--epochs", "3", "--lr", "0.2"])


def test_non_finite_loss_stops(image_folder, tmp_path, capsys):
    code = main(["--data-dir", str(image_folder), "--out", str(tmp_path), *QUICK, "--lr", "1e30"])
    assert code == EXIT_NON_FINITE
    assert "stopped: training loss became" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_and_piped(image_folder, tmp_path, capsys, monkeypatch):
    arguments = ["--data-dir", str(image_folder), *QUICK, "--epochs", "1"]
    main([*arguments, "--out", str(tmp_path / "piped")])
    piped = capsys.readouterr().err  # captured: not a terminal
    assert re.search(r"^epoch 1/1: +0%\|", piped, re.M) and "\r" not in piped  # plain lines for a log file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main([*arguments, "--out", str(tmp_path / "terminal")])
    assert "\repoch 1/1: " in capsys.readouterr().err  # redrawn in place


@pytest.mark.parametrize("flag, expected", [(None, True), ("--no-channels-last", False), ("--channels-last", True)])
def test_cpu_runs_default_to_channels_last_and_store_the_choice(image_folder, tmp_path, flag, expected):
    config = _config(image_folder, tmp_path / "run", "--max-steps", "1", *([flag] if flag else []))
    assert config.channels_last is (None if flag is None else expected)
    train(config)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["channels_last"] is expected


@pytest.mark.parametrize("flag, expected", [(None, True), ("--no-keep-freed-memory", False)])
def test_cpu_runs_keep_freed_memory_by_default_and_say_so(image_folder, tmp_path, flag, expected, monkeypatch):
    """On by default on CPU (fastnl.app.malloc), off when asked; config.json stores the choice and what was
    set."""
    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1) or "set for the test")
    config = _config(image_folder, tmp_path / "run", "--max-steps", "1", *([flag] if flag else []))
    train(config)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["keep_freed_memory"] is expected and len(calls) == int(expected)
    assert stored["run"]["malloc"] == ("set for the test" if expected else "unchanged")


BF16 = ["--amp", "bf16"]


@pytest.mark.parametrize("preset, amp", [("proposed-2", BF16), ("proposed-2", []), ("baseline", BF16)])
def test_config_json_says_which_bfloat16_path_the_kernels_took(image_folder, tmp_path, preset, amp):
    """Under --amp bf16 on the cpp kernels, bfloat16_path() (native or converted: their numerics); else None."""
    assert main(["--data-dir", str(image_folder), "--out", str(tmp_path / "run"), "--preset", preset, *QUICK,
                 "--epochs", "1", "--max-steps", "1", *amp]) == 0
    run = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    expected = None
    if run["nonlocal_backend"] == "cpp" and amp:
        from fastnl.backends import cpp

        expected = cpp.bfloat16_path()
    assert run["bfloat16_path"] == expected
    if preset != "baseline" and amp and backends.resolve(None, "cpu") == "cpp":
        assert expected is not None  # the case that matters was exercised


def test_a_reduced_schedule_scales_the_milestones_and_a_resume_keeps_them(image_folder, tmp_path):
    out = tmp_path / "run"
    base = ["--data-dir", str(image_folder), "--out", str(out), "--device", "cpu", "--batch-size", "8",
            "--train-subset", "16"]
    assert main([*base, "--epochs", "20", "--max-steps", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["milestones"] == [10, 15] and len(config["run"]["code_version"]) >= 7
    assert (out / "curves.png").stat().st_size > 0
    # resumed for longer: the milestones stay those the run started with
    assert main([*base, "--epochs", "40", "--max-steps", "2", "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["milestones"] == [10, 15]


def test_scaled_milestones_are_the_recipes_at_164_and_distinct_when_short():
    from fastnl.app.config import scaled_milestones

    assert scaled_milestones(164) == (81, 122) and scaled_milestones(20) == (10, 15)
    assert scaled_milestones(2) == (1,) and scaled_milestones(1) == (1,)
