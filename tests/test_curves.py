"""The training-curve figures: one run's curves.png and reproduce's many-run figure."""
from fastnl.app.curves import _first_lr_drop, plot_run, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(lrs, start_error=0.5):
    return [{"epoch": epoch, "lr": lr, "train_loss": 1.0 / epoch, "test_acc": 1 - start_error / epoch}
            for epoch, lr in enumerate(lrs, start=1)]


def test_the_first_lr_drop_is_the_epoch_before_the_lr_falls():
    assert _first_lr_drop(_history([0.1, 0.1, 0.01, 0.01, 0.001])) == 2
    assert _first_lr_drop(_history([0.1, 0.1])) is None
    assert _first_lr_drop([]) is None


def test_figures_are_written_with_and_without_lr_drops(tmp_path):
    dropped, flat = _history([0.1, 0.1, 0.01, 0.001]), _history([0.1])
    plot_run(dropped, tmp_path / "curves.png", "a run")
    plot_runs({"one place": {"a": dropped, "b": _history([0.1, 0.1, 0.01, 0.001], 0.6)}, "no drop": {"c": flat},
               "empty": {}}, tmp_path / "table.png", "rows")
    for name in ("curves.png", "table.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
