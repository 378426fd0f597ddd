"""What the CPU row operators (fastnl.batch_norm, fastnl.linear_parts) share: whether
they can run here, and how they multiply bfloat16 rows."""
import torch

from fastnl import backends
from fastnl.backends import cpp


def bfloat16_products(rows):
    """Whether bfloat16 rows are projected on bf16 products: where the softmax kernels' are."""
    return rows.dtype == torch.bfloat16 and cpp.bfloat16_path() in ("amx", "avx512-bf16")


@torch.compiler.assume_constant_result  # decided while tracing; no graph break
def built():
    """Whether the cpp backend, which holds the row operators, is built."""
    return backends.unavailable_reason("cpp", "cpu") is None
