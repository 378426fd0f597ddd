"""The cpp kernels of two revisions timed against each other in one process, their calls
interleaved. On a shared 2-core VM one build's timings moved 15-20% between runs, which
hides a 10% change; two calls a few milliseconds apart see the same machine.

    python benchmarks/paired_builds.py [BASE] [NEW] [--rounds 20]

BASE and NEW are git revisions, or "work" for the working tree (default: HEAD against
the working tree). Each side's csrc/cpu is copied with its operator namespace renamed
(fastnl_cpp -> fastnl_cpp_base, fastnl_cpp_new) and its C++ namespace too, so that the
two libraries load side by side and never bind to each other's symbols. Both are built
with the backend's own flags (fastnl.backends.cpp): about a minute each, in torch's
extension cache. At each model shape (cases.MODEL_SIZES) and dtype, every round runs
softmax fwd and bwd once on each side, the side that goes first alternating. The
script prints the medians, NEW's median per-round speed-up, and whether the two
builds' outputs (out, log_normalizer and the three gradients) are bitwise equal.

    python benchmarks/paired_builds.py [BASE] [NEW] --stage

times `NonlocalStage(32, num_blocks=3)` fwd+bwd at B=128 on 16x16 maps instead (stage 2
of a PreResNet-20; float32, and bf16 under autocast), the whole module with each
side's operators: the row operators' (fastnl.batch_norm, fastnl.linear_parts) as well
as the softmax kernels', and what a change to one costs the others through the caches.
The modules look `torch.ops.fastnl_cpp`'s operators up at every call; `routed` points
them at one side's for its calls. The Python side is the working tree's, so both
revisions need the operators it calls.
"""
import argparse
import contextlib
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from cases import MODEL_SIZES, make_inputs, size_name
from torch import nn

import fastnl
from fastnl.backends import cpp

REPO = Path(__file__).resolve().parents[1]
SIDES = ("base", "new")


def renamed(text, tag):
    """C++ source with the operator namespace fastnl_cpp and the C++ namespace fastnl
    suffixed by `tag`."""
    text = re.sub(r"\bTORCH_LIBRARY(_IMPL)?\(fastnl_cpp,", rf"TORCH_LIBRARY\1(fastnl_cpp_{tag},", text)
    text = re.sub(r"\bnamespace fastnl\b", f"namespace fastnl_{tag}", text)
    return re.sub(r"\bfastnl::", f"fastnl_{tag}::", text)


def export_sources(revision, tag, into):
    """csrc/cpu of `revision` ("work": the working tree) into the folder `into`, renamed by `tag`."""
    if revision == "work":
        files = {path.name: path.read_text() for path in (REPO / "csrc/cpu").iterdir() if path.is_file()}
    else:
        listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", revision, "csrc/cpu/"],
                                 capture_output=True, text=True, check=True).stdout.split()
        files = {Path(path).name: subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{path}"],
                                                 capture_output=True, text=True, check=True).stdout
                 for path in listing}
    for name, text in files.items():
        (Path(into) / name).write_text(renamed(text, tag))


def load_side(revision, tag):
    """Build `revision`'s kernels as torch.ops.fastnl_cpp_<tag> and return that namespace."""
    bfloat16 = cpp._bfloat16_unbuildable() is None
    with tempfile.TemporaryDirectory(prefix=f"fastnl-paired-{tag}-") as folder:  # the build keeps its own copy
        export_sources(revision, tag, folder)
        cpp._load(f"fastnl_paired_{tag}", cpp._flags(bfloat16), verbose=False, sources=Path(folder))
    return getattr(torch.ops, f"fastnl_cpp_{tag}")


def paired_times(calls, rounds):
    """{side: [seconds]} of calls {side: fn}, one call per side a round, the first alternating."""
    times = {side: [] for side in calls}
    for round_index in range(rounds):
        order = list(calls) if round_index % 2 == 0 else list(calls)[::-1]
        for side in order:
            start = time.perf_counter()
            calls[side]()
            times[side].append(time.perf_counter() - start)
    return times


def speed_up(times):
    """NEW's median per-round speed-up over BASE."""
    return statistics.median(base / new for base, new in zip(times["base"], times["new"]))


def compare(ops, size, dtype, rounds):
    """One row: medians, speed-ups and bitwise equality of one shape and dtype."""
    query, key, value = make_inputs(size, requires_grad=False, dtype=dtype)
    grad_out = torch.randn_like(value)
    results = {side: op.softmax_forward(query, key, value, value, None, 1.0) for side, op in ops.items()}
    out, log_normalizer = results["base"]
    grads = {side: op.softmax_backward(grad_out, query, key, value, value, out, log_normalizer, 1.0)
             for side, op in ops.items()}
    equal = all(torch.equal(a, b) for a, b in zip((*results["base"], *grads["base"]), (*results["new"], *grads["new"])))
    forward = paired_times({side: lambda op=op: op.softmax_forward(query, key, value, value, None, 1.0)
                            for side, op in ops.items()}, rounds)
    backward = paired_times({side: lambda op=op: op.softmax_backward(grad_out, query, key, value, value, out,
                                                                     log_normalizer, 1.0)
                             for side, op in ops.items()}, rounds)
    medians = {side: f"{statistics.median(forward[side]) * 1e3:7.2f} / {statistics.median(backward[side]) * 1e3:7.2f}"
               for side in SIDES}
    return (f"  {size_name(size) + ' ' + str(dtype).removeprefix('torch.'):30} {medians['base']:>17}  "
            f"{medians['new']:>17}  {speed_up(forward):5.2f} {speed_up(backward):5.2f}    "
            f"{'bitwise equal' if equal else 'differ'}")


def operator_names(tag):
    """The operators of the side built as torch.ops.fastnl_cpp_<tag>."""
    prefix = f"fastnl_cpp_{tag}::"
    return sorted({name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                   if name.startswith(prefix)})


@contextlib.contextmanager
def routed(namespace, side, names):
    """While in it, the operators `names` of `namespace` (an op namespace, such as
    torch.ops.fastnl_cpp) are `side`'s; afterwards what they were."""
    saved = {name: namespace.__dict__.get(name) for name in names}
    for name in names:
        setattr(namespace, name, getattr(side, name))
    try:
        yield
    finally:
        for name, op in saved.items():
            if op is None:
                delattr(namespace, name)
            else:
                setattr(namespace, name, op)


def stage_step(dtype):
    """NonlocalStage(32, num_blocks=3) fwd+bwd at B=128, 16x16, as a model runs it (a bf16
    input under bf16 autocast): -> step() giving the output and every gradient. The
    BatchNorm scales are random: a new stage's are zero, which would zero the blocks'
    contributions and with them most of what the comparison of outputs can see."""
    torch.manual_seed(0)
    stage = fastnl.NonlocalStage(32, num_blocks=3)
    for branch in stage.branches:
        nn.init.normal_(branch.bn.weight)
    x = torch.randn(128, 32, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    autocast = dtype == torch.bfloat16

    def step():
        x.grad = None
        stage.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = stage(x)
        out.backward(grad)
        return [out, x.grad, *(parameter.grad for parameter in stage.parameters())]

    return step


def compare_stage(ops, dtype, rounds):
    """One row: stage_step's medians on each side's operators, the speed-up and whether
    the output and all gradients are bitwise equal. Each side routes the operators it
    has, so that one only the new side has is not the main build's on that side."""
    step, names = stage_step(dtype), {side: operator_names(side) for side in SIDES}

    def on(side):
        with routed(torch.ops.fastnl_cpp, ops[side], names[side]):
            return step()

    results = {side: [t.clone() for t in on(side)] for side in SIDES}
    equal = all(torch.equal(a, b) for a, b in zip(results["base"], results["new"]))
    times = paired_times({side: lambda side=side: on(side) for side in SIDES}, rounds)
    medians = {side: f"{statistics.median(times[side]) * 1e3:7.2f}" for side in SIDES}
    return (f"  {'stage ' + str(dtype).removeprefix('torch.'):30} {medians['base']:>17}  {medians['new']:>17}  "
            f"{speed_up(times):5.2f}          {'bitwise equal' if equal else 'differ'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", default="HEAD", help="a git revision, or 'work' (default HEAD)")
    parser.add_argument("new", nargs="?", default="work", help="a git revision, or 'work' (default)")
    parser.add_argument("--rounds", type=int, default=20, help="paired calls per shape, dtype and direction")
    parser.add_argument("--stage", action="store_true", help="time NonlocalStage(32, num_blocks=3) fwd+bwd instead")
    args = parser.parse_args(argv)
    ops = {side: load_side(revision, side) for side, revision in zip(SIDES, (args.base, args.new))}
    native = all(op.bfloat16_native() for op in ops.values())
    dtypes = [torch.float32] + ([torch.bfloat16] if native else [])
    products = ("AMX" if ops["new"].bfloat16_amx() else "vdpbf16ps") if native else "no bf16 kernels"
    print(f"paired_builds: base {args.base} against new {args.new}, {args.rounds} rounds (bf16 products: {products})")
    if args.stage:
        header = f"  {'case (B=128, 16x16)':30} {'base fwd+bwd ms':>17}  {'new fwd+bwd ms':>17}  speed-up"
        print(f"{header}          outputs")
        for dtype in dtypes:
            print(compare_stage(ops, dtype, args.rounds), flush=True)
        return
    print(f"  {'case':30} {'base fwd / bwd ms':>17}  {'new fwd / bwd ms':>17}  speed-up fwd, bwd  outputs")
    for size in MODEL_SIZES:
        for dtype in dtypes:
            print(compare(ops, size, dtype, args.rounds), flush=True)


if __name__ == "__main__":
    main()
