"""The training step users run, and the nonlocal stage inside it against its own op calls.

    pytest benchmarks/test_training_bench.py --benchmark-only

Groups: one SGD step of a PreResNet-20 at batch 128 on random 32x32 images (forward,
cross-entropy, backward, step) for the baseline and three nonlocal presets, in float32
(contiguous and channels-last) and under bf16 autocast with channels-last; and
`NonlocalStage(32, num_blocks=3)` at B=128 on 16x16 maps (stage 2 of a PreResNet-20)
forward+backward against the same three `fastnl.nonlocal_attend` calls (shared
statistics) on ready-made (B, N, C') operands, which is what the module adds its
embeddings, BatchNorm and residuals around. The section after the tables prints the
ratios against the training-speed bars, each twice: as the ratio of the two groups'
medians, and paired: the median over PAIRS alternating steps of one against the other,
which a machine whose speed drifts between the groups (a shared VM) moves far less.
Then the floor under the step ratio: the baseline's step plus the stage's op calls, the
ratio a module costing nothing besides its nonlocal sums would reach; and the ratio with
the stage's products and exps (nonlocal sums and 1x1 projections) at their floor at this
machine's rates (machine.py), measured in the same run: a bar below that is out of reach
on this machine.

The process runs as `python -m fastnl.train` runs on CPU, with glibc keeping freed
memory (fastnl.app.malloc, set when this module's first test runs; it cannot be undone,
and this file's tests run last). `FASTNL_BENCH_MALLOC=unchanged` leaves malloc as it is.
"""
import contextlib
import os

import machine
import pytest
import summary
import torch
import torch.nn.functional as F
from cases import stage_work

import fastnl
from fastnl.app.malloc import keep_freed_memory
from fastnl.backends import cpp
from fastnl.models import build_model

BATCH = 128
PAIRS = 15
PRESETS = ["baseline", "original-3", "proposed-3", "proposed-6"]

# name -> (memory format, autocast dtype or None)
SETTINGS = {
    "float32": (torch.contiguous_format, None),
    "float32 channels_last": (torch.channels_last, None),
    "bf16 channels_last": (torch.channels_last, torch.bfloat16),
}
MALLOC = {}  # what the fixture below did to malloc, for the summary


@pytest.fixture(scope="module", autouse=True)
def _malloc_as_training_runs():
    keep = os.environ.get("FASTNL_BENCH_MALLOC") != "unchanged"
    MALLOC["said"] = keep_freed_memory() if keep else "unchanged (FASTNL_BENCH_MALLOC=unchanged)"


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _training_step(preset, memory_format, dtype):
    torch.manual_seed(0)
    model = build_model("preresnet20", placement=preset).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (BATCH,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def _group(setting):
    return f"training step preresnet20 B{BATCH} {setting}"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_step(benchmark, record, setting, preset):
    benchmark.group = _group(setting)
    step = _training_step(preset, *SETTINGS[setting])
    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
    record(benchmark, preset)


STAGE_CHANNELS, STAGE_BLOCKS, STAGE_SIDE = 32, 3, 16
STAGE = f"NonlocalStage({STAGE_CHANNELS}, num_blocks={STAGE_BLOCKS}) fwd+bwd B{BATCH} {STAGE_SIDE}x{STAGE_SIDE}"


def _stage_step(dtype):
    """The stage as the model runs it: under bf16 autocast its input is already bf16 (the
    convolution before it ran in bf16), so no cast of the input is timed."""
    stage = fastnl.NonlocalStage(STAGE_CHANNELS, num_blocks=STAGE_BLOCKS)
    x = torch.randn(BATCH, STAGE_CHANNELS, STAGE_SIDE, STAGE_SIDE, dtype=dtype or torch.float32)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)  # dense, as in training (a sum's expanded gradient takes slow paths)

    def step():
        with _autocast(dtype):
            out = stage(x)
        out.backward(grad.to(out.dtype))

    return step


def _op_calls_step(dtype):
    """The stage's nonlocal sums alone: one affinity, K values, statistics shared."""
    positions, width = STAGE_SIDE * STAGE_SIDE, STAGE_CHANNELS // 2
    operand_dtype = dtype or torch.float32
    query, key = (torch.randn(BATCH, positions, width, dtype=operand_dtype, requires_grad=True) for _ in range(2))
    values = [torch.randn(BATCH, positions, width, dtype=operand_dtype, requires_grad=True)
              for _ in range(STAGE_BLOCKS)]
    grads = [torch.randn_like(value) for value in values]

    def step():
        log_normalizer, outs = None, []
        for value in values:
            out, log_normalizer = fastnl.nonlocal_attend(query, key, value, value, log_normalizer=log_normalizer)
            outs.append(out)
        torch.autograd.backward(outs, grads)

    return step


@pytest.mark.parametrize("implementation", ["stage", "op calls"])
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_stage_against_its_op_calls(benchmark, record, precision, implementation):
    benchmark.group = f"{STAGE} {precision}"
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = _stage_step(dtype) if implementation == "stage" else _op_calls_step(dtype)
    benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    record(benchmark, implementation)


def _model_steps(setting):
    return lambda: [_training_step(preset, *SETTINGS[setting]) for preset in ("proposed-3", "baseline")]


def _stage_steps(dtype):
    return lambda: [_stage_step(dtype), _op_calls_step(dtype)]


# bar name -> (group, slower, faster, bar or None, builder of the two steps for the paired ratio or None)
BARS = {
    "proposed-3 / baseline step, float32": (_group("float32"), "proposed-3", "baseline", None, None),
    "proposed-3 / baseline step, float32 channels_last": (_group("float32 channels_last"), "proposed-3", "baseline",
                                                          1.15, _model_steps("float32 channels_last")),
    "proposed-3 / baseline step, bf16 channels_last": (_group("bf16 channels_last"), "proposed-3", "baseline", 1.25,
                                                       _model_steps("bf16 channels_last")),
    "stage / its op calls, float32": (f"{STAGE} float32", "stage", "op calls", 1.5, _stage_steps(None)),
    "stage / its op calls, bf16": (f"{STAGE} bf16", "stage", "op calls", 1.5, _stage_steps(torch.bfloat16)),
}


@pytest.mark.parametrize("bar", [name for name, entry in BARS.items() if entry[-1] is not None])
def test_bar_paired(benchmark, bar):
    """The bar's two steps alternately (one pair, untimed, when benchmarks are disabled)."""
    summary.record_paired(benchmark, bar, *BARS[bar][-1](), PAIRS)


def test_machine_rates(benchmark):
    """This machine's torch.mm rates and the kernels' exp rate, now (machine.measure)."""
    machine.record(benchmark)


# step setting -> the precision of the stage group whose op calls run in it
FLOOR_PRECISION = {"float32 channels_last": "float32", "bf16 channels_last": "bf16"}


def _stage_floor(precision):
    """The least time this machine allows the stage's products and exps in a training step
    (machine.floor_seconds): its STAGE_BLOCKS nonlocal sums fwd+bwd, computed in bf16 where
    the kernels take bf16 natively (with the query and key gradients formed once,
    cases.stage_work), and its 1x1 projections (theta and phi once, g and W_z a block;
    forward, input and weight gradients) in the step's precision. BatchNorm and the
    residuals, memory passes, count nothing. None before the rates are measured."""
    if "kernel exp/s" not in summary.VALUES:
        return None
    native = precision == "bf16" and cpp.bfloat16_path() in ("amx", "avx512-bf16")
    width, rows = STAGE_CHANNELS // 2, BATCH * STAGE_SIDE**2  # C' = C // 2
    flops, exps = stage_work(dict(batch=BATCH, positions=STAGE_SIDE**2, width=width, value_width=width),
                             STAGE_BLOCKS)
    sums = machine.floor_seconds(flops, exps, "bfloat16" if native else "float32", summary.VALUES)
    projections = 3 * 2 * rows * STAGE_CHANNELS * width * (2 + 2 * STAGE_BLOCKS)  # 3 GEMMs a linear
    return sums + machine.floor_seconds(projections, 0, "bfloat16" if precision == "bf16" else "float32",
                                        summary.VALUES)


def _floor_lines():
    """The proposed-3 / baseline step ratio of a stage that cost exactly its K separate
    op calls (its own sums do less: the query and key gradients formed once); and the
    lowest this machine allows: the stage's products and exps at their floor
    (_stage_floor). A bar below the second is out of reach on this machine, whatever the
    kernels and the module."""
    lines = []
    for setting, precision in FLOOR_PRECISION.items():
        baseline = summary.median(_group(setting), "baseline")
        op_calls = summary.median(f"{STAGE} {precision}", "op calls")
        if None not in (baseline, op_calls):
            lines.append(f"proposed-3 / baseline with the stage at its op calls, {setting}: (baseline "
                         f"{baseline * 1e3:.0f} ms + the {STAGE_BLOCKS} separate op calls {op_calls * 1e3:.0f} ms) / "
                         f"baseline = {1 + op_calls / baseline:.2f}")
        floor, bar = _stage_floor(precision), BARS[f"proposed-3 / baseline step, {setting}"][3]
        if None not in (baseline, floor):
            verdict = "out of reach on this machine" if 1 + floor / baseline > bar else "within this machine's rates"
            lines.append(f"  at this machine's rates: (baseline + the stage's products and exps at their floor "
                         f"{floor * 1e3:.1f} ms) / baseline = {1 + floor / baseline:.3f}, bar {bar:.2f}: {verdict}")
    if "kernel exp/s" in summary.VALUES:
        lines.append(machine.describe(summary.VALUES))
    return lines


@summary.section("fastnl training speed: the bars (medians from the groups above, and paired; lower is better)")
def _bars():
    bars = []
    for name, (group, slower, faster, bar, paired) in BARS.items():
        bars.append((name, summary.ratio(group, slower, faster), bar))
        if paired is not None:
            bars.append((f"  paired, {PAIRS} alternating steps", summary.paired(name), bar))
    lines = summary.bar_lines(bars, lower_is_better=True) + _floor_lines()
    for setting in SETTINGS:
        baseline = summary.median(_group(setting), "baseline")
        if baseline is not None:
            lines.append(f"baseline {setting}: {BATCH / baseline:.0f} images/s")
    if MALLOC:
        lines.append(f"malloc: {MALLOC['said']}")
    return lines
