"""The cpp backend against the reference, the torch backend and PyTorch's own fused
attention (issue 3). One group per problem, one row per implementation:

    pytest benchmarks/test_cpp_bench.py --benchmark-only

The problems and the SDPA peer come from cases.py; test_diffuse_bench.py times every
backend, cpp included, at all three paper sizes. This file adds what is particular
to the cpp kernels: a stage's chain sharing statistics, the dot kernel at N = 16384,
peak memory of one step (conftest.peak_extra_bytes), and the machine's rates (machine.py).

After the timings a summary prints the ratios against the speed bars (cpp vs
reference and vs SDPA, the stage chain, peak extra memory, the dot kernel at
N = 16384) and the fused kernel's time against its floor at the machine's rates.
All float32, fastnl's default scale 1; SDPA is given the same scale.
"""

import machine
import pytest
import summary
import torch
from cases import IMPLEMENTATIONS, SIZES, make_inputs, run_step, sdpa_diffuse, size_name, work
from conftest import peak_extra_bytes

import fastnl
from fastnl import backends

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

# The bar's problem is the paper's first size (B16, N1024, D8, E16); benchmarks/
# test_diffuse_bench.py times every backend at all three sizes.
BAR_SIZE = SIZES[0]
STAGE_BLOCKS = 4
DOT_SIZE = dict(batch=1, positions=16384, width=8, value_width=16)

@pytest.mark.parametrize("implementation", ["cpp", "sdpa", "torch", "reference"])
def test_diffuse_forward_backward(benchmark, record, implementation):
    benchmark.group = f"diffuse softmax fwd+bwd {size_name(BAR_SIZE)}"
    inputs = make_inputs(BAR_SIZE, requires_grad=True)
    run_step(IMPLEMENTATIONS[implementation], inputs, True)  # build / warm up outside the timing
    benchmark.pedantic(run_step, args=(IMPLEMENTATIONS[implementation], inputs, True),
                       rounds=9 if implementation != "reference" else 4, warmup_rounds=1)
    record(benchmark, implementation)


@pytest.mark.parametrize("implementation", ["cpp", "sdpa", "torch"])
def test_sharp_affinity(benchmark, record, implementation):
    """Queries x 10: logits spread over hundreds, as in a trained block, so most shifted
    logits fall below -87 where e^x is a denormal float (slow unless flushed)."""
    benchmark.group = f"diffuse softmax fwd+bwd, logits x 10 {size_name(BAR_SIZE)}"
    query, key, value = make_inputs(BAR_SIZE, requires_grad=False)
    inputs = [(query * 10).requires_grad_(), key.requires_grad_(), value.requires_grad_()]
    run_step(IMPLEMENTATIONS[implementation], inputs, True)
    benchmark.pedantic(run_step, args=(IMPLEMENTATIONS[implementation], inputs, True), rounds=5,
                       warmup_rounds=1)
    record(benchmark, implementation)


def _stage_step(implementation, query, key, value):
    """A NonlocalStage's pattern: STAGE_BLOCKS diffusions with one affinity, each on the
    previous block's output (v <- v + diffuse(v)), then the backward through all."""
    if implementation == "cpp":
        def step():
            values, log_normalizer = value, None
            for _ in range(STAGE_BLOCKS):
                # the first call returns the row statistics, the later ones reuse them
                out, log_normalizer = fastnl.nonlocal_attend(
                    query, key, values, values, backend="cpp", log_normalizer=log_normalizer
                )
                values = values + out
            values.backward(torch.ones_like(values))
    else:
        def step():
            values = value
            for _ in range(STAGE_BLOCKS):
                values = values + sdpa_diffuse(query, key, values)
            values.backward(torch.ones_like(values))
    return step


@pytest.mark.parametrize("implementation", ["cpp", "sdpa"])
def test_stage_chain(benchmark, record, implementation):
    benchmark.group = f"stage chain of {STAGE_BLOCKS} diffuse fwd+bwd {size_name(BAR_SIZE)}"
    step = _stage_step(implementation, *make_inputs(BAR_SIZE, requires_grad=True))
    step()
    benchmark.pedantic(step, rounds=7, warmup_rounds=1)
    record(benchmark, implementation)


@pytest.mark.parametrize("implementation", ["cpp", "reference"])
def test_dot_forward_backward(benchmark, record, implementation):
    benchmark.group = f"diffuse dot fwd+bwd {size_name(DOT_SIZE)}"
    query, key, value = make_inputs(DOT_SIZE, requires_grad=True)

    def step():
        out = fastnl.nonlocal_diffuse(query, key, value, value, kernel="dot", backend=implementation)
        out.backward(torch.ones_like(out))

    step()
    benchmark.pedantic(step, rounds=9 if implementation == "cpp" else 2, warmup_rounds=0)
    record(benchmark, implementation)


@pytest.mark.parametrize("implementation", ["cpp", "reference"])
def test_peak_memory(benchmark, record, implementation):
    """Timed as a whole subprocess; the number that matters is extra_info's peak."""
    benchmark.group = f"peak extra memory, diffuse fwd+bwd {size_name(BAR_SIZE)}"
    peak = benchmark.pedantic(peak_extra_bytes, args=(implementation, SIZES.index(BAR_SIZE), True), rounds=1)
    benchmark.extra_info["peak_extra_MiB"] = round(peak / 2**20, 2)
    summary.VALUES[f"peak bytes {implementation}"] = peak


def test_machine_rates(benchmark):
    """This machine's torch.mm rates and the kernels' exp rate, now (machine.measure)."""
    machine.record(benchmark)


@summary.section("fastnl cpp backend: the speed bars (medians from the groups above)")
def _summary_lines():
    main = f"diffuse softmax fwd+bwd {size_name(BAR_SIZE)}"
    stage = f"stage chain of {STAGE_BLOCKS} diffuse fwd+bwd {size_name(BAR_SIZE)}"
    dot = f"diffuse dot fwd+bwd {size_name(DOT_SIZE)}"
    bars = [
        ("cpp vs reference, diffuse fwd+bwd", summary.ratio(main, "reference", "cpp"), 4.0),
        ("cpp vs SDPA + subtraction", summary.ratio(main, "sdpa", "cpp"), 1.5),
        (f"stage chain of {STAGE_BLOCKS}: cpp vs SDPA", summary.ratio(stage, "sdpa", "cpp"), 1.4),
        ("dot at N=16384: cpp vs reference", summary.ratio(dot, "reference", "cpp"), 50.0),
    ]
    lines = summary.bar_lines(bars)
    sharp = f"diffuse softmax fwd+bwd, logits x 10 {size_name(BAR_SIZE)}"
    if summary.ratio(sharp, "sdpa", "cpp") is not None:
        lines.append(f"sharp affinity (logits x 10): cpp {summary.median(sharp, 'cpp') * 1e3:.2f} ms, SDPA "
                     f"{summary.median(sharp, 'sdpa') * 1e3:.2f} ms = {summary.ratio(sharp, 'sdpa', 'cpp'):.2f}x "
                     f"(reported, no bar)")
    peaks = summary.VALUES.get("peak bytes cpp"), summary.VALUES.get("peak bytes reference")
    if None not in peaks:
        lines.append(f"peak extra memory: cpp {peaks[0] / 2**20:.1f} MiB, reference {peaks[1] / 2**20:.1f} MiB "
                     f"= {100 * peaks[0] / peaks[1]:.1f}% (needed <= 5%)")
    measured = summary.median(main, "cpp")
    if "kernel exp/s" in summary.VALUES and measured is not None:
        floor = machine.floor_seconds(*work(BAR_SIZE), "float32", summary.VALUES)
        lines += [machine.describe(summary.VALUES),
                  f"cpp fwd+bwd {measured * 1e3:.2f} ms against its floor {floor * 1e3:.2f} ms: "
                  f"{floor / measured:.0%} of the floor's speed"]
    return lines
