"""The CUDA extension compiles (and imports) wherever nvcc is present, GPU or not.

Without a visible GPU it is built for sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST="8.0;9.0",
unless set). A compile error fails this test; a machine with no CUDA toolkit skips it.
A fresh build takes about 50-70 s on 2 cores (ninja compiles the .cpp and .cu in
parallel); later runs reuse torch's extension cache and take seconds.
"""
import pytest

from fastnl import backends
from fastnl.backends import _cuda_build


@pytest.mark.skipif(_cuda_build.cuda_home() is None,
                    reason="no CUDA toolkit (nvcc and headers): set CUDA_HOME to build csrc/cuda")
def test_cuda_extension_compiles():
    extension = _cuda_build.cuda_extension()
    assert callable(extension.softmax_forward) and callable(extension.softmax_backward)


def test_cuda_backend_needs_cuda_tensors():
    assert "CUDA tensors" in backends.unavailable_reason("cuda", "cpu")
