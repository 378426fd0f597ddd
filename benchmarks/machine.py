"""This machine's rates, measured in the run whose bars they explain, and a kernel's floor
at them: the least time the machine allows it, its products at torch.mm's FLOP rate (in
the precision they run in) and then its exps at the kernels' own exp rate
(fastnl.backends.cpp.exp_rate, timed in registers: torch.exp, a general exp through
memory, runs ~10x slower and is no measure of them).
"""
import time

import summary
import torch

from fastnl.backends import cpp

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _fastest(function, times=5):
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def measure():
    """{"mm flop/s float32", "mm flop/s bfloat16", "kernel exp/s"}: torch.mm 1024^3 (the
    fastest of 5 after a warm-up) and the kernels' exp on all threads (left out where
    the kernels are not built), now."""
    rates = {}
    for name, dtype in PRECISIONS.items():
        operands = [torch.randn(1024, 1024, dtype=dtype) for _ in range(3)]

        def product(left=operands[0], right=operands[1], out=operands[2]):
            torch.mm(left, right, out=out)

        product()
        rates[f"mm flop/s {name}"] = 2 * 1024**3 / _fastest(product)
    exp_rate = cpp.exp_rate()  # 0 where the kernels are not built: no floors then
    if exp_rate > 0:
        rates["kernel exp/s"] = exp_rate * torch.get_num_threads()
    return rates


def record(benchmark):
    """The body of each suite's test_machine_rates: measure() timed once as its own group,
    the rates stored in summary.VALUES for the suite's floors."""
    benchmark.group = "machine: torch.mm rates in float32 and bfloat16, the kernels' exp rate"
    summary.VALUES.update(benchmark.pedantic(measure, rounds=1))


def floor_seconds(flops, exps, precision, rates):
    """The least time `rates` (measure's) allow a kernel of `flops` products in `precision`
    and `exps` exponentials, one after the other as the kernels run them."""
    return flops / rates[f"mm flop/s {precision}"] + exps / rates["kernel exp/s"]


def describe(rates):
    """One line: the rates the floors were taken at."""
    return (f"this machine now: torch.mm 1024^3 at {rates['mm flop/s float32'] / 1e9:.0f} GFLOP/s in float32 and "
            f"{rates['mm flop/s bfloat16'] / 1e9:.0f} in bfloat16; the kernels' exp at "
            f"{rates['kernel exp/s'] / 1e9:.1f} G/s on {torch.get_num_threads()} threads. A kernel's floor: its "
            f"products at torch.mm's rate in the precision they run in, then its exps at the kernels' exp rate")
