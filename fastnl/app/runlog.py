"""Run records in the output directory: config.json, log.csv, log.json, final.json.

The per-epoch history lives in the checkpoint and both logs are rewritten from it
after every epoch, so a resumed run's logs are exactly those of an uninterrupted one.
"""
import csv
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s",
           "train_time_s", "images_per_s", "steps"]


def write_json(path, value):
    """Write JSON atomically (temp file in the same directory, then os.replace)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def write_logs(out, history):
    """history: list of per-epoch dicts with the COLUMNS keys."""
    out = Path(out)
    temporary = out / f".log.csv.tmp{os.getpid()}"
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(temporary, out / "log.csv")
    write_json(out / "log.json", history)


def code_version():
    """The fastnl code that runs: its git commit ("-dirty" with uncommitted changes to
    tracked files) when it runs from a checkout, else the installed version."""
    root = Path(__file__).resolve().parents[2]  # above fastnl/app/runlog.py

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root:
            raise FileNotFoundError("fastnl is not the checkout's own package")
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "HEAD").strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        try:
            return f"fastnl {importlib.metadata.version('fastnl')}"
        except importlib.metadata.PackageNotFoundError:  # a copied tree, neither a checkout nor installed
            return "unknown"


def epoch_line(row):
    """One human-readable summary line per epoch."""
    return (f"epoch {row['epoch']:3d}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}  "
            f"{row['epoch_time_s']:.1f} s  {row['images_per_s']:.0f} img/s")
