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

float32 and float64 run natively; half-precision inputs are computed in float32 and
rounded once at the end, as in the "torch" backend.
"""
import functools
import warnings

import torch

from fastnl.backends._sources import extension_name, source_dir

# vector capability -> compiler flags; CPU_CAPABILITY_* selects at::vec's implementation.
# -mtune=native: the kernels are built on the machine that runs them, so the schedule
# can fit its core (the instruction set is unchanged).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mtune=native"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mtune=native"],
}


def _capability():
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def build(verbose=False):
    """Compile (or find in the cache) and load the kernels; return the library's path."""
    from torch.utils import cpp_extension

    capability = _capability()
    return cpp_extension.load(
        name=extension_name(f"fastnl_cpp_{capability.lower()}"),
        sources=sorted(str(path) for path in source_dir("cpu").glob("*.cpp")),
        # -fopenmp: at::parallel_for is inline and runs serially without it
        extra_cflags=["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )


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


def _compute_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as_compute(*tensors):
    """Tensors in the kernels' dtype (float32 for half precision), None kept."""
    dtype = _compute_dtype(tensors[0].dtype)
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def softmax_forward(query, key, value, center, log_normalizer, scale):
    out, computed = torch.ops.fastnl_cpp.softmax_forward(
        *_as_compute(query, key, value, center, log_normalizer), scale
    )
    return out.to(value.dtype), (log_normalizer if log_normalizer is not None else computed)


def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale):
    grads = torch.ops.fastnl_cpp.softmax_backward(
        *_as_compute(grad_out, query, key, value, center, out, log_normalizer), scale
    )
    return tuple(grad.to(query.dtype) for grad in grads)


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
