"""nonlocal_diffuse (softmax) on a GPU at the paper's sizes: triton, cuda, torch,
reference and SDPA, forward and forward+backward, float32 and bfloat16.

    pytest benchmarks/test_gpu_bench.py --benchmark-only      (skipped without CUDA)

Problems, inputs, the SDPA peer and the step come from cases.py, as in the CPU suite;
each step ends with torch.cuda.synchronize() so the time covers the kernels, not the
launch. Peak memory is the CUDA allocator's high-water mark during one step, beyond
what was allocated before it (the inputs).
"""
import pytest
import torch
from cases import SIZES, backend_diffuse, make_inputs, run_step, sdpa_diffuse, size_name

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_IMPLEMENTATIONS = {
    "reference": backend_diffuse("reference"),
    "torch": backend_diffuse("torch"),
    "triton": backend_diffuse("triton"),
    "cuda": backend_diffuse("cuda"),
    "sdpa": sdpa_diffuse,
}


def _timed_step(function, inputs, backward):
    run_step(function, inputs, backward)
    torch.cuda.synchronize()


def _peak_extra_bytes(function, inputs, backward):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _timed_step(function, inputs, backward)
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("implementation", list(GPU_IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("size_index", range(len(SIZES)), ids=[size_name(s) for s in SIZES])
def test_gpu_diffuse(benchmark, record, implementation, dtype, backward, size_index):
    benchmark.group = (f"gpu diffuse {'forward+backward' if backward else 'forward'} "
                       f"{size_name(SIZES[size_index])} {str(dtype).removeprefix('torch.')}")
    inputs = [t.detach().cuda().requires_grad_(backward)
              for t in make_inputs(SIZES[size_index], requires_grad=False, dtype=dtype)]
    function = GPU_IMPLEMENTATIONS[implementation]
    with torch.set_grad_enabled(backward):
        _timed_step(function, inputs, backward)  # compile / autotune outside the timing
        benchmark.pedantic(_timed_step, args=(function, inputs, backward), rounds=20, warmup_rounds=3)
        record(benchmark, implementation, _peak_extra_bytes(function, inputs, backward))
