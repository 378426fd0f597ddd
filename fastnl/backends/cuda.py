"""The "cuda" backend: hand-written CUDA kernels (csrc/cuda/) for the softmax operator.

The kernels are the simple design (one thread per row, tiles of the other side staged
in shared memory, online softmax); their arithmetic lives in csrc/cuda/nonlocal_math.h
and is tested on the CPU through a host build (tests/test_cuda_math.py). dot and
concat are the torch backend's exact paths, reused as is: they are a few batched
matrix products and a sort, which cuBLAS and torch.sort already do on the GPU.
The extension is compiled with ninja on first use (fastnl.backends._cuda_build).
"""
import torch

from fastnl.backends import _cuda_build, refuse_widths_above
from fastnl.backends.torch_tiled import concat_backward, concat_forward, dot_backward, dot_forward  # noqa: F401

MAX_WIDTH = 128  # kMaxWidth of csrc/cuda/nonlocal_math.h: the per-thread row arrays
refuses = refuse_widths_above(MAX_WIDTH)


def unavailable_reason(device_type):
    if device_type != "cuda":
        return "the CUDA kernels run on CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        _cuda_build.cuda_extension()
    except Exception as error:  # a failed build makes the backend unavailable, with the reason
        return f"building csrc/cuda failed: {error}"
    return None


def softmax_forward(query, key, value, center, log_normalizer, scale):
    out, log_normalizer = _cuda_build.cuda_extension().softmax_forward(query, key, value, center, log_normalizer, scale)
    return out, log_normalizer


def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale):
    return tuple(_cuda_build.cuda_extension().softmax_backward(
        grad_out, query, key, value, center, out, log_normalizer, scale))
