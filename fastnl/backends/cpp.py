"""The "cpp" backend: fused C++ CPU kernels from csrc/cpu, built with ninja on first use.

The sources are compiled by `torch.utils.cpp_extension.load` into torch's extension
cache (or `TORCH_EXTENSIONS_DIR`) the first time a CPU operator needs them, and
loaded from there afterwards; `python -m fastnl.backends.cpp` builds ahead of time.
The kernels register themselves as `torch.ops.fastnl_cpp.*` (TORCH_LIBRARY);
`fastnl.ops` stays the public operator and calls the functions below.

They are compiled for the vector instructions of the building machine (AVX512, AVX2
or none), and the library name carries that choice, so a cache shared by different
machines never loads the wrong one. A failed build is not fatal: the backend reports
itself unavailable with the compiler's reason, `backend=None` falls back to "torch"
with one warning, and an explicit `backend="cpp"` raises that reason.

float32 and float64 run natively. bfloat16 inputs take one of two paths, chosen by
`FASTNL_CPP_BFLOAT16` ("native" or "float32"; unset: native where its products run on
AMX or vdpbf16ps is fast, else float32). "float32" computes them in float32 and rounds
once at the end, as the "torch" backend does. "native" runs the bfloat16 softmax
kernels, built where the CPU has AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo, and cpuid
when loaded) with -mavx512bf16 into a library whose name ends in "_bf16": they read
bf16 operands, keep P and dS in float32 (rounded to bf16 only as operands of the next
product, as FlashAttention does), log_normalizer in float32, and round each output
once. Their products run on AMX tiles through oneDNN's brgemm
(`torch.ops.fastnl_cpp.bfloat16_amx()`: the CPU has AMX and `torch.backends.mkldnn` is
enabled; D and E even), else on vdpbf16ps with float32 sums. Without AMX, native is the
default where vdpbf16ps has at least the FLOP rate of a float32 FMA, timed once on
first use (`bfloat16_dot_speedup`): on a Sapphire Rapids with AMX off it had half and
the native path ran slower than converting; on a Zen 4 it has twice and native ran
1.2-1.7x faster than converting at the models' three shapes
(`pytest benchmarks/test_model_shapes_bench.py --benchmark-only` times both).
`bfloat16_path()` says which path bfloat16 takes here, and why.
"""
import functools
import os
import warnings

import torch

from fastnl.backends import accumulate_dtype
from fastnl.backends._sources import extension_name, source_dir

# vector capability -> compiler flags; CPU_CAPABILITY_* selects at::vec's implementation.
# -mtune=native: the kernels are built on the machine that runs them, so the schedule
# can fit its core (the instruction set is unchanged).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mtune=native"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mtune=native"],
}


# the bfloat16 softmax kernels (csrc/cpu/tile_math.h, Product<c10::BFloat16>)
_BFLOAT16_FLAGS = ["-mavx512bf16", "-DFASTNL_AVX512_BF16"]
_bfloat16_build_errors = []  # why a build with _BFLOAT16_FLAGS failed, if one did


def _capability():
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def _cpu_flags():
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def _bfloat16_unbuildable():
    """None where the bfloat16 kernels are built, else why not."""
    if _capability() != "AVX512":
        return f"the kernels are built for {_capability()}, not AVX512"
    if "avx512_bf16" not in _cpu_flags():
        return "the CPU has no AVX512-BF16 (avx512_bf16 in /proc/cpuinfo)"
    return None


def _flags(bfloat16):
    """The compiler flags of the kernels on this machine's vector capability, with the
    bfloat16 kernels' where `bfloat16`."""
    flags = _CAPABILITY_FLAGS.get(_capability(), ["-DCPU_CAPABILITY=DEFAULT"])
    return [*flags, *_BFLOAT16_FLAGS] if bfloat16 else list(flags)


def _load(name, flags, verbose, sources=None):
    """Compile (or find in torch's extension cache) `sources` (csrc/cpu) as library `name`."""
    from torch.utils import cpp_extension

    sources = sources or source_dir("cpu")
    return cpp_extension.load(
        name=extension_name(name),
        sources=sorted(str(path) for path in sources.glob("*.cpp")),
        # -fopenmp: at::parallel_for is inline and runs serially without it
        extra_cflags=["-O3", "-fopenmp", *flags],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )


def build(verbose=False):
    """Compile (or find in the cache) and load the kernels; return the library's path.

    Where the CPU has AVX512-BF16 the bfloat16 kernels are built in; if the compiler
    fails on that build, the library is built without them (`bfloat16_path` says why).
    """
    name = f"fastnl_cpp_{_capability().lower()}"
    if _bfloat16_unbuildable() is None:
        try:
            return _load(f"{name}_bf16", _flags(bfloat16=True), verbose)
        except Exception as error:  # e.g. a compiler without -mavx512bf16
            lines = str(error).splitlines() or [""]
            _bfloat16_build_errors.append(next((line for line in lines if "error:" in line), lines[0]))
    return _load(name, _flags(bfloat16=False), verbose)


@functools.cache
def _build_failure():
    """None once the kernels are loaded, else why they could not be (warned once)."""
    try:
        build()
    except Exception as error:  # any compiler or loader failure means "unavailable"
        reason = f"building the C++ CPU kernels failed: {type(error).__name__}: {error}"
        warnings.warn(f"fastnl: {reason}\nfalling back to the 'torch' backend", RuntimeWarning, stacklevel=2)
        return reason
    return None


def unavailable_reason(device_type):
    if device_type != "cpu":
        return f"the cpp backend runs on CPU tensors only, not {device_type}"
    return _build_failure()


BFLOAT16_CHOICE = "FASTNL_CPP_BFLOAT16"  # "native" or "float32"; unset: native on AMX or a fast vdpbf16ps


@functools.cache
def _bfloat16_kernels():
    """Whether the loaded library has the bfloat16 kernels and the CPU runs them."""
    return _build_failure() is None and bool(torch.ops.fastnl_cpp.bfloat16_native())


def _bfloat16_amx():
    """Whether the bfloat16 kernels' products run on AMX tiles now (asked at each call:
    `torch.backends.mkldnn.enabled` switches them to vdpbf16ps)."""
    return _bfloat16_kernels() and bool(torch.ops.fastnl_cpp.bfloat16_amx())


# Without AMX, native is the default where vdpbf16ps has at least the float32 FMA's FLOP
# rate: measured at 0.5 on a Sapphire Rapids with AMX off (native ran slower than
# converting) and 2.0 on a Zen 4 (native fwd+bwd 1.2-1.7x converting at the model's shapes).
_NATIVE_DOT_SPEEDUP = 1.0


@functools.cache
def bfloat16_dot_speedup():
    """vdpbf16ps' FLOP rate over a float32 FMA's on this core, timed once (~1 ms);
    0 where the bfloat16 kernels are not built or the CPU cannot run them."""
    return float(torch.ops.fastnl_cpp.bfloat16_dot_speedup()) if _bfloat16_kernels() else 0.0


def exp_rate():
    """Exponentials per second on one core of the softmax kernels' own exp, timed in
    registers (~1 ms): the rate their exps reach at best, for the benchmarks' floors;
    0 where the kernels are not built."""
    return float(torch.ops.fastnl_cpp.exp_rate()) if _build_failure() is None else 0.0


def _bfloat16_native():
    """Whether the softmax kernels take bfloat16 operands (chosen, built and runnable)."""
    choice = os.environ.get(BFLOAT16_CHOICE)
    if choice not in (None, "float32", "native"):
        raise ValueError(f"{BFLOAT16_CHOICE} must be 'float32' or 'native', got {choice!r}")
    if choice is None:
        return _bfloat16_amx() or (_bfloat16_kernels() and bfloat16_dot_speedup() >= _NATIVE_DOT_SPEEDUP)
    return choice == "native" and _bfloat16_kernels()


def bfloat16_path():
    """How the softmax kernels compute bfloat16 inputs here: "amx" or "avx512-bf16"
    (natively: bf16 products on AMX tiles, or on vdpbf16ps) or "float32 (why)"
    (converted, computed in float32)."""
    if _bfloat16_native():
        return "amx" if _bfloat16_amx() else "avx512-bf16"
    if _bfloat16_kernels():
        if os.environ.get(BFLOAT16_CHOICE) == "float32":
            return f"float32 (chosen by {BFLOAT16_CHOICE}=float32)"
        return (f"float32 (the default without AMX where vdpbf16ps is slow, here {bfloat16_dot_speedup():.2f}x "
                f"the float32 FMA rate: {BFLOAT16_CHOICE}=native selects the AVX512-BF16 kernels)")
    reason = (_build_failure() or _bfloat16_unbuildable()
              or next((f"the build with -mavx512bf16 failed: {error}" for error in _bfloat16_build_errors), None)
              or "the CPU reports no AVX512-BF16 (cpuid)")
    return f"float32 ({reason})"


def _as_compute(*tensors, native=(torch.float32, torch.float64)):
    """Tensors in the kernels' dtype (theirs if `native`, else float32), None kept."""
    dtype = tensors[0].dtype if tensors[0].dtype in native else torch.float32
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _as_softmax_operands(*tensors):
    native = (torch.float32, torch.float64)
    if tensors[0].dtype == torch.bfloat16 and _bfloat16_native():  # the choice matters for bfloat16 only
        native = (*native, torch.bfloat16)
    return _as_compute(*tensors, native=native)


def _as_statistic(log_normalizer, operand):
    """log_normalizer in the kernels' row-statistic dtype for `operand` (float32 unless float64)."""
    return log_normalizer.to(accumulate_dtype(operand.dtype)).contiguous()


def softmax_forward(query, key, value, center, log_normalizer, scale):
    operands = _as_softmax_operands(query, key, value, center)
    known = None if log_normalizer is None else _as_statistic(log_normalizer, operands[0])
    out, computed = torch.ops.fastnl_cpp.softmax_forward(*operands, known, scale)
    return out.to(value.dtype), (log_normalizer if log_normalizer is not None else computed)


def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale):
    operands = _as_softmax_operands(grad_out, query, key, value, center, out)
    grads = torch.ops.fastnl_cpp.softmax_backward(*operands, _as_statistic(log_normalizer, operands[0]), scale)
    return tuple(grad.to(query.dtype) for grad in grads)


def softmax_shared_backward(grad_outs, query, key, values, centers, outs, log_normalizer, scale):
    count = len(grad_outs)
    operands = _as_softmax_operands(query, key, *grad_outs, *values, *(centers or ()), *outs)
    query_, key_, rest = operands[0], operands[1], operands[2:]
    grad_outs_, values_ = rest[:count], rest[count:2 * count]
    centers_, outs_ = (rest[2 * count:3 * count], rest[3 * count:]) if centers else ([], rest[2 * count:])
    grads = torch.ops.fastnl_cpp.softmax_shared_backward(grad_outs_, query_, key_, values_, centers_, outs_,
                                                         _as_statistic(log_normalizer, query_), scale)
    return tuple(grad.to(query.dtype) for grad in grads)


def softmax_values_backward(grad_out, query, key, log_normalizer, scale):
    grad_out_, query_, key_ = _as_softmax_operands(grad_out, query, key)
    grad = torch.ops.fastnl_cpp.softmax_values_backward(grad_out_, query_, key_,
                                                        _as_statistic(log_normalizer, query_), scale)
    return grad.to(query.dtype)


def _mean_forward(op, query, key, value, center, scale):
    out, row_weight = op(*_as_compute(query, key, value, center), scale)
    return out.to(value.dtype), row_weight


def _mean_backward(op, grad_out, query, key, value, center, scale):
    grads = op(*_as_compute(grad_out, query, key, value, center), scale)
    return tuple(grad.to(query.dtype) for grad in grads)


def dot_forward(query, key, value, center, scale):
    return _mean_forward(torch.ops.fastnl_cpp.dot_forward, query, key, value, center, scale)


def dot_backward(grad_out, query, key, value, center, scale):
    return _mean_backward(torch.ops.fastnl_cpp.dot_backward, grad_out, query, key, value, center, scale)


def concat_forward(query, key, value, center, scale):
    return _mean_forward(torch.ops.fastnl_cpp.concat_forward, query, key, value, center, scale)


def concat_backward(grad_out, query, key, value, center, scale):
    return _mean_backward(torch.ops.fastnl_cpp.concat_backward, grad_out, query, key, value, center, scale)


if __name__ == "__main__":
    print(f"built the fastnl C++ CPU kernels ({_capability()}): {build(verbose=True)}")
    print(f"bfloat16 softmax: {bfloat16_path()} (vdpbf16ps at {bfloat16_dot_speedup():.2f}x the float32 FMA rate)")
