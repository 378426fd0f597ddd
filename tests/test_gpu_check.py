"""scripts/gpu_check.sh in its CPU dry run: the stages that need no GPU run, write their
files and report in summary.txt, so the one call on a lent GPU machine does not fail on
plumbing (argument handling, data preparation, output files, the sweep's bookkeeping)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_dry_run_writes_every_cpu_stage(tmp_path, image_folder):
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--data", str(image_folder)], env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    for stage in ("environment", "tests", "sweep", "memory", "train"):
        assert any(line.startswith(stage) and " ok " in line for line in summary.splitlines()), summary
    for stage in ("install", "sanitizer"):
        assert f"{stage}" in summary and "skipped (dry run)" in summary
    assert "torch" in (out / "environment.txt").read_text()
    assert "tests collected" in (out / "gpu-tests.log").read_text()
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["rows"] and all("ms" in row for row in sweep["rows"])
    runs = [json.loads(line.split(": ", 1)[1]) for line in (out / "train.log").read_text().splitlines()
            if line.startswith(("baseline: ", "proposed-3: "))]
    assert [run["status"] for run in runs] == [0, 0] and all(run["images_per_s"] > 0 for run in runs)
    memory = json.loads((out / "memory-gpu.json").read_text())
    assert memory["device"] == "cpu" and all("seconds" in row["fastnl"] for family in memory["families"].values()
                                              for row in family["cases"])
    assert (out / "memory-gpu.png").stat().st_size > 0
    assert len(list(out.iterdir())) <= 10
