"""python -m fastnl.reproduce table1 on tiny data: runs per seed, reuse, the Markdown table."""
from fastnl.app.reproduce import PAPER_TABLE1, main
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
    assert "code not recorded" in table and "| baseline | 8.19 | 8.00 |" in table and "| 1.00 |" in table
