"""python -m fastnl.reproduce table1 on tiny data: runs per seed, reuse, the Markdown table, the export."""
import json
import shutil

import pytest
import torch

from fastnl.app.checkpoint import load_model
from fastnl.app.reproduce import PAPER_TABLE1, main
from fastnl.app.results import embedded_table, markers
from fastnl.app.spectrum.__main__ import main as spectrum
from fastnl.models import PRESETS


def test_table1(image_folder, tmp_path, capsys):
    argv = ["table1", "--rows", "baseline", "--seeds", "0,1", "--out", str(tmp_path / "t"),
            "--data-dir", str(image_folder), "--device", "cpu", "--epochs", "1", "--batch-size", "8",
            "--train-subset", "8"]
    assert main(argv) == 0
    table = (tmp_path / "t" / "table1.md").read_text()
    assert table in capsys.readouterr().out
    assert "| baseline | 8.19 |" in table and " ± " in table and "| 2 |" in table
    assert sorted(p.name for p in (tmp_path / "t" / "baseline").iterdir()) == ["seed-0", "seed-1"]
    mtime = (tmp_path / "t" / "baseline" / "seed-0" / "checkpoint.pt").stat().st_mtime_ns
    assert main(argv) == 0  # finished runs are reused, not retrained
    assert (tmp_path / "t" / "baseline" / "seed-0" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_every_preset_has_a_paper_number():
    assert set(PAPER_TABLE1) == set(PRESETS)


def test_the_report_is_the_runs_records_and_states_the_schedule(image_folder, tmp_path):
    out = tmp_path / "t"
    argv = ["table1", "--rows", "baseline,proposed-2", "--seeds", "0", "--out", str(out), "--data-dir",
            str(image_folder), "--device", "cpu", "--epochs", "3", "--batch-size", "8", "--train-subset", "8"]
    assert main(argv) == 0
    table = (out / "table1.md").read_text()
    assert "Every run: 3 epochs, batch 8, lr 0.1 x 0.1 after epochs 1, 2; float32, channels-last; on cpu" in table
    for row in ("baseline", "proposed-2"):
        assert (out / row / "seed-0" / "curves.png").stat().st_size > 0
    (out / "table1.md").unlink()
    (out / "table1.png").unlink()
    assert main(["table1", "--rows", "baseline,proposed-2", "--seeds", "0", "--out", str(out), "--report-only"]) == 0
    assert (out / "table1.md").read_text() == table and (out / "table1.png").stat().st_size > 0


def test_runs_recorded_before_the_code_version_still_make_a_table():
    from fastnl.app.reproduce import markdown_table

    config = {"epochs": 164, "batch_size": 128, "lr": 0.1, "gamma": 0.1, "amp": None, "channels_last": False,
              "milestones": [81, 122], "seed": 0, "run": {"device": "cpu"}}
    record = {"config": config, "history": [{"epoch_time_s": 3600.0}], "final": {"test_error": 8.0, "epoch": 164}}
    table = markdown_table({"baseline": [record]})
    assert "code not recorded" in table and "| baseline | 8.19 | 8.00 |" in table and "| 1.00 | 3600 | 164.0 |" in table


def test_export_copies_the_records_and_weights_and_the_table_follows_from_them(image_folder, tmp_path, capsys):
    out, dest = tmp_path / "runs", tmp_path / "docs" / "table1"
    rows = ["table1", "--rows", "baseline,proposed-2", "--seeds", "0", "--out", str(out)]
    assert main([*rows, "--data-dir", str(image_folder), "--device", "cpu", "--epochs", "1", "--batch-size", "8",
                 "--train-subset", "8"]) == 0
    trained_table = (out / "table1.md").read_text()
    page = tmp_path / "results.md"
    other = "\n".join(markers("table1-bf16")) + "\n"  # another table's block stays as it is
    page.write_text(f"# Results\n\n{markers('table1')[0]}\nold table\n{markers('table1')[1]}\n\n{other}Reading.\n")
    assert main([*rows, "--export", str(dest), "--export-weights", "proposed-2", "--embed", str(page)]) == 0

    assert (dest / "table1.md").read_text() == trained_table  # computed again, from the copies
    assert embedded_table(page.read_text(), "table1") == trained_table
    assert page.read_text().endswith(f"\n\n{other}Reading.\n") and embedded_table(other, "table1-bf16") == "\n"
    for row in ("baseline", "proposed-2"):
        run = dest / row / "seed-0"
        assert sorted(p.name for p in run.iterdir()) == sorted(
            ["config.json", "log.json", "log.csv", "final.json", "curves.png"] + (["model.pt"] if row != "baseline"
                                                                                   else []))
        config = json.loads((run / "config.json").read_text())
        assert (config["out"], config["data_dir"]) == (f"{row}/seed-0", image_folder.name)  # no machine paths
        assert str(tmp_path) not in (run / "config.json").read_text()
    weights = torch.load(dest / "proposed-2" / "seed-0" / "model.pt", weights_only=True)
    assert sorted(weights) == ["config", "model"] and str(tmp_path) not in json.dumps(weights["config"])
    model, _ = load_model(dest / "proposed-2" / "seed-0" / "model.pt")
    trained, _ = load_model(out / "proposed-2" / "seed-0" / "checkpoint.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), trained(x))
    spectrum([str(dest / "proposed-2" / "seed-0" / "model.pt"), "--top", "4", "--out", str(tmp_path / "spectrum")])
    assert (tmp_path / "spectrum" / "weight_spectrum.png").exists()

    with pytest.raises(ValueError, match="not exported: original-2"):
        main([*rows, "--export", str(dest), "--export-weights", "original-2"])
    (out / "baseline" / "seed-0" / "final.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished run: no final.json"):
        main([*rows, "--export", str(dest)])
    capsys.readouterr()


def test_export_keeps_the_runs_exported_earlier_that_out_no_longer_holds(image_folder, tmp_path, capsys):
    out, dest = tmp_path / "runs", tmp_path / "table1"
    rows = ["table1", "--rows", "baseline,proposed-2", "--seeds", "0", "--out", str(out)]
    assert main([*rows, "--data-dir", str(image_folder), "--device", "cpu", "--epochs", "1", "--batch-size", "8",
                 "--train-subset", "8"]) == 0
    assert main([*rows, "--export", str(dest), "--export-weights", "proposed-2"]) == 0
    table = (dest / "table1.md").read_text()
    shutil.rmtree(out / "baseline")  # trained in an earlier session, exported then
    assert main([*rows, "--export", str(dest), "--export-weights", "proposed-2"]) == 0
    assert (dest / "table1.md").read_text() == table
    shutil.rmtree(out / "proposed-2")
    (dest / "proposed-2" / "seed-0" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="proposed-2/seed-0 holds no exported run: no model.pt"):
        main([*rows, "--export", str(dest), "--export-weights", "proposed-2"])
    with pytest.raises(FileNotFoundError, match="original-2/seed-0 holds no exported run: no config.json"):
        main(["table1", "--rows", "original-2", "--seeds", "0", "--out", str(out), "--export", str(dest)])
    capsys.readouterr()
