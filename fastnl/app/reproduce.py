"""`python -m fastnl.reproduce table1`: train Table 1 rows and compare with the paper.

    python -m fastnl.reproduce table1 --rows baseline,proposed-3 --seeds 0,1 \\
        --epochs 164 --data-dir DATA --out runs/table1 [any python -m fastnl.train option]

Each (row, seed) trains with `fastnl.app.engine.train` into OUT/ROW/seed-S (a finished run
is reused, an interrupted one resumed), then the report is written from the runs' own
records (config.json, log.json, final.json): OUT/table1.md lists the final-epoch test
error, mean ± sample std over seeds, beside the paper's number, under a header with
the schedule, precision, seeds, device and code version, and per row the wall time, the
median epoch time and what the paper's 164 epochs would take at that median; OUT/table1.png
draws every row's test error per epoch (same-place rows and different-place rows on
separate panels). `--report-only` rewrites both from the records without training;
`--export DIR` copies the finished runs' records (and `--export-weights ROWS`' final
models) to DIR and writes the report there from the copies (fastnl.app.results).
Options other than these go to `python -m fastnl.train` unchanged.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from fastnl.app.config import RECIPE_EPOCHS, RECIPE_MILESTONES
from fastnl.app.curves import plot_runs
from fastnl.app.engine import train
from fastnl.app.results import embed, export
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
    """Train one (row, seed) run into OUT/ROW/seed-S, resuming it, unless it has finished."""
    run_dir = out / row / f"seed-{seed}"
    final = run_dir / "final.json"
    args = train_parser().parse_args([*train_args, "--preset", row, "--seed", str(seed), "--out", str(run_dir)])
    args.resume = (run_dir / "checkpoint.pt").exists()
    config = config_from_args(args)
    if final.exists() and json.loads(final.read_text()).get("epoch") == config.epochs:
        return
    train(config)


def read_run(run_dir):
    """A finished run's records: {"config", "history", "final"} from its output files."""
    run_dir = Path(run_dir)
    if not (run_dir / "final.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no final.json)")
    return {name: json.loads((run_dir / f"{file}.json").read_text())
            for name, file in (("config", "config"), ("history", "log"), ("final", "final"))}


def _setting(config):
    """What every row of one table must share, in words."""
    precision = {None: "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[config.get("amp")]
    layout = ", channels-last" if config.get("channels_last") else ""
    milestones = ", ".join(str(m) for m in config.get("milestones") or [])
    # runs written before the code version was recorded say so
    return (f"{config['epochs']} epochs, batch {config['batch_size']}, lr {config['lr']} x {config['gamma']} "
            f"after epochs {milestones}; {precision}{layout}; on {config['run']['device']}; "
            f"code {config['run'].get('code_version', 'not recorded')}")


def markdown_table(runs):
    """runs: {row: [run records]} -> Markdown comparing error % with the paper, under a
    header saying how the runs were made (one line per distinct setting)."""
    settings = {}
    for row, records in runs.items():
        for record in records:
            settings.setdefault(_setting(record["config"]), []).append(row)
    seeds = sorted({record["config"]["seed"] for records in runs.values() for record in records})
    lines = ["Tao et al. Table 1 (PreResNet-20, CIFAR-10), reproduced with `python -m fastnl.reproduce table1`.", ""]
    if len(settings) == 1:
        lines.append(f"Every run: {next(iter(settings))}. Seeds: {', '.join(map(str, seeds))}. "
                     f"The paper trains {RECIPE_EPOCHS} epochs (lr drops after "
                     f"{' and '.join(map(str, RECIPE_MILESTONES))}).")
    else:
        lines.append("The runs differ in their settings, so rows may not be comparable:")
        lines += [f"- {', '.join(sorted(set(rows)))}: {setting}" for setting, rows in settings.items()]
    # the median epoch says what a row costs (and what the paper's schedule would cost on
    # the same machine); the wall time, the sum of the logged epochs, also holds whatever
    # slowed or paused an epoch (a shared machine, a stopped process), though not the time
    # between an interrupted run and its resume
    lines += ["", "| model | paper error % | ours error % (mean ± std) | seeds | per seed | epochs | wall time h "
              f"| median s/epoch | {RECIPE_EPOCHS} epochs h (est.) |", "|---|---|---|---|---|---|---|---|---|"]
    for row, records in runs.items():
        errors = [record["final"]["test_error"] for record in records]
        spread = f" ± {statistics.stdev(errors):.2f}" if len(errors) > 1 else ""
        epochs = ", ".join(str(record["final"]["epoch"]) for record in records)
        epoch_times = [entry["epoch_time_s"] for record in records for entry in record["history"]]
        median = statistics.median(epoch_times)
        lines.append(f"| {row} | {PAPER_TABLE1[row]:.2f} | {statistics.mean(errors):.2f}{spread} | "
                     f"{len(errors)} | {', '.join(f'{e:.2f}' for e in errors)} | {epochs} | "
                     f"{sum(epoch_times) / 3600:.2f} | {median:.0f} | {median * RECIPE_EPOCHS / 3600:.1f} |")
    return "\n".join(lines) + "\n"


def _panels(runs):
    """Same-place rows (and the baseline) in one panel, different-place rows in another."""
    same = {f"{row} seed {r['config']['seed']}": r["history"] for row, records in runs.items()
            if not row.endswith("-diff") for r in records}
    different = {f"{row} seed {r['config']['seed']}": r["history"] for row, records in runs.items()
                 if row.endswith("-diff") or row == "baseline" for r in records}
    panels = {"blocks in one place (stage 2)": same}
    if any(row.endswith("-diff") for row in runs):
        panels["blocks in different places (one per stage)"] = different
    return panels


def write_report(out, rows, seeds):
    """table1.md and table1.png in `out` from the runs' records; returns the table."""
    runs = {row: [read_run(Path(out) / row / f"seed-{seed}") for seed in seeds] for row in rows}
    table = markdown_table(runs)
    (Path(out) / "table1.md").write_text(table)
    plot_runs(_panels(runs), Path(out) / "table1.png", "Table 1 rows: test error per epoch (dotted: lr drops)")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnl.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=["table1"])
    p.add_argument("--rows", type=_names, default=list(PAPER_TABLE1), help="comma-separated presets")
    p.add_argument("--seeds", type=lambda text: [int(s) for s in _names(text)], default=[0])
    p.add_argument("--out", type=Path, default=Path("runs/table1"))
    p.add_argument("--report-only", action="store_true",
                   help="write table1.md and table1.png from the finished runs in --out, training nothing")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="copy the finished runs' records to DIR and write the report there, training nothing")
    p.add_argument("--export-weights", type=_names, default=[], metavar="ROWS",
                   help="with --export: rows whose final models (weights and config) are copied too")
    p.add_argument("--embed", type=Path, metavar="FILE",
                   help="with --export: also put the table between FILE's markers for DIR's table1.md")
    args, train_args = p.parse_known_args(argv)
    unknown = [row for row in args.rows if row not in PRESETS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(PRESETS)}")
    if (args.export_weights or args.embed) and not args.export:
        p.error("--export-weights and --embed go with --export")
    if args.export:
        export(args.out, args.export, args.rows, args.seeds, args.export_weights)
    elif not args.report_only:
        for row in args.rows:
            for seed in args.seeds:
                run_row(row, seed, args.out, train_args)
    table = write_report(args.export or args.out, args.rows, args.seeds)
    if args.embed:
        embed(args.embed, table, args.export.name)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
