"""Figures of the spectrum analysis, drawn with matplotlib's Agg backend (no display).

Weight spectra follow the paper's figure: one line per block, eigenvalue index on x,
eigenvalue on y, zero marked. Affinity spectra are drawn in the complex plane against
the stability disc |lambda + 1| <= 1.
"""
import math

from fastnl.app._extras import require

require("fastnl's spectrum figures", "matplotlib")
import matplotlib  # noqa: E402  (after the check above)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def draw_weight_spectrum(axes, records, title):
    """One series per block record (from `weight_spectra`) on `axes`."""
    for record, color in zip(records, _colors(len(records))):
        values = record["eigenvalues"]
        axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, linewidth=1.2,
                  color=color, label=record["name"])
    axes.axhline(0.0, color="black", linestyle="--", linewidth=0.8)
    axes.set_xlabel("eigenvalue index (top by magnitude, sorted)")
    axes.set_ylabel("eigenvalue of $(W + W^T)/2$,  $W = W_z W_g$")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if records:
        axes.legend(fontsize=7, loc="best")
    else:
        axes.text(0.5, 0.5, "no nonlocal blocks", transform=axes.transAxes, ha="center")


def _colors(count):
    """Ten distinct colours; beyond ten a sequential map, so blocks in order stay in order."""
    if count <= 10:
        return [plt.get_cmap("tab10")(index) for index in range(count)]
    return [plt.get_cmap("viridis")(index / (count - 1)) for index in range(count)]


def save_weight_figure(records, title, path):
    """The weight spectra of one model as a PNG at `path`."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    draw_weight_spectrum(axes, records, title)
    _save(figure, path)


def save_comparison_figure(panels, path):
    """Two (or more) models side by side, one panel each, sharing the y-axis.

    panels: [(records, title)]; a shared axis makes the magnitudes comparable at a glance.
    """
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True,
                                squeeze=False)
    for panel_axes, (records, title) in zip(axes[0], panels):
        draw_weight_spectrum(panel_axes, records, title)
    for panel_axes in axes[0][1:]:
        panel_axes.set_ylabel("")
    _save(figure, path)


def save_affinity_figure(results, title, path):
    """Eigenvalues of P - I per module in the complex plane, with the disc |lambda + 1| <= 1.

    results: [(record, eigenvalues (B, N) complex)] from `affinity_spectra`, modules
    without a spectrum already left out. All images of a module share one panel.
    """
    columns = min(len(results), 3)
    rows = math.ceil(len(results) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False)
    for panel_axes, (record, eigenvalues) in zip(axes.flat, results):
        circle = plt.Circle((-1.0, 0.0), 1.0, fill=False, color="black", linestyle="--",
                            linewidth=1.0, label=r"$|\lambda + 1| = 1$")
        panel_axes.add_patch(circle)
        values = eigenvalues.flatten()
        panel_axes.scatter(values.real, values.imag, s=6, alpha=0.4, color="tab:blue",
                           label=f"eigenvalues ({record['images']} images)")
        panel_axes.axhline(0.0, color="grey", linewidth=0.5)
        panel_axes.axvline(0.0, color="grey", linewidth=0.5)
        panel_axes.set_xlim(-2.2, 0.4)
        panel_axes.set_ylim(-1.3, 1.3)
        panel_axes.set_aspect("equal")
        panel_axes.set_xlabel(r"Re $\lambda$")
        panel_axes.set_ylabel(r"Im $\lambda$")
        panel_axes.set_title(f"{record['module']} ({record['mode']}, N={record['positions']})\n"
                             f"outside disc: {record['disc_distance']:.1e}", fontsize=9)
        panel_axes.legend(fontsize=7, loc="upper left")
    for unused in axes.flat[len(results):]:
        unused.set_visible(False)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
