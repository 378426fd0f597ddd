"""Compile every fastnl Triton kernel to a cubin for sm_80 and sm_90, without a GPU.

    python tests/compile_triton_for_gpu.py      (TRITON_INTERPRET must be unset)

The interpreter tests check the kernels' arithmetic, but the interpreter accepts what
the GPU compiler refuses (tl.dot with a dimension below 16, unsupported dtype mixes).
Triton compiles ahead of time for a named target with no device present, so each
kernel is compiled here with its first autotune configuration: at the padded width of
D = 1 (16, what tl.dot needs) for float32, float16 and bfloat16 inputs on both architectures, and at the
largest the backend accepts (128) for float32 and bfloat16 on sm_90 (compiling 128-wide tiles takes
seconds each, so not every combination). About a minute on 2 cores.
Prints one line per kernel and exits non-zero on the first failure.
"""
import os
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fastnl.backends.triton import MAX_WIDTH
from fastnl.kernels import _launch, linear, softmax_bwd, softmax_fwd

ARCHS = (80, 90)
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
STATISTICS = {"stats_in", "stats_out", "stats", "delta", "partial", "state"}  # always float32 here
FLOATS = {"scale", "factor"}

# kernel -> constexprs other than tile sizes; widths are filled in per case
KERNELS = {
    softmax_fwd._softmax_forward_kernel: {"HAS_CENTER": True, "HAS_STATS": False},
    softmax_bwd._delta_kernel: {"HAS_CENTER": True},
    softmax_bwd._key_value_grad_kernel: {},
    softmax_bwd._query_grad_kernel: {},
    linear._outer_sum_kernel: {"CHUNK_ROWS": 512, "BLOCK_R": 64},
    linear._rows_times_kernel: {},
}
WIDTH_NAMES = ("BLOCK_D", "BLOCK_E", "BLOCK_L", "BLOCK_RIGHT", "BLOCK_P", "BLOCK_Q")


def signature(function, dtype_name):
    """Triton's type string for each argument, from fastnl's argument naming."""
    types = {}
    for name in function.arg_names:
        if name.isupper():
            types[name] = "constexpr"
        elif name in FLOATS:
            types[name] = "fp32"
        elif name in STATISTICS:
            types[name] = "*fp32"
        elif name.startswith(("num_", "width_", "stride_")):
            types[name] = "i32"
        else:
            types[name] = f"*{dtype_name}"
    return types


def cases(kernel):
    """(config, padded width, dtype name, arch) to compile, as the module docstring says."""
    config = (getattr(kernel, "configs", None) or [triton.Config({})])[0]
    narrow, wide = _launch.padded_width(1), _launch.padded_width(MAX_WIDTH)
    cases = [(config, narrow, dtype_name, arch) for dtype_name in DTYPES for arch in ARCHS]
    return cases + [(config, wide, dtype_name, 90) for dtype_name in ("fp32", "bf16")]


def compile_all():
    for kernel, constants in KERNELS.items():
        function = kernel if isinstance(kernel, JITFunction) else kernel.fn  # unwrap triton.autotune
        start = time.perf_counter()
        for config, width, dtype_name, arch in cases(kernel):
            constexprs = {**constants, **config.kwargs, "ACC": tl.float32}
            constexprs.update({name: width for name in WIDTH_NAMES if name in function.arg_names})
            indexed = {(function.arg_names.index(name),): value for name, value in constexprs.items()
                       if name in function.arg_names}
            source = ASTSource(fn=function, signature=signature(function, dtype_name), constexprs=indexed)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        print(f"{function.__name__}: {len(cases(kernel))} compilations in {time.perf_counter() - start:.1f} s",
              flush=True)


if __name__ == "__main__":
    if _launch.INTERPRET:
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled for a GPU")
    compile_all()
    os._exit(0)
