"""nonlocal_diffuse (softmax) at the paper's sizes: every CPU backend, the reference and SDPA.

    pytest benchmarks/ --benchmark-only
"""
import pytest
import torch
from cases import IMPLEMENTATIONS, SIZES, make_inputs, run_step, size_name
from conftest import peak_extra_bytes


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("size_index", range(len(SIZES)), ids=[size_name(s) for s in SIZES])
def test_diffuse(benchmark, record, implementation, backward, size_index):
    benchmark.group = f"diffuse {'forward+backward' if backward else 'forward'} {size_name(SIZES[size_index])}"
    inputs = make_inputs(SIZES[size_index], requires_grad=backward)
    with torch.set_grad_enabled(backward):
        benchmark.pedantic(run_step, args=(IMPLEMENTATIONS[implementation], inputs, backward),
                           rounds=5, warmup_rounds=1)
    record(benchmark, implementation, peak_extra_bytes(implementation, size_index, backward))
