"""Build csrc/cuda/ with ninja through torch.utils.cpp_extension, on first use.

Two extensions come from the same sources: `fastnl_cuda` (the kernels, compiled by
nvcc) and `fastnl_cuda_host_math` (nonlocal_math.h compiled by the host compiler, so
the kernels' arithmetic is tested without a GPU). Builds are cached by torch in
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and redone when a source or
flag changes. The CUDA toolkit is CUDA_HOME (or CUDA_PATH) when set, else torch's own
guess if it holds the CUDA headers, else /usr/local/cuda: torch guesses the folder
above the first `nvcc` on PATH, which is wrong when that nvcc is a wrapper script.
`python -m fastnl.backends._cuda_build` builds the CUDA extension verbosely, printing
ptxas's registers and spills per kernel (nvcc runs with -Xptxas=-v), and where it is.
"""
import functools
import os
from pathlib import Path

import torch
from torch.utils import cpp_extension

from fastnl.backends._sources import extension_name, source_dir

# compiled for when no GPU is visible to ask: Ampere (A100) and Hopper (H100)
DEFAULT_ARCHS = "8.0;9.0"


DEFAULT_CUDA_HOME = "/usr/local/cuda"


def cuda_home():
    """The CUDA toolkit to build with (a folder with bin/nvcc and include/), or None."""
    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  DEFAULT_CUDA_HOME)
    for candidate in filter(None, candidates):
        root = Path(candidate)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def _sources(*names):
    folder = source_dir("cuda")
    paths = [folder / name for name in names]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"fastnl's C++/CUDA sources are not installed: {missing}")
    return [str(path) for path in paths]


@functools.cache
def cuda_extension(verbose=False):
    """The compiled CUDA kernels (module fastnl_cuda); raises if the build fails."""
    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) found: set CUDA_HOME")
    # torch.utils.cpp_extension reads its module-level CUDA_HOME when it builds
    cpp_extension.CUDA_HOME = home
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return cpp_extension.load(
        name=extension_name("fastnl_cuda"),
        sources=_sources("softmax_api.cpp", "softmax_kernels.cu"),
        extra_include_paths=[str(source_dir("cuda"))],
        extra_cflags=["-O3"],
        # ptxas reports registers, stack frame and spills per kernel in the (verbose) build log
        extra_cuda_cflags=["-O3", "-Xptxas=-v"],
        verbose=verbose,
    )


@functools.cache
def host_math_extension(verbose=False):
    """nonlocal_math.h built for the CPU (module fastnl_cuda_host_math)."""
    return cpp_extension.load(
        name=extension_name("fastnl_cuda_host_math"),
        sources=_sources("host_math.cpp"),
        extra_include_paths=[str(source_dir("cuda"))],
        extra_cflags=["-O3"],
        verbose=verbose,
    )


if __name__ == "__main__":
    extension = cuda_extension(verbose=True)
    assert callable(extension.softmax_forward) and callable(extension.softmax_backward)
    print(f"built {extension.__name__} ({extension.__file__}): softmax_forward and softmax_backward loaded")
