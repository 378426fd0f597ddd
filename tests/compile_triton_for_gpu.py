"""Compile fastnl's Triton kernels to cubins for sm_80 and sm_90, without a GPU.

    python tests/compile_triton_for_gpu.py          the pinned set (TRITON_INTERPRET unset)
    python tests/compile_triton_for_gpu.py --all    every configuration pruning keeps

The interpreter tests check the kernels' arithmetic, but the interpreter accepts what
the GPU compiler refuses (tl.dot with a dimension below 16, unsupported dtype mixes).
Triton compiles ahead of time for a named target with no device present. The pinned
set is what FASTNL_TRITON_CONFIGS=first launches: the first fitting configuration of
each kernel, at the padded widths 16 (D = 8, E = 16 and below) for float32, float16 and
bfloat16 on both architectures, and at the widest, 128, for float32 and bfloat16 on
sm_90. `--all` compiles every configuration that the register budget keeps at the
widths 16, 32, 64 and 128 (float32 with ieee and tf32 products, bfloat16; sm_90).
Every compiled kernel's shared memory must fit Hopper's 227 KiB per block, and its PTX,
assembled by Triton's own ptxas with -v, must spill at most a few registers at the
models' widths (up to 32) when its tiles are within the register budget of
fastnl.kernels._launch; spills at wider tiles are listed. A line per kernel is printed, and the first failure
exits non-zero.
"""
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fastnl.backends.triton import MAX_WIDTH
from fastnl.kernels import _launch, dot, softmax_bwd, softmax_fwd

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on sm_90 (H100/H200)
# the models' widths (D, E <= 32) must not spill within the register budget; wider
# tiles with exact fp32 products do spill in some configurations (listed, not failed)
STRICT_WIDTH = 32
SPILL_TOLERANCE = 64  # bytes: ptxas parks a few values in some tiles (16-24 bytes seen)
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
STATISTICS = {"log_normalizer", "delta", "partial", "state"}  # always float32 here
FLOATS = {"scale", "factor"}

# kernel -> constexprs other than tile sizes and widths
KERNELS = {
    softmax_fwd._softmax_forward_kernel: {"HAS_CENTER": True, "KNOWN": False},
    softmax_bwd._delta_kernel: {"HAS_CENTER": True},
    softmax_bwd._key_value_grad_kernel: {},
    softmax_bwd._query_grad_kernel: {},
    dot._outer_sum_kernel: {"CHUNK_ROWS": 512, "BLOCK_R": 64},
    dot._rows_times_kernel: {},
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
        elif name.startswith(("num_", "width_", "stride_", "bucket_")):
            types[name] = "i32"
        else:
            types[name] = f"*{dtype_name}"
    return types


def registers_and_spills(compiled, arch):
    """(registers per thread, spilled bytes) of a compiled kernel, from `ptxas -v`."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(compiled.asm["ptx"])
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([str(ptxas), f"-arch={target}", "-v", str(source), "-o", str(Path(folder) / "k.o")],
                              capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr))
    return registers, spills


def cases(everything):
    """(dtype name, precision, padded width, arch) to compile."""
    if everything:
        widths = [_launch.padded_width(w) for w in (16, 32, 64, MAX_WIDTH)]
        return [(dtype, precision, width, 90) for width in widths
                for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee"))]
    narrow, wide = _launch.padded_width(1), _launch.padded_width(MAX_WIDTH)
    return ([(dtype, "ieee", narrow, arch) for dtype in DTYPES for arch in (80, 90)]
            + [(dtype, "ieee", wide, 90) for dtype in ("fp32", "bf16")])


def configs(kernel, meta, everything):
    """The configurations launched for these constexprs: all that fit, or the pinned one."""
    if not isinstance(kernel, _launch.Tuned):
        return [triton.Config({})]
    fitting = kernel.fitting(meta)
    return fitting if everything else fitting[:1]


def compile_all(everything):
    total, spilled = 0, []
    for kernel, constants in KERNELS.items():
        function = kernel if isinstance(kernel, JITFunction) else kernel.kernel
        start, count, largest, most = time.perf_counter(), 0, 0, 0
        for dtype_name, precision, width, arch in cases(everything):
            meta = {**constants, "ACC": tl.float32, "DOT_PRECISION": precision}
            meta.update({name: width for name in WIDTH_NAMES if name in function.arg_names})
            if "BLOCK_Q" in meta:  # rows_times splits wide states into column tiles
                meta["BLOCK_Q"] = min(width, dot._MAX_BLOCK_Q)
            for config in configs(kernel, meta, everything):
                constexprs = {**meta, **config.kwargs}
                indexed = {(function.arg_names.index(name),): value for name, value in constexprs.items()
                           if name in function.arg_names}
                source = ASTSource(fn=function, signature=signature(function, dtype_name), constexprs=indexed)
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                shared = compiled.metadata.shared
                if shared > SHARED_MEMORY_LIMIT:
                    sys.exit(f"{function.__name__} {config} at width {width} {dtype_name}: {shared} bytes of "
                             f"shared memory, over the {SHARED_MEMORY_LIMIT} of sm_90")
                registers, spills = registers_and_spills(compiled, arch)
                within_budget = not isinstance(kernel, _launch.Tuned) or kernel.fits(config, meta)
                if spills > SPILL_TOLERANCE and within_budget and width <= STRICT_WIDTH:
                    sys.exit(f"{function.__name__} {config} at width {width} {dtype_name}: {registers} registers, "
                             f"{spills} bytes of spills within the register budget")
                if spills:
                    spilled.append(f"{function.__name__} {config.kwargs} {config.num_warps} warps, width {width} "
                                   f"{dtype_name} {precision}: {spills} bytes")
                count, largest, most = count + 1, max(largest, shared), max(most, registers)
        total += count
        print(f"{function.__name__}: {count} compilations in {time.perf_counter() - start:.1f} s, "
              f"shared memory up to {largest / 1024:.1f} KiB, up to {most} registers", flush=True)
    print(f"{total} kernels compiled; spills (up to {SPILL_TOLERANCE} bytes, or any above width "
          f"{STRICT_WIDTH}): {len(spilled)}")
    for line in spilled:
        print(f"  {line}")


if __name__ == "__main__":
    if _launch.INTERPRET:
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled for a GPU")
    if _launch.CONFIGS != "all":
        sys.exit("unset FASTNL_TRITON_CONFIGS: this script chooses the configurations itself")
    compile_all(everything="--all" in sys.argv[1:])
    os._exit(0)
