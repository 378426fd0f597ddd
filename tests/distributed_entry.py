"""torchrun entry of tests/test_distributed.py: `fastnl.train.main` with two test hooks.

- Every path this rank opens for writing (or renames a file to) is recorded through a
  Python audit hook and listed in $FASTNL_TEST_WRITES/<rank>.txt at exit, so the test
  can check that only rank 0 wrote the run's files.
- $FASTNL_TEST_FAIL = "<rank>:raise" makes that rank raise in its first epoch;
  "<rank>:nan" feeds that rank NaN images, so only its loss is NaN.
"""
import atexit
import os
import sys
from pathlib import Path

import torch

RANK = int(os.environ["RANK"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
written = []


def _record(event, args):
    if event == "open":
        path, mode, flags = args
        if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
            written.append(os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path))
    elif event == "os.rename":
        written.append(os.fsdecode(args[1]))


def _save_record():
    Path(os.environ["FASTNL_TEST_WRITES"], f"{RANK}.txt").write_text("\n".join(written))


def _inject_failure(kind):
    import fastnl.app.engine
    import fastnl.app.loops

    if kind == "raise":
        def failing_epoch(*args, **kwargs):
            raise RuntimeError("injected failure")
        fastnl.app.engine.train_one_epoch = failing_epoch
    elif kind == "nan":
        normalize = fastnl.app.loops.normalize
        fastnl.app.loops.normalize = lambda images, name: torch.full_like(normalize(images, name), float("nan"))
    else:
        raise ValueError(f"FASTNL_TEST_FAIL kind {kind!r}")


if __name__ == "__main__":
    if "FASTNL_TEST_WRITES" in os.environ:
        atexit.register(_save_record)
        sys.addaudithook(_record)
    if "FASTNL_TEST_FAIL" in os.environ:
        rank, kind = os.environ["FASTNL_TEST_FAIL"].split(":")
        if int(rank) == RANK:
            _inject_failure(kind)
    from fastnl.app.train import main

    sys.exit(main(sys.argv[1:]))
