"""Images per second of `python -m fastnl.train` through the real data path: proposed-3
against the baseline with the same flags, in one run (the training-speed bar on real
CIFAR: proposed-3 at >= 0.8x the baseline's images/s with --amp bf16 --channels-last).

    python benchmarks/real_data_speed.py DATA_DIR [--images 6400] [--out DIR]

DATA_DIR is what `python -m fastnl.train --data-dir` takes (e.g. the project's JPEG
CIFAR-10 copy, unpacked). Each (flags, preset) trains one epoch on a seeded subset of
`--images` training images in its own process, data loading, augmentation and the
optimizer step included; the images/s are those the run logs for its epoch.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FLAG_SETS = {"bf16 channels-last": ["--amp", "bf16", "--channels-last"], "float32 channels-last": ["--channels-last"]}
PRESETS = ("baseline", "proposed-3")
BAR = 0.8


def images_per_s(data_dir, preset, flags, images, out):
    run = Path(out) / f"{preset}-{'-'.join(flag.strip('-') for flag in flags)}"
    subprocess.run([sys.executable, "-m", "fastnl.train", "--data-dir", str(data_dir), "--preset", preset, *flags,
                    "--epochs", "1", "--train-subset", str(images), "--out", str(run)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run / "log.json").read_text())[-1]["images_per_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--images", type=int, default=6400, help="training images per run (default 50 steps)")
    parser.add_argument("--out", help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        for name, flags in FLAG_SETS.items():
            rates = {preset: images_per_s(args.data_dir, preset, flags, args.images, out) for preset in PRESETS}
            ratio = rates["proposed-3"] / rates["baseline"]
            bar = f" (bar >= {BAR})" if name.startswith("bf16") else ""
            print(f"{name}: baseline {rates['baseline']:.0f} img/s, proposed-3 {rates['proposed-3']:.0f} img/s, "
                  f"proposed-3 / baseline {ratio:.2f}{bar}")


if __name__ == "__main__":
    main()
