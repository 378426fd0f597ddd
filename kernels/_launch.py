"""What every fastnl Triton kernel launcher needs: interpreter or GPU, padding, tuning.

Triton decides at decoration time (`triton.jit`) whether a kernel is compiled for the
GPU or run by its CPU interpreter (TRITON_INTERPRET=1), so `INTERPRET` is read once,
here, when `fastnl.kernels` is first imported; setting the variable later changes
nothing. The interpreter cannot benchmark (no CUDA events), so autotuning is a GPU-only
layer: under the interpreter each kernel runs with one small fixed tile configuration.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_width(width):
    """The tile width for a feature width: a power of two and at least 16.

    tl.dot on NVIDIA GPUs needs every dimension >= 16, and tile shapes must be powers of
    two; the padding is loaded as zeros, which leave dot products unchanged.
    """
    return max(16, triton.next_power_of_2(width))


def accumulator(dtype):
    """The Triton accumulator type for an input dtype: float64 stays, the rest use float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tuned(configs, key, interpreter_config):
    """Decorator: triton.autotune over `configs` on the GPU, `interpreter_config` otherwise.

    The result is indexed with a grid like a kernel (`kernel[grid](...)`); the grid may
    be a function of the tile sizes, as with triton.autotune.
    """

    def wrap(kernel):
        if INTERPRET:
            return _Fixed(kernel, interpreter_config)
        return triton.autotune(configs=configs, key=key)(kernel)

    return wrap


class _Fixed:
    """A kernel launched with one fixed set of tile sizes (the interpreter's)."""

    def __init__(self, kernel, meta):
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **kwargs, **self.meta)
