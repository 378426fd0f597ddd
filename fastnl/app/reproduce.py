"""`python -m fastnl.reproduce table1`: train Table 1 rows and compare with the paper.

    python -m fastnl.reproduce table1 --rows baseline,proposed-3 --seeds 0,1 \\
        --epochs 164 --data-dir DATA --out runs/table1 [any python -m fastnl.train option]

Each (row, seed) trains with `fastnl.app.engine.train` into OUT/ROW/seed-S (a finished run
is reused, an interrupted one resumed), then OUT/table1.md lists the final-epoch test
error, mean ± sample std over seeds, beside the paper's number. Options other than
--rows, --seeds and --out go to `python -m fastnl.train` unchanged.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from fastnl.app.engine import train
from fastnl.app.train import config_from_args
from fastnl.app.train import parser as train_parser
from fastnl.models import PRESETS

# Tao et al. (NeurIPS 2018), Table 1: PreResNet-20 on CIFAR-10, validation error %
PAPER_TABLE1 = {
    "baseline": 8.19, "original-2": 7.83, "original-3": 8.28, "original-4": 15.02,
    "proposed-2": 7.74, "proposed-3": 7.62, "proposed-4": 7.37, "proposed-5": 7.29, "proposed-6": 7.55,
    "original-3-diff": 8.07, "proposed-3-diff": 7.33,
}


def _names(text):
    return [part.strip() for part in text.split(",") if part.strip()]


def run_row(row, seed, out, train_args):
    """Final record of one (row, seed) run, training or resuming it when not finished."""
    run_dir = out / row / f"seed-{seed}"
    final = run_dir / "final.json"
    args = train_parser().parse_args([*train_args, "--preset", row, "--seed", str(seed), "--out", str(run_dir)])
    args.resume = (run_dir / "checkpoint.pt").exists()
    config = config_from_args(args)
    if final.exists():
        record = json.loads(final.read_text())
        if record.get("epoch") == config.epochs:
            return record
    return train(config)


def markdown_table(results):
    """results: {row: [final records]} -> Markdown comparing error % with the paper."""
    lines = ["| model | paper error % | ours error % (mean ± std) | seeds | per seed |",
             "|---|---|---|---|---|"]
    for row, records in results.items():
        errors = [record["test_error"] for record in records]
        spread = f" ± {statistics.stdev(errors):.2f}" if len(errors) > 1 else ""
        epochs = ", ".join(str(record["epoch"]) for record in records)
        lines.append(f"| {row} | {PAPER_TABLE1[row]:.2f} | {statistics.mean(errors):.2f}{spread} | "
                     f"{len(errors)} | {', '.join(f'{e:.2f}' for e in errors)} (epochs {epochs}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnl.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=["table1"])
    p.add_argument("--rows", type=_names, default=list(PAPER_TABLE1), help="comma-separated presets")
    p.add_argument("--seeds", type=lambda text: [int(s) for s in _names(text)], default=[0])
    p.add_argument("--out", type=Path, default=Path("runs/table1"))
    args, train_args = p.parse_known_args(argv)
    unknown = [row for row in args.rows if row not in PRESETS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(PRESETS)}")
    results = {row: [run_row(row, seed, args.out, train_args) for seed in args.seeds] for row in args.rows}
    table = markdown_table(results)
    (args.out / "table1.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
