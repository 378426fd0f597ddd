"""python -m fastnl.spectrum CHECKPOINT [--top 32] [--out DIR] [--compare OTHER [OTHER ...]]
                           [--data DIR [--dataset cifar10] [--images K]]

Writes DIR/spectrum.json and PNG figures (see docs/spectrum.md) and prints a summary.
"""
import argparse
import json
from pathlib import Path

import torch

from fastnl.app.checkpoint import load_model
from fastnl.app.data import load_dataset, normalize
from fastnl.app.spectrum.plot import save_affinity_figure, save_comparison_figure, save_weight_figure
from fastnl.app.spectrum.report import analyze, summary_lines

FIGURES = {
    "weights": "weight_spectrum.png",
    "comparison": "weight_spectrum_comparison.png",
}


def affinity_figure(index):
    """(key in spectrum.json's figures, file name) of the affinity figure of checkpoint `index` (from 1)."""
    suffix = "" if index == 1 else f"_{index}"
    return f"affinity{suffix}", f"affinity_spectrum{suffix}.png"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastnl.spectrum", description=(
        "Spectra of trained nonlocal networks: eigenvalues of the symmetrised W_z W_g of every "
        "block and, with --data, of the affinity P - I against the stability disc."))
    parser.add_argument("checkpoint", help="a checkpoint written by fastnl.train (or its weights and config alone)")
    parser.add_argument("--top", type=int, default=32, help="eigenvalues per block, by magnitude")
    parser.add_argument("--out", help="output directory (default: CHECKPOINT's directory/spectrum)")
    parser.add_argument("--compare", metavar="OTHER_CHECKPOINT", nargs="+", default=[],
                        help="more checkpoints, plotted beside the first with a shared y-axis")
    parser.add_argument("--data", metavar="DIR", help="data directory: also analyse the affinity")
    parser.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    parser.add_argument("--images", type=int, default=8, help="test images for the affinity")
    args = parser.parse_args(argv)
    if args.top < 1 or args.images < 1:
        parser.error("--top and --images must be positive")
    return args


def checkpoint_label(path):
    """"run/file" without the suffix: run directories name the experiment, files rarely do."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def model_label(path, config):
    """What the checkpoint holds, from its config ("original-4 seed 0", "original-4 seed 0 bf16");
    "run/file" without one."""
    placement = (config.get("model") or {}).get("placement")
    if placement is None:
        return checkpoint_label(path)
    parts = [placement, *([f"seed {config['seed']}"] if config.get("seed") is not None else []),
             *([config["amp"]] if config.get("amp") else [])]
    return " ".join(parts)


def distinguishing_paths(paths):
    """The shortest trailing parts of each path (suffix dropped, at least "run/file") that
    tell the paths apart: reproduce's runs all end in seed-S/model."""
    parts = [Path(path).with_suffix("").parts for path in paths]
    for length in range(2, max(map(len, parts), default=0) + 1):
        names = ["/".join(part[-length:]) for part in parts]
        if len(set(names)) == len(names):
            return names
    return ["/".join(part) for part in parts]


def unique_labels(entries):
    """Model labels, with the path that tells them apart added to those that checkpoints share."""
    labels = [model_label(entry["checkpoint"], entry["config"]) for entry in entries]
    shared = [index for index, label in enumerate(labels) if labels.count(label) > 1]
    paths = distinguishing_paths([entries[index]["checkpoint"] for index in shared])
    for index, path in zip(shared, paths):
        labels[index] = f"{labels[index]} ({path})"
    return labels


def evaluation_images(data_dir, dataset, count):
    """(images (count, 3, H, W) normalised as in training, their indices in the test split).

    Indices are evenly spaced over the split, so a split stored class by class still
    contributes every class; deterministic, so runs are comparable.
    """
    images, _ = load_dataset(dataset, data_dir, train=False)
    indices = torch.linspace(0, len(images) - 1, min(count, len(images))).round().long()
    return normalize(images[indices], dataset), indices.tolist()


def analyze_checkpoint(path, args):
    """The JSON entry and affinity spectra of one checkpoint."""
    model, config = load_model(path, map_location="cpu")
    entry = {"checkpoint": str(path), "config": config}
    images = None
    if args.data:
        dataset = args.dataset or config.get("dataset", "cifar10")
        images, indices = evaluation_images(args.data, dataset, args.images)
        entry["images"] = {"dataset": dataset, "split": "test", "indices": indices}
    report, spectra = analyze(model, args.top, images)
    entry.update(report)
    return entry, spectra


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "spectrum"
    out.mkdir(parents=True, exist_ok=True)
    analysed = [analyze_checkpoint(path, args) for path in [args.checkpoint, *args.compare]]
    entries, figures = [entry for entry, _ in analysed], {}
    for index, ((entry, spectra), label) in enumerate(zip(analysed, unique_labels(entries)), start=1):
        entry["label"] = label
        print("\n".join(summary_lines(label, entry)))
        if spectra:
            key, name = affinity_figure(index)
            figures[key] = name
            save_affinity_figure(spectra, f"{label}: eigenvalues of P - I", out / name)
    title = "top {} eigenvalues of sym. $W_z W_g$: {}"
    figures["weights"] = FIGURES["weights"]
    save_weight_figure(entries[0]["blocks"], title.format(args.top, entries[0]["label"]),
                       out / figures["weights"])
    if args.compare:
        figures["comparison"] = FIGURES["comparison"]
        save_comparison_figure([(entry["blocks"], title.format(args.top, entry["label"]))
                                for entry in entries], out / figures["comparison"])
    result = {"top": args.top, "checkpoints": entries, "figures": figures}
    (out / "spectrum.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'spectrum.json'} and {', '.join(sorted(figures.values()))}")


if __name__ == "__main__":
    main()
