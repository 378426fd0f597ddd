"""Images per second of `python -m fastnl.train` through the real data path: proposed-3
against the baseline with the same flags, in one run (the training-speed bar on real
CIFAR: proposed-3 at >= 0.8x the baseline's images/s with --amp bf16 --channels-last).

    python benchmarks/real_data_speed.py DATA_DIR [--images 6400] [--pairs 3] [--out DIR]

DATA_DIR is what `python -m fastnl.train --data-dir` takes (e.g. the project's JPEG
CIFAR-10 copy, unpacked). Each (flags, preset) trains one epoch on a seeded subset of
`--images` training images in its own process, data loading, augmentation and the
optimizer step included; the images/s are those the run logs for its epoch. Each flag
set runs `--pairs` pairs, the preset that goes first alternating, and reports the
median images/s of each preset and the median (and range) of the pairs' ratios: on a
shared 2-core VM one pair's ratio ranged 0.71-0.88 between runs.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FLAG_SETS = {"bf16 channels-last": ["--amp", "bf16", "--channels-last"], "float32 channels-last": ["--channels-last"]}
PRESETS = ("baseline", "proposed-3")
BAR = 0.8


def images_per_s(data_dir, preset, flags, images, out, pair):
    run = Path(out) / f"{preset}-{'-'.join(flag.strip('-') for flag in flags)}-pair{pair}"
    subprocess.run([sys.executable, "-m", "fastnl.train", "--data-dir", str(data_dir), "--preset", preset, *flags,
                    "--epochs", "1", "--train-subset", str(images), "--out", str(run)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run / "log.json").read_text())[-1]["images_per_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--images", type=int, default=6400, help="training images per run (default 50 steps)")
    parser.add_argument("--pairs", type=int, default=3, help="baseline/proposed-3 pairs per flag set")
    parser.add_argument("--out", help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        for name, flags in FLAG_SETS.items():
            rates = {preset: [] for preset in PRESETS}
            for pair in range(args.pairs):
                for preset in PRESETS if pair % 2 == 0 else PRESETS[::-1]:
                    rates[preset].append(images_per_s(args.data_dir, preset, flags, args.images, out, pair))
            ratios = [proposed / baseline for baseline, proposed in zip(rates["baseline"], rates["proposed-3"])]
            bar = f" (bar >= {BAR})" if name.startswith("bf16") else ""
            print(f"{name}: baseline {statistics.median(rates['baseline']):.0f} img/s, proposed-3 "
                  f"{statistics.median(rates['proposed-3']):.0f} img/s (medians of {args.pairs}), proposed-3 / "
                  f"baseline {statistics.median(ratios):.2f} (median of {args.pairs} pairs, "
                  f"{min(ratios):.2f}-{max(ratios):.2f}){bar}", flush=True)


if __name__ == "__main__":
    main()
