"""Finished runs into the repository: the records a table is computed from, and weights.

`python -m fastnl.reproduce table1 --export DIR` copies each finished run's records
(config.json, log.json, log.csv, final.json, curves.png) from OUT/ROW/seed-S to
DIR/ROW/seed-S, and for the rows named by `--export-weights` its final model as
model.pt: the weights and the run's config, no optimizer state, which is all
`python -m fastnl.spectrum` needs. Paths in the configs become portable: a relative
path stays, an absolute one keeps only its last component, and `out` names the run's
folder under DIR. A run OUT does not hold keeps its earlier copy in DIR, so a table's
rows can be exported as they finish, across sessions. The table and its figure are
then written in DIR from the copies, so what the repository shows is what reproduce
computes from the committed logs; with `--embed FILE` the table also replaces the
block between DIR's markers in FILE (docs/results.md; named by DIR's last component, so
one page holds several tables), which tests/test_results.py checks against the logs too.
"""
import json
import shutil
from pathlib import Path

import torch

from fastnl.app.checkpoint import CHECKPOINT, load_checkpoint

RECORDS = ("config.json", "log.json", "log.csv", "final.json", "curves.png")
WEIGHTS = "model.pt"
PATH_FIELDS = ("data_dir", "cache_dir")


def markers(name):
    """The lines around the embedded copy of export folder `name`'s table1.md."""
    return (f"<!-- {name}/table1.md, written by python -m fastnl.reproduce table1 --export: do not edit -->",
            f"<!-- end of {name}/table1.md -->")


def portable(config, run_name):
    """A run's config dict with no machine paths (a copy)."""
    config = json.loads(json.dumps(config))
    for field in PATH_FIELDS:
        value = config.get(field)
        if value is not None and Path(value).is_absolute():
            config[field] = Path(value).name
    config["out"] = run_name
    return config


def _missing(folder, names):
    """The names among `names` that `folder` does not hold."""
    return [name for name in names if not (Path(folder) / name).exists()]


def export_run(run_dir, dest, run_name, weights=False):
    """Copy one finished run's records (and with `weights` its model.pt) into `dest`."""
    run_dir, dest = Path(run_dir), Path(dest)
    missing = _missing(run_dir, RECORDS)
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished run: no {', '.join(missing)}")
    config, final = (json.loads((run_dir / name).read_text()) for name in ("config.json", "final.json"))
    if final.get("epoch") != config["epochs"]:
        raise ValueError(f"{run_dir} is not a finished run: it trained {final.get('epoch')} of {config['epochs']} "
                         f"epochs")
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        if name == "config.json":
            (dest / name).write_text(json.dumps(portable(config, run_name), indent=2) + "\n")
        else:
            shutil.copyfile(run_dir / name, dest / name)
    if weights:
        state = load_checkpoint(run_dir / CHECKPOINT)
        torch.save({"model": state["model"], "config": portable(state["config"], run_name)}, dest / WEIGHTS)


def check_exported(dest, weights=False):
    """FileNotFoundError unless `dest` holds a whole exported run (and with `weights` its model.pt)."""
    missing = _missing(dest, RECORDS + ((WEIGHTS,) if weights else ()))
    if missing:
        raise FileNotFoundError(f"{dest} holds no exported run: no {', '.join(missing)}")


def export(out, dest, rows, seeds, weight_rows=()):
    """Every (row, seed) run of `out` into `dest`; model.pt for the rows in `weight_rows`.

    A run that `out` does not hold keeps the copy an earlier export left in `dest` (rows
    trained in another session or on another machine), so a table can be exported a few
    rows at a time; a run in neither place is an error."""
    unknown = sorted(set(weight_rows) - set(rows))
    if unknown:
        raise ValueError(f"--export-weights names rows that are not exported: {', '.join(unknown)}")
    for row in rows:
        for seed in seeds:
            name = f"{row}/seed-{seed}"
            if (Path(out) / name).exists():
                export_run(Path(out) / name, Path(dest) / name, name, weights=row in weight_rows)
            else:
                check_exported(Path(dest) / name, weights=row in weight_rows)


def embedded_table(text, name):
    """The table between export folder `name`'s markers in `text`; ValueError if they are missing."""
    begin, end = markers(name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no block between {begin!r} and {end!r}")
    return text[start + len(begin):stop].strip("\n") + "\n"


def embed(path, table, name):
    """Put `table` between export folder `name`'s markers in the file at `path`."""
    text = Path(path).read_text()
    embedded_table(text, name)  # both markers are there
    begin, end = markers(name)
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    Path(path).write_text(f"{head}{begin}\n{table}{end}{tail}")
