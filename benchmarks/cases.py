"""The benchmark problems and implementations, shared by the suites and the memory probe.

Run as a script it measures one case's peak extra memory in a fresh process (Linux):
    python benchmarks/cases.py IMPLEMENTATION SIZE_INDEX {forward,backward}
and prints the growth of the resident-set high-water mark in bytes.
"""
import sys

import torch
import torch.nn.functional as F
from peak_memory import peak_extra_bytes

import fastnl
from fastnl import backends

# The paper's sizes: CIFAR maps at the three PreResNet stages, B = 16
SIZES = [
    dict(batch=16, positions=1024, width=8, value_width=16),
    dict(batch=16, positions=256, width=16, value_width=32),
    dict(batch=16, positions=64, width=32, value_width=64),
]

# The models' own: PreResNet-20's three stages at the training batch, B = 128, E = D
MODEL_SIZES = [
    dict(batch=128, positions=1024, width=8, value_width=8),
    dict(batch=128, positions=256, width=16, value_width=16),
    dict(batch=128, positions=64, width=32, value_width=32),
]


def size_name(size):
    return f"B{size['batch']}-N{size['positions']}-D{size['width']}-E{size['value_width']}"


def work(size):
    """(FLOPs, exps) of one diffuse softmax fwd+bwd at `size`: per (query, key) pair the
    forward's q.k (D) and p v (E) and the backward's q.k, dp (E), dV (E), dK (D), dQ (D),
    2 FLOPs a multiply-add; one exp in the forward and one in the backward's recomputed
    tile. A stage of one block."""
    return stage_work(size, 1)


def stage_work(size, blocks):
    """(FLOPs, exps) of a NonlocalStage's `blocks` softmax sums fwd+bwd at `size`, the
    query and key gradients formed once (fastnl.shared_affinity): per (query, key) pair
    each forward's q.k and p v; each later backward's q.k and dV; the first backward's
    q.k, dp (blocks E wide), dV, dK and dQ; an exp in every forward and backward."""
    pairs = size["batch"] * size["positions"] ** 2
    width, value_width = size["width"], size["value_width"]
    forwards = blocks * (width + value_width)
    later_backwards = (blocks - 1) * (width + value_width)
    first_backward = 3 * width + (blocks + 1) * value_width
    return 2 * pairs * (forwards + later_backwards + first_backward), 2 * blocks * pairs


def make_inputs(size, requires_grad, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    shapes = [
        (size["batch"], size["positions"], size["width"]),
        (size["batch"], size["positions"], size["width"]),
        (size["batch"], size["positions"], size["value_width"]),
    ]
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad) for shape in shapes]


def sdpa_diffuse(query, key, value):
    """The peer: PyTorch's fused attention (its CPU flash kernel needs equal widths, so
    q/k are zero-padded to E, which leaves q.k unchanged), then the subtraction."""
    pad = value.shape[-1] - query.shape[-1]
    query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
    out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), scale=1.0)
    return out.squeeze(1) - value


def backend_diffuse(backend):
    return lambda query, key, value: fastnl.nonlocal_diffuse(query, key, value, value, backend=backend)


IMPLEMENTATIONS = {
    "reference": backend_diffuse("reference"),
    **{name: backend_diffuse(name) for name in backends.available("cpu")},
    "sdpa": sdpa_diffuse,
}


def run_step(function, inputs, backward):
    out = function(*inputs)
    if backward:
        out.backward(torch.ones_like(out))
    return out


if __name__ == "__main__":
    # Warm up on a tiny problem (libraries, thread pools, a cpp build), reset the
    # resident-set high-water mark (Linux clear_refs "5"), run one step, and report the
    # high-water mark's growth over the resident set before it.
    name, size_index, direction = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    backward = direction == "backward"
    torch.set_num_threads(1)  # the same few allocations whatever the thread count
    run_step(IMPLEMENTATIONS[name], make_inputs(SIZES[2], backward), backward)
    inputs = make_inputs(SIZES[size_index], requires_grad=backward)
    print(peak_extra_bytes(lambda: run_step(IMPLEMENTATIONS[name], inputs, backward)))
