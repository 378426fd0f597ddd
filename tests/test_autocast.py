"""Under torch.autocast the nonlocal operators run in autocast's dtype: float32 operands
are cast to it as a matmul's would be, float64 stays, log_normalizer stays float32, and
nothing inside the operator is autocast a second time."""
import pytest
import torch
from harness import cpu_backends, make_inputs

import fastnl

pytestmark = pytest.mark.parametrize("backend", cpu_backends())


def test_float32_operands_run_in_bfloat16(backend):
    query, key, value, center, _ = make_inputs((2, 37, 37, 8, 16), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, log_normalizer = fastnl.nonlocal_attend(query, key, value, center, backend=backend)
    assert out.dtype == torch.bfloat16 and log_normalizer.dtype == torch.float32
    low = [t.to(torch.bfloat16) for t in (query, key, value, center)]
    expected, expected_log_normalizer = fastnl.nonlocal_attend(*low, backend=backend)
    assert torch.equal(out, expected) and torch.equal(log_normalizer, expected_log_normalizer)


def test_float64_stays_float64(backend):
    query, key, value, center, _ = make_inputs((2, 37, 37, 8, 16), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastnl.nonlocal_diffuse(query, key, value, center, backend=backend)
    assert out.dtype == torch.float64
    assert torch.equal(out, fastnl.nonlocal_diffuse(query, key, value, center, backend=backend))


def test_gradients_reach_float32_leaves(backend):
    leaves = [t.requires_grad_() for t in make_inputs((2, 20, 30, 8, 16), torch.float32)[:3]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastnl.nonlocal_aggregate(*leaves, backend=backend)
    out.float().square().sum().backward()
    assert all(leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_a_stage_under_autocast_keeps_its_residual_stream(backend):
    stage = fastnl.NonlocalStage(16, num_blocks=2, backend=backend)
    torch.nn.init.ones_(stage.branches[0].bn.weight)  # not the identity
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stage(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, stage(x), atol=0.1, rtol=0.05)  # bfloat16 operands, float32 residual
