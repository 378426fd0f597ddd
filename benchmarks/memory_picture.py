"""Peak memory and time of one nonlocal block, forward and backward, against the
feature-map size: fastnl (the default CPU backend), the materialised block
(backend="reference", what the peers' implementations compute) and SDPA
(torch.nn.functional.scaled_dot_product_attention as the block's aggregation).

    python benchmarks/memory_picture.py measure docs/memory/memory.json   # minutes, on a quiet machine
    python benchmarks/memory_picture.py plot docs/memory/memory.json docs/memory/memory.png

Cases: 2D maps, B = 8, C = 64, 16x16 to 128x128 (NonlocalBlock, dimension 2) and video
clips, B = 2, C = 256, T = 8 at 14x14, 28x28 and 56x56 (dimension 3); embedded gaussian,
C' = C / 2. Each (case, implementation) runs in a fresh process: a warm-up step on a
tiny map (2 positions a side), then one step whose resident-set peak above the memory before it is the
memory, then timed steps (median). The materialised block keeps N x N matrices: its
peak at the largest size it ran, in matrices of B N^2 4 bytes, predicts the next, and
where that is more than MEMORY_SHARE of this machine's memory it is not run: the
prediction is recorded, marked as computed.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peak_memory import peak_extra_bytes

import fastnl

FAMILIES = {
    "image 2D, B=8, C=64": [dict(batch=8, channels=64, spatial=(side, side)) for side in (16, 32, 64, 96, 128)],
    "video 3D, B=2, C=256, T=8": [dict(batch=2, channels=256, spatial=(8, side, side)) for side in (14, 28, 56)],
}
IMPLEMENTATIONS = ("fastnl", "materialised", "sdpa")
MEMORY_SHARE = 0.8
TIMED_STEPS = 3


def positions(case):
    return int(torch.tensor(case["spatial"]).prod())


def _block(case, implementation):
    torch.manual_seed(0)
    block = fastnl.NonlocalBlock(case["channels"], dimension=len(case["spatial"]),
                                 backend="reference" if implementation == "materialised" else None)
    torch.nn.init.ones_(block.branches[0].bn.weight)  # not the identity: every gradient flows
    if implementation == "sdpa":
        def attend(query, key, value, center=None, log_normalizer=None):
            out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), scale=1.0)
            return out.squeeze(1), None

        block._attend = attend
    return block


def _step(block, case):
    x = torch.randn(case["batch"], case["channels"], *case["spatial"], requires_grad=True)
    return lambda: block(x).backward(torch.ones(x.shape))


def _measure_one(case, implementation):
    """In this (fresh) process: {"peak_bytes", "seconds"} of one case. The warm-up (libraries,
    thread pools, a build) runs on a tiny map: memory it frees stays with the process and
    would hide as much of the measured step's peak."""
    tiny = {**case, "spatial": (2,) * len(case["spatial"])}
    _step(_block(tiny, implementation), tiny)()
    block = _block(case, implementation)
    peak = peak_extra_bytes(_step(block, case))
    step, times = _step(block, case), []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "seconds": statistics.median(times)}


def _matrix_bytes(case):
    return case["batch"] * positions(case) ** 2 * 4


def measure(out, families=FAMILIES, limit_bytes=None):
    """Every case of `families` into the JSON file `out`, written after each case."""
    limit = limit_bytes or MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results = {"memory_limit_bytes": limit, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "families": {}}
    for family, cases in families.items():
        rows, matrices = [], None
        for case in cases:
            row = {**case, "positions": positions(case)}
            for implementation in IMPLEMENTATIONS:
                if implementation == "materialised" and matrices and matrices * _matrix_bytes(case) > limit:
                    row[implementation] = {"peak_bytes": matrices * _matrix_bytes(case), "computed": True}
                    continue
                done = subprocess.run([sys.executable, __file__, "one", json.dumps(case), implementation],
                                      capture_output=True, text=True, check=True)
                row[implementation] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{family} {case['spatial']} {implementation}: {row[implementation]}", file=sys.stderr)
            measured = row["materialised"]
            if not measured.get("computed"):
                matrices = measured["peak_bytes"] / _matrix_bytes(case)
            rows.append(row)
            results["families"][family] = {"matrices_fitted": matrices, "cases": rows}
            Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def plot(results_path, figure_path):
    """Peak memory (log) and time per step against N, one column per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_path).read_text())
    families = results["families"]
    figure, axes = plt.subplots(2, len(families), figsize=(6.2 * len(families), 7.5), squeeze=False)
    for column, (family, data) in enumerate(families.items()):
        sizes = [row["positions"] for row in data["cases"]]
        for implementation, color in zip(IMPLEMENTATIONS, ("tab:green", "tab:red", "tab:blue")):
            entries = [row[implementation] for row in data["cases"]]
            memory = [entry["peak_bytes"] / 2**20 for entry in entries]
            axes[0][column].plot(sizes, memory, marker="o", color=color, label=implementation)
            computed = [(n, m) for n, m, entry in zip(sizes, memory, entries) if entry.get("computed")]
            if computed:
                axes[0][column].scatter(*zip(*computed), marker="x", s=80, color="black", zorder=3,
                                        label="computed, not run (over the memory limit)")
            timed = [(n, entry["seconds"]) for n, entry in zip(sizes, entries) if "seconds" in entry]
            if timed:
                axes[1][column].plot(*zip(*timed), marker="o", color=color, label=implementation)
        axes[0][column].axhline(results["memory_limit_bytes"] / 2**20, color="grey", linestyle=":",
                                label="memory limit")
        for row, label in ((0, "peak extra memory, MiB"), (1, "fwd+bwd seconds")):
            axes[row][column].set_xscale("log")
            axes[row][column].set_yscale("log")
            axes[row][column].set_xlabel("positions N")
            axes[row][column].set_ylabel(label)
            axes[row][column].grid(alpha=0.3, which="both")
            axes[row][column].legend(fontsize=8)
        axes[0][column].set_title(f"one NonlocalBlock, {family}", fontsize=10)
    figure.suptitle(f"CPU, {results['threads']} threads, torch {results['torch']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(figure_path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "one":
        case = json.loads(sys.argv[2])
        case["spatial"] = tuple(case["spatial"])
        print(json.dumps(_measure_one(case, sys.argv[3])))
    elif command == "measure":
        measure(sys.argv[2])
    elif command == "plot":
        plot(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
