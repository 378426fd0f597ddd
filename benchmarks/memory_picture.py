"""Peak memory and time of one nonlocal block, forward and backward, against the
feature-map size: fastnl (the device's default backend), the materialised block
(backend="reference", what the peers' implementations compute) and SDPA
(torch.nn.functional.scaled_dot_product_attention as the block's aggregation).

    python benchmarks/memory_picture.py measure docs/memory/memory.json   # minutes, on a quiet machine
    python benchmarks/memory_picture.py plot docs/memory/memory.json docs/memory/memory.png
    python benchmarks/memory_picture.py measure memory-gpu.json --device cuda   # the GPU check's stage
    python benchmarks/memory_picture.py measure memory.json --dry-run           # CPU, tiny maps: plumbing

Cases: 2D maps, B = 8, C = 64, 16x16 to 128x128 (NonlocalBlock, dimension 2) and video
clips, B = 2, C = 256, T = 8 at 14x14, 28x28 and 56x56 (dimension 3); embedded gaussian,
C' = C / 2. Each case first runs a warm-up step on a tiny map (2 positions a side:
libraries, thread pools, a build, Triton's compiles), then one step whose peak memory
above the memory before it is the memory, then timed steps (median). On the CPU each
(case, implementation) runs in a fresh process and the memory is the resident set's
peak, since memory a process frees stays with it; on CUDA all run in this process and
the memory is the caching allocator's peak of allocated bytes, exact per step. The
materialised block keeps N x N matrices: its peak at the largest size it ran, in
matrices of B N^2 4 bytes, predicts the next, and where that is more than MEMORY_SHARE
of the device's memory it is not run: the prediction is recorded, marked as computed.
"""
import argparse
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
DRY_FAMILIES = {"image 2D, B=1, C=8 (dry run)": [dict(batch=1, channels=8, spatial=(side, side)) for side in (8, 16)]}
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


def _step(block, case, device):
    x = torch.randn(case["batch"], case["channels"], *case["spatial"], device=device, requires_grad=True)
    return lambda: block(x).backward(torch.ones(x.shape, device=device))


def _cuda_peak_extra_bytes(function):
    """How far the allocated bytes' peak during `function` rose above those before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _seconds(function, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _measure_one(case, implementation, device="cpu"):
    """{"peak_bytes", "seconds"} of one case (on the CPU, in a fresh process). The warm-up
    runs on a tiny map: memory it frees stays with a CPU process and would hide as much
    of the measured step's peak."""
    tiny = {**case, "spatial": (2,) * len(case["spatial"])}
    _step(_block(tiny, implementation).to(device), tiny, device)()
    block = _block(case, implementation).to(device)
    peak = (_cuda_peak_extra_bytes if device == "cuda" else peak_extra_bytes)(_step(block, case, device))
    step = _step(block, case, device)
    seconds = statistics.median(_seconds(step, device) for _ in range(TIMED_STEPS))
    return {"peak_bytes": peak, "seconds": seconds}


def _measure_in_fresh_process(case, implementation):
    done = subprocess.run([sys.executable, __file__, "one", json.dumps(case), implementation],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matrix_bytes(case):
    return case["batch"] * positions(case) ** 2 * 4


def _memory_bytes(device):
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(out, families=FAMILIES, limit_bytes=None, device="cpu"):
    """Every case of `families` on `device` into the JSON file `out`, written after each case."""
    limit = limit_bytes or MEMORY_SHARE * _memory_bytes(device)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "memory_limit_bytes": limit, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "families": {}}
    for family, cases in families.items():
        rows, matrices = [], None
        for case in cases:
            row = {**case, "positions": positions(case)}
            for implementation in IMPLEMENTATIONS:
                if implementation == "materialised" and matrices and matrices * _matrix_bytes(case) > limit:
                    row[implementation] = {"peak_bytes": matrices * _matrix_bytes(case), "computed": True}
                    continue
                row[implementation] = (_measure_one(case, implementation, device) if device == "cuda"
                                       else _measure_in_fresh_process(case, implementation))
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
    device = results.get("device", "cpu")  # files from before the GPU stage: CPU
    where = f"CPU, {results['threads']} threads" if device == "cpu" else device
    figure.suptitle(f"{where}, torch {results['torch']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(figure_path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("one", help="one CPU case in this process (measure's fresh processes)")
    one.add_argument("case")
    one.add_argument("implementation", choices=IMPLEMENTATIONS)
    run = commands.add_parser("measure", help="every case into a JSON file")
    run.add_argument("out")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--dry-run", action="store_true", help="tiny maps on the CPU: the plumbing only")
    draw = commands.add_parser("plot", help="the figure from a JSON file")
    draw.add_argument("results")
    draw.add_argument("figure")
    args = parser.parse_args(argv)
    if args.command == "one":
        case = json.loads(args.case)
        case["spatial"] = tuple(case["spatial"])
        print(json.dumps(_measure_one(case, args.implementation)))
    elif args.command == "measure":
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("memory_picture: no CUDA device")
        measure(args.out, DRY_FAMILIES if args.dry_run else FAMILIES, device=args.device)
    else:
        plot(args.results, args.figure)


if __name__ == "__main__":
    main()
