"""The model's three nonlocal shapes at the training batch B = 128: diffuse softmax
fwd+bwd through fastnl.nonlocal_attend on the cpp backend in float32 and bfloat16,
against SDPA in the same dtype and the reference in float32; a stage's chain of K blocks
sharing statistics at N = 256, also with the query and key gradients formed once (as a
NonlocalStage trains); and the machine's float32 and bfloat16 product rates and
the kernels' exp rate, measured in the same run, to explain the ratios.

    pytest benchmarks/test_model_shapes_bench.py --benchmark-only

One group per problem and dtype, one row per implementation (cases.py's problems and
SDPA peer). The summary prints the bars at N256 D16 E16, each also paired (the median
ratio over PAIRS alternating steps of its two sides), and the same ratios, without bars,
at the other two shapes; then each cpp kernel's time against its floor, the least time
this machine allows it (its products at torch.mm's rate, its exps at the kernels' exp
rate), and what the N256 bars ask of it: out of reach at this machine's rates where a
bar asks for less than the floor.
"""

import machine
import pytest
import summary
import torch
from cases import MODEL_SIZES, make_inputs, run_step, sdpa_diffuse, size_name, work

import fastnl
from fastnl import backends
from fastnl.backends import cpp
from fastnl.shared_affinity import SharedAffinity

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

BAR_SIZE = MODEL_SIZES[1]
STAGE_SIZE = MODEL_SIZES[1]
STAGE_BLOCKS = [2, 4, 6]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def attend_diffuse(backend):
    def diffuse(query, key, value):
        out, _ = fastnl.nonlocal_attend(query, key, value, value, backend=backend)
        return out

    return diffuse


# "cpp native": bfloat16 on the native kernels (FASTNL_CPP_BFLOAT16=native: AMX tiles where
# the CPU has them; the default there and where vdpbf16ps is fast), beside "cpp", which
# computes bfloat16 in float32
IMPLEMENTATIONS = {"cpp": attend_diffuse("cpp"), "cpp native": attend_diffuse("cpp"), "sdpa": sdpa_diffuse,
                   "reference": attend_diffuse("reference")}
# (dtype, implementation): the reference is the float32 yardstick only
CASES = [(dtype_name, name) for dtype_name in DTYPES for name in IMPLEMENTATIONS
         if (name != "reference" or dtype_name == "float32") and (name != "cpp native" or dtype_name == "bfloat16")]


def _choose(monkeypatch, implementation):
    """Pin the bfloat16 path: "cpp" computes in float32, "cpp native" on the bf16 kernels."""
    monkeypatch.setenv(cpp.BFLOAT16_CHOICE, "float32")
    if implementation == "cpp native":
        if not cpp._bfloat16_kernels():
            pytest.skip(f"no native bfloat16 here: {cpp.bfloat16_path()}")
        monkeypatch.setenv(cpp.BFLOAT16_CHOICE, "native")


def _group(size, dtype_name):
    return f"model diffuse softmax fwd+bwd {size_name(size)} {dtype_name}"


def _stage_group(blocks, dtype_name):
    return f"model stage chain of {blocks} diffuse fwd+bwd {size_name(STAGE_SIZE)} {dtype_name}"


@pytest.mark.parametrize(("dtype_name", "implementation"), CASES, ids="-".join)
@pytest.mark.parametrize("size", MODEL_SIZES, ids=size_name)
def test_model_diffuse(benchmark, record, monkeypatch, size, dtype_name, implementation):
    _choose(monkeypatch, implementation)
    benchmark.group = _group(size, dtype_name)
    inputs = make_inputs(size, requires_grad=True, dtype=DTYPES[dtype_name])
    function = IMPLEMENTATIONS[implementation]
    run_step(function, inputs, True)  # build / warm up outside the timing
    slow = implementation == "reference" or (implementation == "sdpa" and dtype_name == "bfloat16")
    benchmark.pedantic(run_step, args=(function, inputs, True), rounds=2 if slow else 5, warmup_rounds=0)
    record(benchmark, implementation)


def _stage_step(implementation, blocks, query, key, value, shared=False):
    """A NonlocalStage's pattern (as test_cpp_bench.py's): `blocks` diffusions with one
    affinity, each on the previous block's output, the cpp ones sharing the first's
    row statistics (and with `shared`, forming the query and key gradients once for all
    blocks, as the stage does in training: fastnl.shared_affinity); then the backward
    through all."""

    def step():
        values, log_normalizer = value, None
        blocks_of_one_affinity = SharedAffinity(query, key, 1.0, "cpp") if shared else None
        for _ in range(blocks):
            if shared:
                out = blocks_of_one_affinity.attend(values, values)
            elif implementation.startswith("cpp"):
                out, log_normalizer = fastnl.nonlocal_attend(query, key, values, values, backend="cpp",
                                                             log_normalizer=log_normalizer)
            else:
                out = sdpa_diffuse(query, key, values)
            values = values + out
        values.backward(torch.ones_like(values))

    return step


@pytest.mark.parametrize(("dtype_name", "implementation"), [case for case in CASES if case[1] != "reference"],
                         ids="-".join)
@pytest.mark.parametrize("blocks", STAGE_BLOCKS)
def test_model_stage_chain(benchmark, record, monkeypatch, blocks, dtype_name, implementation):
    _choose(monkeypatch, implementation)
    benchmark.group = _stage_group(blocks, dtype_name)
    step = _stage_step(implementation, blocks, *make_inputs(STAGE_SIZE, requires_grad=True, dtype=DTYPES[dtype_name]))
    step()
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)
    record(benchmark, implementation)


# the stage chain as a NonlocalStage trains it: the query and key gradients once for all blocks
SHARED = " shared dQ, dK"


@pytest.mark.parametrize(("dtype_name", "implementation"), [("float32", "cpp"), ("bfloat16", "cpp native")],
                         ids="-".join)
@pytest.mark.parametrize("blocks", STAGE_BLOCKS)
def test_model_stage_chain_shared(benchmark, record, monkeypatch, blocks, dtype_name, implementation):
    _choose(monkeypatch, implementation)
    benchmark.group = _stage_group(blocks, dtype_name)
    inputs = make_inputs(STAGE_SIZE, requires_grad=True, dtype=DTYPES[dtype_name])
    step = _stage_step(implementation, blocks, *inputs, shared=True)
    step()
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)
    record(benchmark, implementation + SHARED)


# the N256 bars, each also as a paired ratio: bar -> (slower, faster), each (implementation, dtype)
PAIRED_BARS = {
    "cpp vs SDPA, float32": (("sdpa", "float32"), ("cpp", "float32")),
    "cpp native bf16 vs cpp float32": (("cpp", "float32"), ("cpp native", "bfloat16")),
    "cpp native bf16 vs SDPA bf16": (("sdpa", "bfloat16"), ("cpp native", "bfloat16")),
}
PAIRS = 15


@pytest.mark.parametrize("bar", list(PAIRED_BARS))
def test_bar_paired(benchmark, monkeypatch, bar):
    """A bar's two fwd+bwd steps at N256 alternately (one pair, untimed, when benchmarks
    are disabled): the groups' medians come from minutes apart, when a shared VM may run
    at another speed."""
    implementations = [implementation for implementation, _ in PAIRED_BARS[bar]]
    _choose(monkeypatch, "cpp native" if "cpp native" in implementations else "cpp")
    steps = []
    for implementation, dtype_name in PAIRED_BARS[bar]:
        inputs = make_inputs(BAR_SIZE, requires_grad=True, dtype=DTYPES[dtype_name])
        steps.append(lambda function=IMPLEMENTATIONS[implementation], inputs=inputs: run_step(function, inputs, True))
    summary.record_paired(benchmark, bar, *steps, PAIRS)


def test_machine_rates(benchmark):
    """This machine's torch.mm rates and the kernels' exp rate, now (machine.measure)."""
    machine.record(benchmark)


def _floor(size, implementation):
    """The least time this machine allows `implementation`'s fwd+bwd at `size` (its
    products in bfloat16 on "cpp native", else in float32), None before the rates are measured."""
    if "kernel exp/s" not in summary.VALUES:
        return None
    precision = "bfloat16" if implementation == "cpp native" else "float32"
    return machine.floor_seconds(*work(size), precision, summary.VALUES)


def _ratios(size, bfloat16_cpp="cpp"):
    """(cpp vs SDPA float32, cpp bf16 vs cpp float32, cpp bf16 vs SDPA bf16) at `size`,
    bf16 on the implementation `bfloat16_cpp` ("cpp" or "cpp native")."""
    float32, bfloat16 = _group(size, "float32"), _group(size, "bfloat16")
    cpp_float32, cpp_bfloat16 = summary.median(float32, "cpp"), summary.median(bfloat16, bfloat16_cpp)
    across = None if None in (cpp_float32, cpp_bfloat16) else cpp_float32 / cpp_bfloat16
    return summary.ratio(float32, "sdpa", "cpp"), across, summary.ratio(bfloat16, "sdpa", bfloat16_cpp)


@summary.section("fastnl cpp backend at the model's shapes, B = 128 (medians from the groups above)")
def _summary_lines():
    name = size_name(BAR_SIZE)
    versus_sdpa, versus_float32, versus_sdpa_bf16 = _ratios(BAR_SIZE)
    lines = [f"bfloat16 path: {cpp.bfloat16_path()} (vdpbf16ps at {cpp.bfloat16_dot_speedup():.2f}x the float32 "
             f"FMA rate)"]
    _, native_versus_float32, native_versus_sdpa_bf16 = _ratios(BAR_SIZE, "cpp native")
    # the bf16 bars hold the path bfloat16 takes here by default (bfloat16_path)
    native_default = cpp.bfloat16_path() in ("amx", "avx512-bf16")
    bars = [
        ("cpp vs SDPA, float32", versus_sdpa, 1.5),
        ("cpp bf16 converted vs cpp float32", versus_float32, None if native_default else 1.5),
        ("cpp bf16 converted vs SDPA bf16", versus_sdpa_bf16, None if native_default else 4.0),
        ("cpp native bf16 vs cpp float32", native_versus_float32, 1.5 if native_default else None),
        ("cpp native bf16 vs SDPA bf16", native_versus_sdpa_bf16, 4.0 if native_default else None),
    ]
    with_paired = []
    for bar_name, value, bar in bars:  # untimed rows (a bar not paired) are left out
        with_paired += [(f"{name}: {bar_name}", value, bar),
                        (f"  paired, {PAIRS} alternating steps", summary.paired(bar_name), bar)]
    lines += summary.bar_lines(with_paired)
    for size in MODEL_SIZES:
        if size is BAR_SIZE:
            continue
        ratios = (*_ratios(size), *_ratios(size, "cpp native")[1:])
        cells = ["-" if value is None else f"{value:.2f}" for value in ratios]
        lines.append(f"{size_name(size)} (no bars): cpp vs SDPA float32 {cells[0]}; bf16 converted vs cpp float32 "
                     f"{cells[1]}, vs SDPA bf16 {cells[2]}; native bf16 vs cpp float32 {cells[3]}, vs SDPA bf16 "
                     f"{cells[4]}")
    for blocks in STAGE_BLOCKS:
        cells = [summary.ratio(_stage_group(blocks, dtype_name), "sdpa", "cpp") for dtype_name in DTYPES]
        if None not in cells:
            lines.append(f"stage chain of {blocks} at {size_name(STAGE_SIZE)} (no bar): cpp vs SDPA "
                         f"float32 {cells[0]:.2f}, bf16 {cells[1]:.2f}")
        shared = {dtype_name: (summary.ratio(_stage_group(blocks, dtype_name), "sdpa", name + SHARED),
                               summary.ratio(_stage_group(blocks, dtype_name), name, name + SHARED))
                  for dtype_name, name in (("float32", "cpp"), ("bfloat16", "cpp native"))}
        if None not in (*shared["float32"], *shared["bfloat16"]):
            lines.append(f"  with dQ, dK formed once (the stage in training): vs SDPA float32 "
                         f"{shared['float32'][0]:.2f}, bf16 {shared['bfloat16'][0]:.2f}; vs one backward per block "
                         f"float32 {shared['float32'][1]:.2f}, bf16 {shared['bfloat16'][1]:.2f}")
    if "kernel exp/s" not in summary.VALUES:
        return lines
    lines.append(machine.describe(summary.VALUES))
    for size in MODEL_SIZES:
        flops, exps = work(size)
        achieved = []
        for dtype_name, implementation in [case for case in CASES if case[1].startswith("cpp")]:
            seconds = summary.median(_group(size, dtype_name), implementation)
            if seconds is not None:
                floor = _floor(size, implementation)
                achieved.append(f"{implementation} {dtype_name} {seconds * 1e3:.1f} ms = {flops / seconds / 1e9:.0f} "
                                f"GFLOP/s, its floor {floor * 1e3:.1f} ms ({floor / seconds:.0%} of it)")
        if achieved:
            lines.append(f"cpp at {size_name(size)}, {flops / 1e9:.1f} GFLOP of products and {exps / 1e6:.0f}M exps: "
                         + "; ".join(achieved))
    return lines + _reach_lines()


def _reach_lines():
    """What the N256 bars ask of cpp's fwd+bwd time, against its floor: out of reach at
    this machine's rates where the bar asks for less than the floor."""
    float32, bfloat16 = _group(BAR_SIZE, "float32"), _group(BAR_SIZE, "bfloat16")
    asks = {
        ("cpp", "float32"): [("SDPA float32 / 1.5", summary.median(float32, "sdpa"), 1.5)],
        ("cpp native", "bfloat16"): [("cpp float32 / 1.5", summary.median(float32, "cpp"), 1.5),
                                     ("SDPA bf16 / 4", summary.median(bfloat16, "sdpa"), 4.0)],
    }
    lines = []
    for (implementation, dtype_name), peers in asks.items():
        measured, floor = summary.median(_group(BAR_SIZE, dtype_name), implementation), _floor(BAR_SIZE, implementation)
        if measured is None or floor is None or any(peer is None for _, peer, _ in peers):
            continue
        needed = min(peer / bar for _, peer, bar in peers)
        terms = " and ".join(f"<= {name} = {peer / bar * 1e3:.1f} ms" for name, peer, bar in peers)
        verdict = (f"out of reach at this machine's rates (the floor is {floor * 1e3:.1f} ms)" if needed < floor else
                   f"reachable at this machine's rates: the bar asks for {floor / needed:.0%} of the floor's speed, "
                   f"the kernel runs at {floor / measured:.0%}")
        lines.append(f"{size_name(BAR_SIZE)} bars ask {implementation} {dtype_name} fwd+bwd {terms}: measured "
                     f"{measured * 1e3:.1f} ms, {verdict}")
    return lines
