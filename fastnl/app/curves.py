"""Training curves, drawn with matplotlib's Agg backend from a run's per-epoch history.

One run: train loss and test error per epoch, the lr drops marked (curves.png in its
--out, redrawn after every epoch). Many runs: each run's test error per epoch, one
panel per group of runs, each over a zoom on the epochs after the first lr drop
(reproduce's table figure).
"""
from fastnl.app._extras import require

require("fastnl's training curves", "matplotlib")
import matplotlib  # noqa: E402  (after the check above)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _epochs(history):
    return [row["epoch"] for row in history]


def _errors(history):
    return [100 * (1 - row["test_acc"]) for row in history]


def _epoch_axis(axes):
    """Epochs are whole numbers: no ticks at 2.5."""
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _lr_drops(history):
    """The epochs whose successor trains at a lower lr."""
    return [before["epoch"] for before, after in zip(history, history[1:]) if after["lr"] < before["lr"]]


def _mark_lr_drops(axes, history):
    """Vertical lines after the epochs whose successor trains at a lower lr."""
    for epoch in _lr_drops(history):
        axes.axvline(epoch + 0.5, color="grey", linestyle=":", linewidth=1)


def plot_run(history, path, title):
    """curves.png of one run: train loss (left axis) and test error % (right axis)."""
    figure, loss_axes = plt.subplots(figsize=(6.4, 4.0))
    loss_axes.plot(_epochs(history), [row["train_loss"] for row in history], color="tab:blue", marker=".",
                   label="train loss")
    _epoch_axis(loss_axes)
    loss_axes.set_ylabel("train loss", color="tab:blue")
    error_axes = loss_axes.twinx()
    error_axes.plot(_epochs(history), _errors(history), color="tab:red", marker=".", label="test error %")
    error_axes.set_ylabel("test error %", color="tab:red")
    _mark_lr_drops(loss_axes, history)
    loss_axes.set_title(f"{title} (dotted: lr drops)", fontsize=10)
    loss_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _first_lr_drop(history):
    """The last epoch before the lr first drops, or None."""
    return next(iter(_lr_drops(history)), None)


def _after(history, epoch):
    """The rows of `history` after `epoch` (none if `epoch` is None)."""
    return [row for row in history if epoch is not None and row["epoch"] > epoch]


def plot_runs(panels, path, suptitle):
    """panels: {panel title: {run label: history}} -> one figure of test error % per epoch.

    Under each panel, the same runs from the first lr drop on, on their own y-scale: the
    full curves span tens of points, the rows differ by tenths at the end."""
    figure, axes_grid = plt.subplots(2, len(panels), figsize=(6.0 * len(panels), 7.6), squeeze=False,
                                     height_ratios=(3, 2))
    for column, (title, runs) in enumerate(panels.items()):
        axes, zoom = axes_grid[0][column], axes_grid[1][column]
        first = next(iter(runs.values()), [])
        start = _first_lr_drop(first)
        for label, history in runs.items():
            line, = axes.plot(_epochs(history), _errors(history), marker=".", linewidth=1.2, label=label)
            late = _after(history, start)
            zoom.plot(_epochs(late), _errors(late), marker=".", linewidth=1.2, color=line.get_color())
        _mark_lr_drops(axes, first)
        _mark_lr_drops(zoom, _after(first, start))
        axes.set_title(title, fontsize=10)
        zoom.set_title("from the first lr drop on" if start is not None else "(no lr drop)", fontsize=9)
        for each in (axes, zoom):
            _epoch_axis(each)
            each.set_ylabel("test error %")
            each.grid(alpha=0.3)
        if runs:
            axes.legend(fontsize=8)
    figure.suptitle(suptitle, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
