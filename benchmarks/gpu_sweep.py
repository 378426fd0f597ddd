"""GPU sweep of nonlocal_diffuse (softmax): fastnl's backends against SDPA, pinned to
each of its backends that takes the dtype, and the materialised reference.

    python benchmarks/gpu_sweep.py --out sweep.json [--time-limit 90]
    python benchmarks/gpu_sweep.py --dry-run --out sweep.json     (CPU, tiny sizes)

Positions N = 1024, 4096, 16384 and two video maps (T = 8 at 14x14 and 28x28), widths
D/E of this field (8/16, 16/32, 32/64, 64/64) and 128/128, float32 and bfloat16,
forward and forward+backward. Each row: median ms (triton.testing.do_bench), FLOP/s and
exp/s of the affinity work (2 B N^2 (D + E) flops and B N^2 exps per pass: one pass
forward; the backward's products count 2.5 passes and its exps 2), peak extra memory,
and for fastnl the max error of a subset of output rows against float64. Cases run in
order until the time limit (sizes outermost); the rest are listed as not run. The
reference is skipped where its N x N matrices would exceed --reference-limit GiB. On
the CPU (--dry-run) only the timing plumbing is exercised: tiny sizes, the CPU
backends, time.perf_counter.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import fastnl
from fastnl import backends

# (name, batch, positions)
SIZES = [("N1024", 16, 1024), ("N4096", 4, 4096), ("N16384", 1, 16384),
         ("video-8x14x14", 4, 8 * 14 * 14), ("video-8x28x28", 2, 8 * 28 * 28)]
WIDTHS = [(8, 16), (16, 32), (32, 64), (64, 64), (128, 128)]
DRY_SIZES = [("N64", 2, 64), ("N100", 1, 100)]
DRY_WIDTHS = [(8, 16)]
# SDPA's backends and the dtypes each takes (flash and cuDNN have no float32)
SDPA_BACKENDS = {
    "math": (torch.float32, torch.bfloat16),
    "efficient": (torch.float32, torch.bfloat16),
    "flash": (torch.bfloat16,),
    "cudnn": (torch.bfloat16,),
}
CHECKED_ROWS = 64  # output rows compared with float64 per case


def sdpa_diffuse(backend):
    """SDPA with q/k zero-padded to E (flash needs equal widths; zeros leave q.k unchanged),
    minus the value, on one pinned SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(query, key, value):
        pad = value.shape[-1] - query.shape[-1]
        query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
        with sdpa_kernel(pinned):
            out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), scale=1.0)
        return out.squeeze(1) - value

    return run


def fastnl_diffuse(backend):
    return lambda query, key, value: fastnl.nonlocal_diffuse(query, key, value, value, backend=backend)


def implementations(device, dtype):
    """name -> function for this device and dtype."""
    found = {name: fastnl_diffuse(name) for name in backends.names()
             if backends.unavailable_reason(name, device) is None and not (name == "triton" and device == "cpu")}
    found["reference"] = fastnl_diffuse("reference")
    if device == "cuda":
        found.update({f"sdpa-{name}": sdpa_diffuse(name) for name, dtypes in SDPA_BACKENDS.items()
                      if dtype in dtypes})
    return found


def step(function, inputs, backward):
    out = function(*inputs)
    if backward:
        out.backward(torch.ones_like(out))
    return out


def median_ms(function, inputs, backward, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(lambda: step(function, inputs, backward), warmup=5, rep=20,
                                       return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step(function, inputs, backward)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def peak_extra_bytes(function, inputs, backward, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(function, inputs, backward)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def row_error(function, inputs):
    """Max |out - truth| / max |truth| over the first CHECKED_ROWS rows, truth in float64."""
    with torch.no_grad():
        out = function(*inputs)[:, :CHECKED_ROWS].double()
        query, key, value = (t.detach().double() for t in inputs)
        probs = torch.softmax(query[:, :CHECKED_ROWS] @ key.transpose(1, 2), dim=-1)
        truth = probs @ value - value[:, :CHECKED_ROWS]
    return ((out - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def cases(dry_run):
    """Sizes outermost, so a time limit cuts the largest maps, never a dtype or a peer."""
    sizes, widths = (DRY_SIZES, DRY_WIDTHS) if dry_run else (SIZES, WIDTHS)
    for name, batch, positions in sizes:
        for width_qk, width_v in widths:
            for dtype in (torch.float32, torch.bfloat16):
                for backward in (False, True):
                    yield dtype, name, batch, positions, width_qk, width_v, backward


def write_report(path, device, start, rows, not_run):
    """The JSON so far: written after every case, so a stage cut off by its cap keeps them."""
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "seconds": time.perf_counter() - start, "rows": rows,
              "not_run": not_run}
    with open(path, "w") as out:
        json.dump(report, out, indent=1)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds; later cases are listed as not run")
    parser.add_argument("--reference-limit", type=float, default=40.0,
                        help="GiB of N x N matrices the reference may hold")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the plumbing only")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_sweep: no CUDA device (use --dry-run on a CPU)")
    start, rows, not_run = time.perf_counter(), [], []
    for dtype, name, batch, positions, width_qk, width_v, backward in cases(args.dry_run):
        case = dict(size=name, batch=batch, positions=positions, width=width_qk, value_width=width_v,
                    dtype=str(dtype).removeprefix("torch."), direction="forward+backward" if backward else "forward")
        if time.perf_counter() - start > args.time_limit:
            not_run.append(case)
            continue
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randn(batch, positions, width, generator=generator).to(device, dtype).requires_grad_(backward)
                  for width in (width_qk, width_qk, width_v)]
        pairs = batch * positions**2
        flops = 2 * pairs * (width_qk + width_v) * (3.5 if backward else 1)
        exps = pairs * (3 if backward else 1)  # the backward's two kernels recompute p each
        for implementation, function in implementations(device, dtype).items():
            matrix_gib = 3 * pairs * 4 / 2**30
            if implementation == "reference" and matrix_gib > args.reference_limit:
                rows.append({**case, "implementation": implementation,
                             "skipped": f"its N x N matrices need about {matrix_gib:.0f} GiB"})
                continue
            try:
                with torch.set_grad_enabled(backward):
                    step(function, inputs, backward)  # compile / autotune outside the timing
                    milliseconds = median_ms(function, inputs, backward, device)
                    peak = peak_extra_bytes(function, inputs, backward, device)
                error = row_error(function, inputs) if not implementation.startswith("sdpa") else None
            except Exception as failure:  # a peer that refuses a shape is a result, not a crash
                rows.append({**case, "implementation": implementation, "failed": f"{type(failure).__name__}: "
                                                                                 f"{str(failure)[:200]}"})
                continue
            rows.append({**case, "implementation": implementation, "ms": milliseconds,
                         "tflops": flops / milliseconds / 1e9, "gexp_per_s": exps / milliseconds / 1e6,
                         "peak_mib": None if peak is None else peak / 2**20, "max_rel_error": error})
            print(f"{name} D{width_qk} E{width_v} {case['dtype']} {case['direction']} {implementation}: "
                  f"{milliseconds:.3f} ms", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        write_report(args.out, device, start, rows, not_run)
    report = write_report(args.out, device, start, rows, not_run)
    timed = [row for row in rows if "ms" in row]
    print(f"gpu_sweep: {len(timed)} timings, {len(rows) - len(timed)} skipped or failed, "
          f"{len(not_run)} cases not run (time limit) in {report['seconds']:.0f} s -> {args.out}")
    return 0 if timed and all(math.isfinite(row["ms"]) for row in timed) else 1


if __name__ == "__main__":
    sys.exit(main())
