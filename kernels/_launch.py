"""What every fastnl Triton kernel launcher needs: interpreter or GPU, padding, tuning,
product precision and the test switches.

Triton decides at decoration time (`triton.jit`) whether a kernel is compiled for the
GPU or run by its CPU interpreter (TRITON_INTERPRET=1), so `INTERPRET` is read once,
here, when `fastnl.kernels` is first imported; setting the variable later changes
nothing. The same holds for the two switches below.

    FASTNL_TRITON_CONFIGS=all    (default) autotune over the configurations that fit the
                                 widths; the choice is cached per autotune key
    FASTNL_TRITON_CONFIGS=first  launch the first configuration that fits, no tuning:
                                 one compilation per kernel and width, for quick checks
    FASTNL_TRITON_FILL_NAN=1     outputs start as NaN instead of uninitialised memory, so a
                                 configuration that skips a ragged tile fails a comparison
                                 instead of passing on what an earlier one wrote

The interpreter cannot benchmark (no CUDA events): there every kernel runs its
interpreter configuration, as under "first".
"""
import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CONFIGS = os.environ.get("FASTNL_TRITON_CONFIGS", "all")
FILL_NAN = os.environ.get("FASTNL_TRITON_FILL_NAN", "0") not in ("", "0")
if CONFIGS not in ("all", "first"):
    raise ValueError(f"FASTNL_TRITON_CONFIGS must be 'all' or 'first', got {CONFIGS!r}")

# live tile values per thread that a configuration may hold: with exact fp32 products
# on sm_90, configurations above about 80 spill registers and those up to 64 do not
# (ptxas -v, as `python tests/compile_triton_for_gpu.py --all` reports), and a
# spilling tile loses to a smaller one
REGISTER_BUDGET = 64

_PINNED = contextvars.ContextVar("fastnl_pinned_config", default=None)


def padded_width(width):
    """The tile width for a feature width: a power of two and at least 16.

    tl.dot on NVIDIA GPUs needs every dimension >= 16, and tile shapes must be powers of
    two; the padding is loaded as zeros, which leave dot products unchanged.
    """
    return max(16, triton.next_power_of_2(width))


def bucket(length):
    """A sequence length as an autotune key: its power-of-two bucket, so N = 1000 and
    N = 1024 share one tuning (FlashAttention's Triton kernel keys on seqlen // 32)."""
    return triton.next_power_of_2(max(1, length))


def accumulator(dtype):
    """The Triton accumulator type for an input dtype: float64 stays, the rest use float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype):
    """`input_precision` of tl.dot for inputs of `dtype`, as torch's own float32 matmuls
    choose: "ieee" (exact fp32 products) under torch.set_float32_matmul_precision("highest"),
    the default, else "tf32" (tensor cores, 10-bit mantissa). Other dtypes, and the
    interpreter (which computes exact fp32 whatever it is told), always use "ieee"."""
    if dtype == torch.float32 and not INTERPRET and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def new_output(like, shape, dtype=None):
    """An output buffer: uninitialised, or NaN-filled under FASTNL_TRITON_FILL_NAN=1."""
    dtype = dtype or like.dtype
    if FILL_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@contextlib.contextmanager
def pinned_config(index):
    """Launch every tuned kernel with configuration `index` of those that fit its launch
    (its last one where it has fewer): tests run each configuration this way."""
    token = _PINNED.set(index)
    try:
        yield
    finally:
        _PINNED.reset(token)


def tuned(configs, key, interpreter_config, live_values):
    """Decorator: a kernel with candidate configurations, launched as `kernel[grid](...)`.

    `live_values(meta)` counts the fp32 values one program keeps live for the launch's
    constexprs and a configuration's tile sizes; configurations over REGISTER_BUDGET per
    thread are pruned, the same way for autotuning and for "first". The grid may be a
    function of the tile sizes, as with triton.autotune.
    """

    def wrap(kernel):
        if INTERPRET:
            return Tuned(kernel, [triton.Config(interpreter_config)], key, lambda meta: 0)
        return Tuned(kernel, configs, key, live_values)

    return wrap


class Tuned:
    """A jit kernel and its configurations: autotuned, or launched with one of them."""

    def __init__(self, kernel, configs, key, live_values):
        self.kernel, self.configs, self.live_values = kernel, configs, live_values
        self._fitting_by_meta = {}  # launch constexprs -> fitting(): once, not on every launch
        self._autotuned = None
        if not INTERPRET and CONFIGS == "all":
            self._autotuned = triton.autotune(
                configs=configs, key=key,
                prune_configs_by={"early_config_prune": lambda configs, _, **meta: self.fitting(meta)},
            )(kernel)

    def per_thread(self, config, meta):
        """Live tile values per thread of `config` for these launch constexprs."""
        return self.live_values({**meta, **config.kwargs}) / (32 * config.num_warps)

    def fits(self, config, meta):
        return self.per_thread(config, meta) <= REGISTER_BUDGET

    def fitting(self, meta):
        """The configurations within the register budget for these launch constexprs, in
        order; where none is, the one with the fewest live values per thread."""
        kept = [config for config in self.configs if self.fits(config, meta)]
        return kept or [min(self.configs, key=lambda config: self.per_thread(config, meta))]

    def __getitem__(self, grid):
        def launch(*args, **meta):
            pinned = _PINNED.get()
            if self._autotuned is not None and pinned is None:
                return self._autotuned[grid](*args, **meta)
            key = tuple(sorted(meta.items()))
            if key not in self._fitting_by_meta:
                self._fitting_by_meta[key] = self.fitting(meta)
            fitting = self._fitting_by_meta[key]
            config = fitting[min(pinned or 0, len(fitting) - 1)]
            options = {} if INTERPRET else {"num_warps": config.num_warps, "num_stages": config.num_stages}
            return self.kernel[grid](*args, **meta, **config.kwargs, **options)

        return launch
